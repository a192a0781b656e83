"""Fresh-process check run by tests/test_callback_resume.py: load a QAT Lightning checkpoint with
``qat_rep.callbacks.load_qat_checkpoint`` and print, as JSON, its fake-quant and FP32-equivalent accuracy on the
validation digits used by the tests, and the rep-block phases.

Usage: python tests/scripts/eval_qat_checkpoint.py CKPT_PATH [N_VAL]
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qat_lit_modules as M  # noqa: E402
from qat_rep.blocks import RepBlock  # noqa: E402
from qat_rep.callbacks import load_qat_checkpoint  # noqa: E402
from qat_rep.callbacks.metrics import quantizers_disabled  # noqa: E402


def main() -> None:
    path = sys.argv[1]
    n_val = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    torch.set_num_threads(1)
    module = load_qat_checkpoint(M.ClassifierPL, path).eval()
    _, val = M.loaders(n_val=n_val)
    x = torch.cat([b[0] for b in val])
    y = torch.cat([b[1] for b in val])
    with torch.no_grad():
        fq = (module(x).argmax(1) == y).float().mean().item()
        with quantizers_disabled(module):
            fp = (module(x).argmax(1) == y).float().mean().item()
    phases = {n: m.rep_quant.phase for n, m in module.named_modules() if isinstance(m, RepBlock)}
    print(json.dumps({"acc_fakequant": fq, "acc_fp32": fp, "phases": phases, "class": type(module).__name__}))


if __name__ == "__main__":
    main()
