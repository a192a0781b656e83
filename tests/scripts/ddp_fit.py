"""Standalone ``strategy="ddp"`` QAT fit on 2 CPU processes, run by tests/test_callback_ddp.py.

Lightning's ``ddp`` launcher re-runs this script for rank 1, so it must be a file (not a pytest function).
Every rank writes its final state to ``OUT_DIR/rank<k>.pt``; the test compares them. Global rank 0 writes the
fit-end artifacts (deploy checkpoint, ONNX, ONNX Runtime check) to ``OUT_DIR/deploy``. Blocks freeze at epoch 1, so
DDP needs ``find_unused_parameters=True`` (frozen branch parameters receive no gradient).

Usage: python tests/scripts/ddp_fit.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qat_lit_modules as M  # noqa: E402
from qat_rep.callbacks import RepQATCallback  # noqa: E402
from qat_rep.quant import Schedule  # noqa: E402


def main() -> None:
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    M.pl.seed_everything(0)
    train, val = M.loaders(batch_size=8, n_train=32, n_val=16)
    strategy = M.pl.strategies.DDPStrategy(find_unused_parameters=True, process_group_backend="gloo")
    cb = RepQATCallback(calib_batches=2, schedule=Schedule.all_at_once(freeze_at=1),
                        export_dir=os.path.join(out_dir, "deploy"), progress=False)
    trainer = M.pl.Trainer(max_epochs=2, callbacks=[cb, M.DumpState(out_dir)],
                           **M.trainer_kwargs(devices=2, strategy=strategy, enable_checkpointing=False))
    trainer.fit(M.ClassifierPL(), train, val)


if __name__ == "__main__":
    main()
