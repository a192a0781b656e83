"""The GPU path: a CUDA run computes what the same run computes on the CPU.

``python -m pytest -q -m cuda`` runs these with the core's device-parametrized tests (the ``device`` fixture:
equivalent-kernel QAT, its gradients, ``convert``). Every test here is marked ``cuda`` (without a GPU each is skipped
with the reason) and ``slow`` (whole models run twice). TF32 is off while they run, so CUDA convolutions and
matmuls are full float32 like the CPU's.
"""

from __future__ import annotations

import copy
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F

from helpers import calib_batches, randomize_bn, tiny_rep_net
from qat_rep import create_model
from qat_rep.export import export_onnx, load_quantized, save_quantized, verify_onnx
from qat_rep.ptq import CFWSConfig, MinMaxConfig, PTQMethodConfig, quantize_ptq
from qat_rep.quant import QuantConfig, backend, calibrate, convert, is_calibrated, prepare, quantizers

pytestmark = [pytest.mark.cuda, pytest.mark.slow,  # CPU-vs-GPU runs of whole models: not the inner loop
              pytest.mark.usefixtures("one_thread")]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _full_float32() -> Iterator[None]:
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _prepared(arch: str = "qarepvgg_a0", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = create_model(arch, num_classes=10, small_input=True)
    randomize_bn(m, torch.Generator().manual_seed(seed), min_var=0.5)
    prepare(m, QuantConfig())
    return m


def _batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def _bulk_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """As CPU ``convert`` vs QAT form: a float-rounding difference may flip single roundings by one step; the bulk
    agrees and so does every top-1 decision."""
    close = torch.isclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert close.float().mean() > 0.9
    assert torch.equal(got.argmax(1), want.argmax(1))


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quant_and_its_gradient_on_cuda_equal_cpu_bit_for_bit(bits: int, per_channel: bool) -> None:
    x = 3 * torch.randn(16, 8, 5, 5, generator=torch.Generator().manual_seed(bits))
    axis, shape = (0, (16, 1, 1, 1)) if per_channel else (None, ())
    q = backend.make_quantizer(bits, axis, amax_shape=shape)
    q.set_amax(0.8 * (x.abs().amax(dim=(1, 2, 3)) if per_channel else x.abs().max()))  # some values clip
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    xc, xg = x.clone().requires_grad_(True), x.to(CUDA).requires_grad_(True)
    yc, yg = q(xc), copy.deepcopy(q).to(CUDA)(xg)
    assert yg.device.type == "cuda" and torch.equal(yg.cpu(), yc)
    (yc * w).sum().backward()
    (yg * w.to(CUDA)).sum().backward()
    assert torch.equal(xg.grad.cpu(), xc.grad)  # the same straight-through mask


@pytest.mark.parametrize("arch", ["repvgg_a0", "qarepvgg_a0"])
def test_calibration_and_a_qat_step_on_cuda_equal_cpu(arch: str) -> None:
    x, y = _batch()
    cpu = _prepared(arch)
    gpu = copy.deepcopy(cpu).to(CUDA)
    calibrate(cpu, [x])
    calibrate(gpu, [x.to(CUDA)])
    assert is_calibrated(gpu)
    for (name, qc), (_, qg) in zip(quantizers(cpu, "input"), quantizers(gpu, "input")):
        assert qg.amax.device.type == "cuda"
        torch.testing.assert_close(qg.amax.cpu(), qc.amax, rtol=1e-4, atol=0, msg=lambda s, n=name: f"{n}: {s}")
    cpu.train(), gpu.train()
    loss_c = F.cross_entropy(cpu(x), y)
    loss_g = F.cross_entropy(gpu(x.to(CUDA)), y.to(CUDA))
    assert float(loss_g.detach()) == pytest.approx(float(loss_c.detach()), rel=1e-3)
    loss_c.backward()
    loss_g.backward()
    gc = torch.cat([p.grad.flatten() for p in cpu.parameters() if p.grad is not None]).double()
    gg = torch.cat([p.grad.flatten().cpu() for p in gpu.parameters() if p.grad is not None]).double()
    assert gc.shape == gg.shape and float(gc.norm()) > 0
    assert float(F.cosine_similarity(gc, gg, dim=0)) > 0.999
    assert float((gc - gg).norm()) <= 0.02 * float(gc.norm())


@pytest.mark.parametrize("calibrator", ["percentile", "entropy", "mse"])
def test_histogram_calibration_and_unsigned_decisions_on_cuda_match_cpu(calibrator: str) -> None:
    # histograms are binned on the device (torch.histc), the threshold search runs on the CPU: a value on a bin edge
    # may fall into the neighbouring bin on the GPU, so thresholds agree to a few bins, not bit for bit
    x, _ = _batch()
    cpu = create_model("qarepvgg_a0", num_classes=10, small_input=True)
    randomize_bn(cpu, torch.Generator().manual_seed(0), min_var=0.5)
    prepare(cpu, QuantConfig(calibrator=calibrator, unsigned_activations=True, quantize_pools=True))
    gpu = copy.deepcopy(cpu).to(CUDA)
    calibrate(cpu, [x])
    calibrate(gpu, [x.to(CUDA)])
    pairs = list(zip(quantizers(cpu, "input"), quantizers(gpu, "input")))
    assert [qg.unsigned for _, (_, qg) in pairs] == [qc.unsigned for (_, qc), _ in pairs]
    assert any(qc.unsigned for (_, qc), _ in pairs) and not pairs[0][0][1].unsigned  # ReLU outputs; the image
    for (name, qc), (_, qg) in pairs:
        assert float(qg.amax) == pytest.approx(float(qc.amax), rel=0.02), name


def test_convert_on_cuda_equals_cpu() -> None:
    x, _ = _batch()
    cpu = _prepared()
    calibrate(cpu, [x])
    gpu = copy.deepcopy(cpu).to(CUDA)
    convert(cpu.eval())
    convert(gpu.eval())
    sc, sg = cpu.state_dict(), gpu.state_dict()
    assert sc.keys() == sg.keys()
    for k, v in sc.items():
        assert sg[k].device.type == "cuda", k
        if v.is_floating_point():
            assert float((sg[k].cpu() - v).abs().max()) <= 1e-4 * float(v.abs().max()) + 1e-7, k
        else:
            assert torch.equal(sg[k].cpu(), v), k
    with torch.no_grad():
        _bulk_close(gpu(x.to(CUDA)).cpu(), cpu(x))


def test_bf16_autocast_on_cuda_quantizes_on_the_float32_grid() -> None:
    x, _ = _batch()
    model = _prepared().to(CUDA)
    calibrate(model, [x.to(CUDA)])
    model.eval()
    _, q = quantizers(model, "input")[1]  # the second block's input: a bf16 conv output under autocast
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = q.register_forward_hook(lambda _m, args, out: seen.append((args[0].detach(), out.detach())))
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(x.to(CUDA))
    finally:
        hook.remove()
    assert seen and torch.isfinite(y).all()
    with torch.no_grad():
        for inp, out in seen:
            assert inp.dtype == out.dtype == torch.bfloat16  # autocast reached the quantizer
            assert torch.equal(out, q(inp.float()).to(torch.bfloat16))  # integers picked in float32


@pytest.mark.parametrize("method", [MinMaxConfig(), CFWSConfig(improved_kl=False)], ids=["minmax", "cfws"])
def test_ptq_on_cuda_equals_cpu(method: PTQMethodConfig) -> None:
    batches = calib_batches()
    qc, rc = quantize_ptq(tiny_rep_net(), batches, QuantConfig(), method)
    qg, rg = quantize_ptq(tiny_rep_net().to(CUDA), [(b[0].to(CUDA),) for b in batches], QuantConfig(), method)
    assert rg.layers == rc.layers
    assert rg.act_amax == pytest.approx(rc.act_amax, rel=1e-5)
    assert {v.device.type for v in qg.state_dict().values()} == {"cuda"}
    x = batches[0][0]
    with torch.no_grad():
        _bulk_close(qg(x.to(CUDA)).cpu(), qc(x))


def test_export_and_artifact_from_a_cuda_model(tmp_path) -> None:
    x, _ = _batch(16)
    model = _prepared("repvgg_a0").to(CUDA)
    calibrate(model, [x.to(CUDA)])
    model.eval()
    export_onnx(model, tmp_path / "model.onnx", x[:1].to(CUDA))
    result = verify_onnx(tmp_path / "model.onnx", model, [x.to(CUDA)])
    assert result.ok, result.failures
    loaded = load_quantized(save_quantized(model, tmp_path / "artifact", input_shape=(1, 3, 16, 16)))
    with torch.no_grad():
        _bulk_close(loaded(x), model(x.to(CUDA)).cpu())


def test_a_one_epoch_callback_fit_on_the_gpu() -> None:
    import qat_lit_modules as M
    from qat_rep.callbacks import RepQATCallback

    seen: dict[str, object] = {}

    class Watch(M.lp.Callback):
        def on_train_end(self, trainer, pl_module) -> None:
            seen["devices"] = {q.amax.device.type for _, q in quantizers(pl_module)}
            seen["calibrated"] = is_calibrated(pl_module)
            pl_module.eval()
            with torch.no_grad():
                seen["logits"] = pl_module(seen["x"].to(pl_module.device)).cpu()
            pl_module.train()

    torch.manual_seed(0)
    train, val = M.loaders()
    seen["x"] = next(iter(val))[0]
    module = M.ClassifierL()
    trainer = M.lp.Trainer(callbacks=[RepQATCallback(calib_batches=1), Watch()],
                           **M.trainer_kwargs(accelerator="gpu", max_epochs=1, deterministic=False,
                                              enable_checkpointing=False))
    trainer.fit(module, train, val)
    assert seen["devices"] == {"cuda"} and seen["calibrated"]
    module.cpu().eval()  # the model trained on the GPU computes the same on the CPU
    with torch.no_grad():
        _bulk_close(module(seen["x"]), seen["logits"])
