"""RepQATCallback in real Trainer fits on CPU: both Lightning flavors, multi-input forward, second fit, pruning,
calibration edge cases, metrics, distillation, export."""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))

import qat_lit_modules as M  # noqa: E402
from qat_rep.blocks import RepBlock  # noqa: E402
from qat_rep.callbacks import DistillConfig, RepQATCallback  # noqa: E402
from qat_rep.callbacks.distill import logit_kd_loss  # noqa: E402
from qat_rep.quant import NotCalibratedError, QuantConfig  # noqa: E402
from qat_rep.quant.rep_qat import RepQuant  # noqa: E402
from qat_rep.quant.calibrate import is_calibrated  # noqa: E402
from qat_rep.quant.insert import quantizers  # noqa: E402
from qat_rep.quant.backend import QuantConv2d, QuantLinear  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]


def _fit(flavor, module, callbacks, train, val=None, **kw):
    lib = M.FLAVORS[flavor]
    kw.setdefault("max_epochs", 1)
    kw.setdefault("enable_checkpointing", False)
    trainer = lib.Trainer(callbacks=callbacks, **M.trainer_kwargs(**kw))
    trainer.fit(module, train, val)
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("flavor", ["pytorch_lightning", "lightning.pytorch"])
def test_multi_input_module_trains_under_both_flavors(flavor):
    M.FLAVORS[flavor].seed_everything(0)
    train, val = M.loaders(multi_input=True)
    module = M.MULTI_INPUT[flavor]()
    forward_before = type(module).forward
    cb = RepQATCallback(calib_batches=2, calib_forward=M.multi_input_forward)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    # with a sanity check: it runs before calibration (training batches are not loaded yet), in floating point
    _fit(flavor, module, [cb], train, val, max_epochs=1, limit_train_batches=3, num_sanity_val_steps=1)

    # surgery happened in place, forward untouched
    assert "forward" not in vars(module) and type(module).forward is forward_before
    blocks = [m for m in module.modules() if isinstance(m, RepBlock)]
    assert len(blocks) == 4 and all(isinstance(b.rep_quant, RepQuant) for b in blocks)
    assert isinstance(module.net.stem[0], QuantConv2d) and isinstance(module.aux_proj, QuantLinear)
    assert is_calibrated(module) and cb.calib_report.batches == 2
    assert cb.phases == {f"net.blocks.{i}": "fused" for i in range(4)}  # the default schedule
    assert all(not q._disabled for _, q in quantizers(module))  # the sanity check's float mode was undone
    # the weights trained (the branch parameters of a rep block receive gradients through the equivalent kernel)
    after = module.state_dict()
    assert not torch.equal(before["net.blocks.0.rbr_dense.conv.weight"], after["net.blocks.0.rbr_dense.conv.weight"])
    assert not torch.equal(before["net.blocks.2.rbr_1x1.conv.weight"], after["net.blocks.2.rbr_1x1.conv.weight"])
    # side-by-side metrics through the step-output contract
    assert set(cb.metrics) == {"val_acc_fakequant", "val_acc_fp32"}
    assert all(0.0 <= v <= 1.0 for v in cb.metrics.values())
    # the model still takes two tensors and a keyword argument
    x, aux, _ = next(iter(val))
    module.eval()
    assert module(x, aux, scale=0.5).shape == (len(x), 10)


@pytest.mark.slow
def test_fp32_accuracy_is_the_unquantized_model_and_differs_from_fake_quant():
    torch.manual_seed(0)
    train, val = M.loaders(n_train=32)
    module = M.ClassifierPL()
    cb = RepQATCallback(config=QuantConfig(w_bits=2, a_bits=2, first_last_8bit=False), calib_batches=2)
    _fit("pytorch_lightning", module, [cb], train, val, max_epochs=1)
    module.eval()
    x = torch.cat([b[0] for b in val])
    y = torch.cat([b[1] for b in val])
    from qat_rep.callbacks.metrics import quantizers_disabled

    with torch.no_grad():
        fq = (module(x).argmax(1) == y).float().mean().item()
        with quantizers_disabled(module):
            fp = (module(x).argmax(1) == y).float().mean().item()
        fq_logits = module(x)
        with quantizers_disabled(module):
            fp_logits = module(x)
    assert cb.metrics["val_acc_fakequant"] == pytest.approx(fq, abs=1e-6)
    assert cb.metrics["val_acc_fp32"] == pytest.approx(fp, abs=1e-6)
    assert not torch.allclose(fq_logits, fp_logits)  # 2-bit fake quant really changes the output
    assert all(not q._disabled for _, q in quantizers(module))  # the context restored every quantizer


@pytest.mark.slow
def test_second_fit_continues_without_recalibrating():
    torch.manual_seed(0)
    train, val = M.loaders(n_train=32)
    module = M.ClassifierPL()
    cb = RepQATCallback(calib_batches=1)
    _fit("pytorch_lightning", module, [cb], train, val)
    amax = {n: q.amax.clone() for n, q in quantizers(module, "input")}
    w = module.model.blocks[0].rbr_dense.conv.weight.clone()
    cb2 = RepQATCallback(calib_batches=1)
    _fit("pytorch_lightning", module, [cb2], train, val)
    assert cb2.calib_report is None  # already calibrated: kept its ranges
    assert all(torch.equal(amax[n], q.amax) for n, q in quantizers(module, "input"))
    assert not torch.equal(w, module.model.blocks[0].rbr_dense.conv.weight)  # and trained on


@pytest.mark.slow
def test_second_fit_with_other_config_refuses():
    train, _ = M.loaders(n_train=16)
    module = M.ClassifierPL()
    _fit("pytorch_lightning", module, [RepQATCallback(calib_batches=1)], train)
    with pytest.raises(ValueError, match="different QuantConfig.*w_granularity"):
        _fit("pytorch_lightning", module, [RepQATCallback(QuantConfig(w_granularity="per_tensor"))], train)


@pytest.mark.slow
@pytest.mark.parametrize("flavor", ["pytorch_lightning", "lightning.pytorch"])
def test_model_pruning_is_refused(flavor):
    lib = M.FLAVORS[flavor]
    train, _ = M.loaders(n_train=16)
    with pytest.raises(ValueError, match="cannot be combined with ModelPruning"):
        _fit(flavor, M.MODULES[flavor](), [RepQATCallback(), lib.callbacks.ModelPruning("l1_unstructured", amount=0.5)],
             train)


@pytest.mark.slow
def test_module_without_conv_or_linear_is_refused():
    train, _ = M.loaders(n_train=16)
    with pytest.raises(ValueError, match="NoConvPL has no nn.Conv2d, nn.Linear or rep block"):
        _fit("pytorch_lightning", M.NoConvPL(), [RepQATCallback()], train)


@pytest.mark.slow
def test_calib_batches_larger_than_loader_warns_and_uses_what_exists():
    train, _ = M.loaders(n_train=32, batch_size=16)  # 2 batches
    module = M.ClassifierPL()
    cb = RepQATCallback(calib_batches=5)
    with pytest.warns(UserWarning, match="calib_batches=5 but only 2 training step"):
        _fit("pytorch_lightning", module, [cb], train)
    assert cb.calib_report.batches == 2 and is_calibrated(module)


def test_validate_before_any_fit_refuses_uncalibrated_model():
    _, val = M.loaders(n_val=16)
    trainer = M.pl.Trainer(callbacks=[RepQATCallback()], **M.trainer_kwargs())
    with pytest.raises(NotCalibratedError, match="uncalibrated quantizers"):
        trainer.validate(M.ClassifierPL(), val)


@pytest.mark.slow
def test_calibration_does_not_shift_the_random_stream():
    """With ``calib_forward`` the callback reads extra calibration batches at train start: that must not move the RNG
    (a resumed fit, which does not calibrate, must see the same stream). The default calibrates inside the training
    steps themselves and reads nothing extra."""

    class Probe(M.pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.state = torch.get_rng_state()

    states = []
    for n in (1, 3):
        train, _ = M.loaders(n_train=48)
        module, probe, cb = M.ClassifierPL(), Probe(), RepQATCallback(calib_batches=n, calib_forward=lambda m, b: m(b[0]))
        torch.manual_seed(123)
        _fit("pytorch_lightning", module, [cb, probe], train, limit_train_batches=1)
        assert cb.calib_report.batches == n
        states.append(probe.state)
    assert torch.equal(states[0], states[1])


# ------------------------------------------------------------------------------------------------ distillation
def test_kd_gradient_hook_equals_gradient_of_the_summed_loss():
    from qat_rep.callbacks.distill import Distiller

    torch.manual_seed(0)
    student = M.TinyRepNet()
    teacher = M.TinyRepNet().eval()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    cfg = DistillConfig(temperature=3.0, logit_weight=0.7, features={"blocks.1": "blocks.1"}, feature_weight=2.0)
    ref = copy.deepcopy(student)

    d = Distiller(teacher, cfg)
    d.attach(student)
    d.begin_batch()
    F.cross_entropy(student(x), y).backward()
    d.end_batch()

    feats = {}
    h = ref.blocks[1].register_forward_hook(lambda m, a, o: feats.__setitem__("s", o))
    out = ref(x)
    h.remove()
    with torch.no_grad():
        t_feat = teacher.blocks[1](teacher.blocks[0](teacher.stem(x)))
        t_out = teacher(x)
    from qat_rep.callbacks.distill import channel_kd_loss

    loss = F.cross_entropy(out, y) + 0.7 * logit_kd_loss(out, t_out, 3.0) + 2.0 * channel_kd_loss(feats["s"], t_feat)
    loss.backward()
    for (n, p), (_, q) in zip(student.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n
    assert set(d.last_losses) == {"kd_logit", "kd_feature"}


@pytest.mark.slow
def test_fit_with_teacher_logs_kd_and_changes_the_update():
    torch.manual_seed(0)
    train, _ = M.loaders(n_train=32)
    base = M.ClassifierPL()
    teacher = copy.deepcopy(base.model).eval()
    m_plain, m_kd = copy.deepcopy(base), copy.deepcopy(base)
    _fit("pytorch_lightning", m_plain, [RepQATCallback(calib_batches=1)], train)
    cb = RepQATCallback(calib_batches=1, teacher=teacher, distill=DistillConfig(student="model", logit_weight=5.0))
    trainer = _fit("pytorch_lightning", m_kd, [cb], train)
    assert "qat/kd_logit_epoch" in trainer.callback_metrics
    assert torch.isfinite(trainer.callback_metrics["qat/kd_logit_epoch"])
    w_plain = m_plain.model.blocks[0].rbr_dense.conv.weight
    w_kd = m_kd.model.blocks[0].rbr_dense.conv.weight
    assert not torch.allclose(w_plain, w_kd)
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.slow
def test_teacher_with_other_output_shape_is_refused():
    train, _ = M.loaders(n_train=16)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 7))
    cb = RepQATCallback(teacher=teacher)
    with pytest.raises(ValueError, match=r"shape \(16, 7\) of the teacher does not match the student's \(16, 10\)"):
        _fit("pytorch_lightning", M.ClassifierPL(), [cb], train)


@pytest.mark.slow
def test_teacher_inside_the_module_is_refused():
    module = M.ClassifierPL()
    train, _ = M.loaders(n_train=16)
    with pytest.raises(ValueError, match="teacher is a submodule of the LightningModule"):
        _fit("pytorch_lightning", module, [RepQATCallback(teacher=module.model)], train)


@pytest.mark.slow
def test_unknown_feature_module_is_refused():
    train, _ = M.loaders(n_train=16)
    cb = RepQATCallback(teacher=M.TinyRepNet(), distill=DistillConfig(student="model", features={"model.nope": "blocks"}))
    with pytest.raises(ValueError, match="student feature module 'model.nope' does not exist"):
        _fit("pytorch_lightning", M.ClassifierPL(), [cb], train)


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.slow
def test_fit_end_exports_a_deploy_artifact(tmp_path):
    from qat_rep.export import load_quantized

    torch.manual_seed(0)
    train, val = M.loaders(n_train=16, n_val=16)
    module = M.ClassifierPL(arch="qarepvgg_a0")
    cb = RepQATCallback(calib_batches=1, export_dir=tmp_path / "deploy")
    _fit("pytorch_lightning", module, [cb], train, limit_train_batches=1)
    assert cb.deploy_report.out_dir == tmp_path / "deploy" and cb.deploy_report.rebuildable
    deployed = load_quantized(tmp_path / "deploy")
    x = next(iter(val))[0]
    module.eval()
    with torch.no_grad():
        diff = (deployed(x) - module(x)).abs().max().item()
        scale = module(x).abs().max().item()
    # the same INT8 network in fused form; folding moves a few weights across a rounding boundary (measured 0.7%)
    assert diff <= 0.02 * scale
    assert all(not isinstance(m, RepBlock) or m.rep_quant is not None for m in module.modules())  # live model kept


@pytest.mark.slow
def test_fit_end_saves_models_without_spec_in_the_one_artifact_format(tmp_path):
    from safetensors.torch import load_file

    from qat_rep.export import load_quantized
    from qat_rep.export.artifact import read_metadata

    train, _ = M.loaders(n_train=16)
    module = M.ClassifierPL()  # TinyRepNet: qat_rep cannot rebuild it by name
    cb = RepQATCallback(calib_batches=1, export_dir=tmp_path / "out")
    _fit("pytorch_lightning", module, [cb], train, limit_train_batches=1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "model.safetensors", "model_int8.onnx", "onnx_verify.json", "qat_rep.json"]
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "model.blocks.0.rbr_reparam.weight" in state and "model.blocks.0.rbr_dense.conv.weight" not in state
    assert "model.blocks.0.bn.weight" not in state  # post-BN folded
    assert "model.blocks.0.rbr_reparam._input_quantizer._amax" in state
    meta = read_metadata(tmp_path / "out")
    assert meta["quant_config"] == cb.config.to_dict() and not cb.deploy_report.rebuildable
    assert meta["model"] == {"name": None, "class": "qat_lit_modules.ClassifierPL"}
    with pytest.raises(ValueError, match="which qat_rep cannot rebuild by name. Build that model"):
        load_quantized(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["onnxruntime", "tensorrt"])
def test_fit_end_writes_a_verified_qdq_onnx_file(tmp_path, layout):
    import onnx
    from pytorch_lightning.loggers import CSVLogger

    from qat_rep.export import verify_onnx
    from qat_rep.export.artifact import read_metadata
    from qat_rep.export.onnx_export import quantized_node_names
    from qat_rep.quant.insert import quant_layers

    torch.manual_seed(0)
    train, val = M.loaders(n_train=16, n_val=32)
    module = M.ClassifierPL(arch="qarepvgg_a0")
    cb = RepQATCallback(calib_batches=1, export_dir=tmp_path / "deploy", onnx=layout, verify_batches=1)
    _fit("pytorch_lightning", module, [cb], train, val, limit_train_batches=1,
         logger=CSVLogger(str(tmp_path / "logs"), name="run"))
    path = tmp_path / "deploy" / "model_int8.onnx"
    assert cb.onnx_path == path and path.is_file()
    assert read_metadata(tmp_path / "deploy")["input_shape"] == [1, 3, M.IMAGE, M.IMAGE]  # one validation sample
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    names = quantized_node_names(path)
    layers = quant_layers(module.model)
    assert len(names) == len(layers) and all(w and x for w, x in names.values())  # Q/DQ on weights and inputs
    int32_biases = any(t.data_type == onnx.TensorProto.INT32 for t in graph.initializer)
    assert int32_biases == (layout == "onnxruntime")  # the layout asked for: ORT's holds INT32 biases
    # the check ran on the first validation batch (verify_batches=1) against the trained fake-quant model (the
    # exactness bound itself is measured on a trained model in test_export_onnx.py; this one trained one step)
    r = cb.verify_result  # on the recorded calls of the first validation batch: the same inputs, no labels
    ref = verify_onnx(path, module.model, val, max_batches=1)
    assert (r.samples, r.agreement, r.max_abs_diff) == (ref.samples, ref.agreement, ref.max_abs_diff)
    assert r.ort_accuracy is None
    assert r.samples == 16 and r.agreement >= 0.995
    saved = json.loads((tmp_path / "deploy" / "onnx_verify.json").read_text())
    assert saved["layout"] == layout and saved["data"] == "validation" and saved["agreement"] == r.agreement
    metrics = (tmp_path / "logs" / "run" / "version_0" / "metrics.csv").read_text()
    assert "qat/onnx_agreement" in metrics and "qat/onnx_max_diff_steps" in metrics


@pytest.mark.slow
def test_fit_end_onnx_can_be_turned_off_and_is_skipped_below_8_bits(tmp_path):
    train, val = M.loaders(n_train=16, n_val=16)
    off = RepQATCallback(calib_batches=1, export_dir=tmp_path / "off", onnx=None)
    _fit("pytorch_lightning", M.ClassifierPL(), [off], train, val, limit_train_batches=1)
    earlier = RepQATCallback(calib_batches=1, export_dir=tmp_path / "w4")  # an earlier W8A8 run's artifact:
    _fit("pytorch_lightning", M.ClassifierPL(), [earlier], train, val, limit_train_batches=1)
    assert (tmp_path / "w4" / "model_int8.onnx").is_file()  # its ONNX file must not survive beside new weights
    w4 = RepQATCallback(QuantConfig(w_bits=4, a_bits=4), calib_batches=1, export_dir=tmp_path / "w4")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # skipping 4-bit ONNX is expected: no warning
        warnings.filterwarnings("ignore", message=r".*(does not have many workers|sync_dist|LeafSpec).*")
        _fit("pytorch_lightning", M.ClassifierPL(), [w4], train, val, limit_train_batches=1)
    for cb, d in ((off, "off"), (w4, "w4")):
        assert cb.onnx_path is None and cb.verify_result is None
        assert (tmp_path / d / "model.safetensors").is_file()
        assert not (tmp_path / d / "model_int8.onnx").exists() and not (tmp_path / d / "onnx_verify.json").exists()


class _MLP(M.pl.LightningModule):
    """Linear → ReLU → Linear: under autocast the second layer's input arrives in bf16 (no BN or bias add between
    them promotes it back to float32, as happens inside rep blocks)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * M.IMAGE * M.IMAGE, 64),
                                       torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.slow
def test_bf16_mixed_training_quantizes_on_the_float32_grid():
    torch.manual_seed(0)
    train, _ = M.loaders(n_train=32)
    module, seen, hooks = _MLP(), [], []

    class Watch(M.pl.Callback):  # after setup: hook the second layer's input quantizer in the live model
        def on_train_start(self, trainer, pl_module):
            hooks.append(pl_module.net[3]._input_quantizer.register_forward_hook(
                lambda m, a, out: seen.append((m, a[0].detach(), out.detach()))))

    _fit("pytorch_lightning", module, [RepQATCallback(calib_batches=1), Watch()], train, limit_train_batches=2,
         precision="bf16-mixed")
    hooks[0].remove()
    assert len(seen) == 2
    (_, x0, out0), (q, x, out) = seen
    assert torch.equal(out0, x0)  # step 1 calibrates: the quantizer observes and passes float through
    assert x.dtype == out.dtype == torch.bfloat16  # autocast reached the quantizer
    with torch.no_grad():
        assert torch.equal(out, q(x.float()).to(torch.bfloat16))  # integers picked in float32


@pytest.mark.slow
def test_export_warns_when_blocks_never_entered_qat(tmp_path):
    from qat_rep.quant import Schedule

    train, val = M.loaders(n_train=16, n_val=16)
    cb = RepQATCallback(calib_batches=1, schedule=Schedule.all_at_once(qat_at=5), export_dir=tmp_path / "out",
                        onnx=None)
    with pytest.warns(UserWarning, match=r"4 rep block\(s\) were still float multi-branch .* never moved them to QAT"):
        _fit("pytorch_lightning", M.ClassifierPL(), [cb], train, val, limit_train_batches=1)
    assert set(cb.phases.values()) == {"float"}
    assert (tmp_path / "out" / "model.safetensors").is_file()  # exported all the same, as documented


@pytest.mark.slow
def test_fit_end_onnx_failure_warns_and_keeps_the_deploy_checkpoint(tmp_path, monkeypatch):
    import importlib

    deploy_module = importlib.import_module("qat_rep.export.deploy")  # the module (the package exports the function)

    def failing_export(*args, **kwargs):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(deploy_module, "export_onnx", failing_export)
    train, val = M.loaders(n_train=16, n_val=16, multi_input=True)
    cb = RepQATCallback(calib_batches=1, calib_forward=M.multi_input_forward, export_dir=tmp_path / "out")
    with pytest.warns(UserWarning, match=r"no ONNX file: the export failed \(RuntimeError: exporter broke\)"):
        _fit("pytorch_lightning", M.MultiInputPL(), [cb], train, val, limit_train_batches=1)
    assert cb.deploy_report.problems and (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "model_int8.onnx").exists() and cb.onnx_path is None
    assert not list((tmp_path / "out").glob("*.tmp*"))


@pytest.mark.slow
def test_export_module_that_does_not_exist_is_refused_at_setup(tmp_path):
    train, _ = M.loaders(n_train=16)
    cb = RepQATCallback(export_dir=tmp_path, export_module="backbone")
    with pytest.raises(ValueError, match="export_module 'backbone' does not exist in ClassifierPL"):
        _fit("pytorch_lightning", M.ClassifierPL(), [cb], train)


@pytest.mark.slow
def test_unknown_student_module_is_refused_at_setup():
    train, _ = M.loaders(n_train=16)
    cb = RepQATCallback(teacher=M.TinyRepNet(), distill=DistillConfig(student="net"))
    with pytest.raises(ValueError, match=r"student module \(DistillConfig.student\) 'net' does not exist"):
        _fit("pytorch_lightning", M.ClassifierPL(), [cb], train)


# ------------------------------------------------------------------------------------------------ Distiller units
class _TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(4, 3)
        self.unused = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.used(x)


class _TupleOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x), x


def _distil_once(student, teacher, cfg, loss_fn):
    from qat_rep.callbacks.distill import Distiller

    d = Distiller(teacher, cfg)
    d.attach(student)
    d.begin_batch()
    loss_fn(student(torch.randn(2, 4))).backward()
    d.end_batch()


def test_kd_that_never_reaches_the_loss_is_an_error():
    student = _TwoHeads()
    with pytest.raises(RuntimeError, match="received no gradient in this training step"):
        _distil_once(student, _TwoHeads(), DistillConfig(), lambda out: student.used.weight.sum())


def test_logit_kd_needs_tensor_outputs():
    with pytest.raises(TypeError, match="logit distillation needs the student and the teacher to return one tensor"):
        _distil_once(_TupleOut(), _TupleOut(), DistillConfig(), lambda out: out[0].sum())


def test_feature_kd_on_a_module_that_does_not_run_is_an_error():
    cfg = DistillConfig(logit_weight=0, features={"unused": "unused"})
    with pytest.raises(RuntimeError, match="no tensor output recorded for student module 'unused'"):
        _distil_once(_TwoHeads(), _TwoHeads(), cfg, lambda out: out.sum())


def test_channel_kd_needs_feature_maps():
    from qat_rep.callbacks.distill import channel_kd_loss

    with pytest.raises(ValueError, match=r"needs \[N, C, ...\] feature maps, got shape \(2, 3\)"):
        channel_kd_loss(torch.randn(2, 3), torch.randn(2, 3))
    x = torch.randn(2, 3, 4, 4)
    assert channel_kd_loss(x, x).abs() < 1e-6 and channel_kd_loss(x, torch.randn(2, 3, 4, 4)) > 0


def test_load_qat_checkpoint_needs_a_lightning_module_class(tmp_path):
    from qat_rep.callbacks import load_qat_checkpoint

    with pytest.raises(TypeError, match="module_class must be a LightningModule subclass"):
        load_qat_checkpoint(torch.nn.Linear, tmp_path / "x.ckpt")
