"""``QuantConfig.recompute_post_bn``: a rep block's trainable post-BN (QARepVGG) keeps no float activation for
backward — :class:`qat_rep.quant.qmath.LeanQuantConvBN` runs the block's conv again in backward — with the same
outputs, gradients and running statistics as the ordinary step, bit for bit; ``"cheap"`` (the default) selects the
blocks whose conv costs little per output element, ``"all"`` every one, ``"never"`` none."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import prepared_a0
from qat_rep.quant import QuantConfig
from qat_rep.quant import qmath as qm


def _prepared(phase: str, granularity: str = "per_channel", momentum: float | None = 0.1,
              recompute_post_bn: str = "never", **config) -> nn.Module:
    model, _ = prepared_a0("qarepvgg_a0", phase, QuantConfig(w_granularity=granularity,
                                                             recompute_post_bn=recompute_post_bn, **config))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum  # read at every training forward
    return model


def _recomputing(model: nn.Module) -> nn.Module:
    other = copy.deepcopy(model)
    for m in other.modules():
        if hasattr(m, "recompute_post_bn"):
            m.recompute_post_bn = True
    return other


def _steps(model: nn.Module, n: int = 2) -> list[tuple]:
    """``n`` SGD steps; per step the logits, the input gradient and every parameter gradient."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(4, 3, 16, 16, generator=g).requires_grad_()
        logits = model(x)
        opt.zero_grad(set_to_none=True)
        logits.mul(torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)).sum().backward()
        out.append((logits.detach(), x.grad, {k: p.grad.clone() for k, p in model.named_parameters()
                                              if p.grad is not None}))
        opt.step()
    return out


def _calls(monkeypatch) -> list[int]:
    calls = []
    apply = qm.LeanQuantConvBN.apply

    def counting(*args):
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(qm.LeanQuantConvBN, "apply", counting)
    return calls


@pytest.mark.parametrize("phase", ["qat", "frozen", "fused"])
@pytest.mark.parametrize("granularity,momentum", [("per_channel", 0.1), ("per_tensor", 0.1),
                                                  ("per_tensor", None)])
def test_recomputed_post_bn_steps_equal_the_ordinary_steps(monkeypatch, phase, granularity, momentum):
    # per-tensor weights fold the post-BN scale t into the kernel (t gets gradients from the conv and the
    # division); per-channel weights leave it out; momentum=None is BatchNorm's cumulative average
    model = _prepared(phase, granularity, momentum)
    other = _recomputing(model)
    calls = _calls(monkeypatch)
    a, b = _steps(model), _steps(other)
    blocks = sum(1 for m in model.modules() if getattr(m, "rep_quant", None) is not None)
    assert blocks == 22 and len(calls) == 2 * blocks  # every QARep block ran the recomputing function, both steps
    for (ya, xa, ga), (yb, xb, gb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
        assert ga.keys() == gb.keys() and len(ga) > 10
        assert [k for k in ga if not torch.equal(ga[k], gb[k])] == []
    sa, sb = model.state_dict(), other.state_dict()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []  # weights after 2 steps, running stats, counts


def _saved_float_bytes(model: nn.Module, fn) -> int:
    """Bytes of the float activations autograd keeps for backward while ``fn()`` runs (the model's parameters and
    buffers, which backward may read anyway, excluded)."""
    seen: dict[int, int] = {}
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if t.is_floating_point() and t.dim() == 4 and key not in owned:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


@pytest.mark.parametrize("phase", ["qat", "fused"])
def test_recompute_keeps_no_float_activation_for_the_post_bn(phase):
    model = _prepared(phase)
    other = _recomputing(model)
    x = torch.randn(8, 3, 16, 16)
    ordinary = _saved_float_bytes(model, lambda: model(x))
    lean = _saved_float_bytes(other, lambda: other(x))
    # ordinary: each block's post-BN keeps its float input; recomputing: at most the global pool's float input
    # (the last block's output, 8 x 1280 x 1 x 1 here)
    assert ordinary > 0 and lean <= 8 * 1280 * 4 < 0.1 * ordinary, (lean, ordinary)


def test_recompute_steps_aside_for_hooks_learned_ranges_and_evaluation(monkeypatch):
    model = _recomputing(_prepared("fused"))
    calls = _calls(monkeypatch)
    x = torch.randn(4, 3, 16, 16)
    model.eval()(x)
    assert calls == []  # evaluation runs the deployed conv, no BatchNorm at all
    model.train()
    seen = []
    bn = next(m.bn for m in model.modules() if getattr(m, "bn", None) is not None and hasattr(m, "rep_quant"))
    handle = bn.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    model(x).sum().backward()
    handle.remove()
    assert len(seen) == 1 and len(calls) > 0  # the hooked post-BN ran as a module, the others recomputed
    calls.clear()
    lsq = _recomputing(_prepared("fused", learn_amax=True))
    lsq(x).sum().backward()
    assert calls == []  # a learned input range keeps the ordinary step


def test_cheap_recomputes_the_blocks_with_little_compute_per_output_element():
    from qat_rep.quant.config import CHEAP_RECOMPUTE_MACS

    def chosen(mode):
        model = _prepared("qat", recompute_post_bn=mode)
        return {n for n, m in model.named_modules() if getattr(m, "recompute_post_bn", False)}, model

    cheap, model = chosen("cheap")
    every = {f"{n}.rep_quant" for n, m in model.named_modules() if getattr(m, "rep_quant", None) is not None}
    # QARepVGG-A0: the stem's 3x3 conv on RGB costs 27 multiply-adds per output element, every other block >= 432
    costs = {f"{n}.rep_quant": m.equivalent_kernel_bias()[0][0].numel() for n, m in model.named_modules()
             if getattr(m, "rep_quant", None) is not None}
    assert cheap == {n for n, c in costs.items() if c <= CHEAP_RECOMPUTE_MACS} == {"stage0.rep_quant"}
    assert chosen("all")[0] == every and len(every) == 22 and chosen("never")[0] == set()


def test_recompute_post_bn_is_one_of_three_names():
    with pytest.raises(ValueError, match="recompute_post_bn must be one of never, cheap, all.*did you mean 'cheap'"):
        QuantConfig(recompute_post_bn="cheep")
    with pytest.raises(ValueError, match="recompute_post_bn must be one of"):
        QuantConfig(recompute_post_bn=True)
    assert QuantConfig().recompute_post_bn == "cheap"
