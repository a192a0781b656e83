"""A YOLOv6 detector under real 2-process DDP on CPU (gloo) with the default RepQATCallback: a few QAT steps, then
identical quantizer state and weights on both ranks, with the shared scales still shared."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
sys.path.insert(0, str(ROOT / "recipes"))

import qat_lit_modules as M  # noqa: E402
from qat_yolov6 import YOLOv6Detector  # noqa: E402  (recipes/qat_yolov6.py)

from qat_rep.callbacks import RepQATCallback  # noqa: E402
from qat_rep.detection.data import DetectionSpec, make_detection_loaders  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.mark.slow
def test_ddp_detector_ranks_end_identical(tmp_path):
    train, _, names = make_detection_loaders(DetectionSpec(num_train=16, num_val=4, image_size=32, max_size=24),
                                             batch_size=4)
    cb = RepQATCallback(calib_batches=1, onnx=None, compare_fp32=False, progress=False,
                        export_dir=str(tmp_path / "deploy"))
    trainer = M.pl.Trainer(max_epochs=1, limit_train_batches=2, callbacks=[cb, M.DumpState(str(tmp_path))],
                           **M.trainer_kwargs(devices=2, strategy="ddp_spawn", enable_checkpointing=False,
                                              deterministic=False))
    # ddp_spawn pickles the module to the workers; the default file-descriptor sharing failed here ("unable to
    # resize file") for a model of this size, the file-system strategy does not
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        trainer.fit(YOLOv6Detector("yolov6_n", len(names), "qarepvggv2"), train)
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)
    r0 = torch.load(os.path.join(tmp_path, "rank0.pt"), weights_only=False)
    r1 = torch.load(os.path.join(tmp_path, "rank1.pt"), weights_only=False)
    assert r0["world_size"] == r1["world_size"] == 2 and r0["state"].keys() == r1["state"].keys()
    different = [k for k in r0["state"] if not torch.equal(r0["state"][k], r1["state"][k])]
    # DDP broadcasts buffers from rank 0 at the start of each forward, so only the BN statistics of the very last
    # step (each rank's own shard) may differ; every quantizer and every parameter must be identical
    assert all(k.endswith(("running_mean", "running_var")) for k in different), different[:5]
    amax = {k: v for k, v in r0["state"].items() if k.endswith("_input_quantizer._amax")}
    assert len(amax) == 71 and all(torch.isfinite(v).all() for v in amax.values())  # 69 convs, 2 transposed
    a = amax["model.backbone.ERBlock_5.0.rep_quant._input_quantizer._amax"]
    assert torch.equal(a, amax["model.neck.Bifusion0.cv1.block.conv._input_quantizer._amax"])
    assert set(r0["phases"].values()) == {"fused"}  # the default schedule collapses every block
