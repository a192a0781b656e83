"""The default ``RepQATCallback(export_dir=...)`` in Lightning projects that tell it nothing about their model.

Each test is a real Trainer fit on CPU (no ``calib_forward``): calibration runs inside the user's own first
training steps, and the fit-end ONNX file — traced with a recorded real call — agrees with the fake-quant model on
every recorded validation sample in ONNX Runtime. Cases 1 and 2 also resume bit-identically.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))

import default_lit_modules as D  # noqa: E402
import qat_lit_modules as M  # noqa: E402
from qat_rep.callbacks import RepQATCallback  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
              pytest.mark.usefixtures("one_thread"),
              pytest.mark.slow]  # every test is a Trainer fit
EPOCHS = 2


def _fit(flavor, make, loaders, out_dir, epochs=EPOCHS, ckpt_dir=None, ckpt_path=None, **options):
    """Seed, build ``make()``, fit it with the default callback; returns (module, callback) (``ckpt_dir``: a
    checkpoint per epoch)."""
    lib = M.FLAVORS[flavor]
    lib.seed_everything(0)
    module = make()
    cb = RepQATCallback(export_dir=out_dir, progress=False, **options)
    callbacks = [cb]
    if ckpt_dir is not None:
        callbacks.append(lib.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, filename="{epoch}"))
    trainer = lib.Trainer(max_epochs=epochs, callbacks=callbacks,
                          **M.trainer_kwargs(enable_checkpointing=ckpt_dir is not None, default_root_dir=out_dir))
    trainer.fit(module, *loaders, ckpt_path=ckpt_path)
    return module, cb


def _assert_verified(cb, out_dir, samples=64):
    """The fit-end artifacts: the one format's four files, and the ONNX file agreeing 100 % in ONNX Runtime."""
    assert sorted(os.listdir(out_dir)) == ["model.safetensors", "model_int8.onnx", "onnx_verify.json", "qat_rep.json"]
    r = cb.verify_result
    assert cb.calib_report is not None and cb.calib_report.batches == 4
    assert r is not None and r.samples == samples and r.agreement == 1.0, r
    saved = json.loads((out_dir / "onnx_verify.json").read_text())
    assert saved["data"] == "validation" and saved["agreement"] == 1.0


def _assert_resume_bit_identical(flavor, make, loaders, tmp_path, **options):
    full, _ = _fit(flavor, make, loaders, tmp_path / "full", epochs=EPOCHS + 1, **options)
    _fit(flavor, make, loaders, tmp_path / "first", ckpt_dir=tmp_path / "ckpt", **options)
    resumed, cb = _fit(flavor, make, loaders, tmp_path / "resumed", epochs=EPOCHS + 1,
                       ckpt_path=tmp_path / "ckpt" / f"epoch={EPOCHS - 1}.ckpt", **options)
    assert cb.calib_report is None  # the checkpoint is calibrated: no second calibration
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    return full, resumed, cb


def _onnx_inputs(path):
    import onnx

    return [i.name for i in onnx.load(str(path)).graph.input]


def test_forward_with_a_tensor_and_a_keyword_argument_lightning(tmp_path):
    _, cb = _fit("lightning.pytorch", D.BiasScaleL, D.default_loaders(), tmp_path / "int8")
    _assert_verified(cb, tmp_path / "int8")
    assert _onnx_inputs(tmp_path / "int8" / "model_int8.onnx") == ["x", "bias"]  # scale=1.0 is a constant


def test_dict_batches_pytorch_lightning(tmp_path):
    _, cb = _fit("pytorch_lightning", D.DictBatchPL, D.default_loaders("dict"), tmp_path / "int8")
    _assert_verified(cb, tmp_path / "int8")
    assert _onnx_inputs(tmp_path / "int8" / "model_int8.onnx") == ["image"]


@pytest.mark.slow
@pytest.mark.parametrize("flavor, make, kind", [("lightning.pytorch", D.BiasScaleL, "tuple"),
                                                ("pytorch_lightning", D.DictBatchPL, "dict")])
def test_resume_equals_uninterrupted_fit(flavor, make, kind, tmp_path):
    """Fit 2 epochs, resume to 3 == 3 uninterrupted epochs, bit for bit (calibration ran in epoch 0 of both)."""
    _assert_resume_bit_identical(flavor, make, D.default_loaders(kind), tmp_path)


def test_dataclass_batches(tmp_path):
    _, cb = _fit("lightning.pytorch", D.DataclassBatchL, D.default_loaders("dataclass"), tmp_path / "int8")
    _assert_verified(cb, tmp_path / "int8")


def test_model_built_in_configure_model(tmp_path):
    module, cb = _fit("lightning.pytorch", D.LazyL, D.default_loaders(), tmp_path / "int8")
    _assert_verified(cb, tmp_path / "int8")
    assert "configure_model" not in vars(module)  # the callback's wrapper is gone after the fit


def test_siamese_module_calls_its_backbone_twice(tmp_path):
    _, cb = _fit("lightning.pytorch", D.SiameseL, D.default_loaders(), tmp_path / "int8")
    _assert_verified(cb, tmp_path / "int8", samples=2 * 64)  # both calls of every validation batch


@pytest.mark.slow  # 3 epochs of a 17-conv network at 32x32
def test_resnet18_style_network_without_rep_blocks(tmp_path):
    from qat_rep.export import ModelCall, export_onnx, shared_scale_violations

    # 3 epochs: after 2 the 17-conv network still has near-tied logits (one of 64 flipped at 0.88 output steps,
    # measured); after 3 it is at 69 % validation accuracy and every top-1 agrees
    module, cb = _fit("lightning.pytorch", D.ResNetL, D.default_loaders(image_size=32), tmp_path / "int8", epochs=3)
    _assert_verified(cb, tmp_path / "int8")
    trt = tmp_path / "trt.onnx"
    export_onnx(module.model, trt, ModelCall((torch.randn(2, 3, 32, 32),)), target="tensorrt")
    assert shared_scale_violations(trt) == []
    # the residual stream of each stage is one group: its Adds join every block's input and output
    assert sorted(len(g) for g in cb.state_dict()["scale_groups"]) == [3, 3, 4]


@pytest.mark.slow  # six short fits
def test_shared_scales_are_tied_again_on_resume_with_learned_amax(tmp_path):
    """Tied residual-stream quantizers learn one amax; a resumed fit ties them again and equals the full fit."""
    from qat_rep.quant import QuantConfig

    class GentleResNetL(D.ResNetL):  # SGD at 0.05 drives learned weight amax below zero within two epochs
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    loaders = D.default_loaders(n_train=128)
    full, resumed, cb = _assert_resume_bit_identical("lightning.pytorch", GentleResNetL, loaders, tmp_path,
                                                     config=QuantConfig(learn_amax=True))
    groups = cb.state_dict()["scale_groups"]
    assert groups and all(len(g) > 1 for g in groups)
    for module in (full, resumed):
        for group in groups:
            lead = module.get_submodule(group[0])
            assert all(module.get_submodule(n) is lead for n in group)
    # without the tie the learned amax of one group's members drift apart during training
    state = full.state_dict()
    assert all(torch.equal(state[f"{g[0]}._amax"], state[f"{n}._amax"]) for g in groups for n in g)


def test_foreign_block_with_only_switch_to_deploy(tmp_path):
    from qat_rep.quant.foreign import foreign_blocks

    assert len(foreign_blocks(D.ForeignL())) == 3
    module, cb = _fit("lightning.pytorch", D.ForeignL, D.default_loaders(), tmp_path / "int8")
    blocks = [b for b in module.modules() if isinstance(b, D.ForeignRepBlock)]
    assert len(blocks) == 3 and all(not hasattr(b, "rbr_dense") for b in blocks)  # trained in fused form
    _assert_verified(cb, tmp_path / "int8")
