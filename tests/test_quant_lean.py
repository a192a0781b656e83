"""The lean quantized conv/linear step (:func:`qat_rep.quant.backend.quant_matmul`): the input saved as int8/uint8
plus a clip mask and ``Q(x)`` recomputed in backward — same outputs and gradients as the composition of the
quantizers' straight-through functions with the conv, fewer bytes kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qat_rep.quant.backend import make_quantizer, quant_matmul


def _quantizers(kind: str, unsigned: bool, out_ch: int):
    iq = make_quantizer(8, name="in")
    iq.set_amax(1.5)  # inputs are randn: values beyond 1.5 are clipped, so the mask matters
    if unsigned:
        iq = make_quantizer(8, unsigned=True, name="in")
        iq.set_amax(1.5)
    shape = (out_ch, 1, 1, 1) if kind == "conv" else (out_ch, 1)
    wq = make_quantizer(4, axis=0, amax_shape=shape, dynamic=True, name="w")
    return iq, wq


CASES = [("conv", dict(stride=1, padding=1, groups=1), False), ("conv", dict(stride=2, padding=1, groups=2), False),
         ("conv", dict(stride=1, padding=1, groups=1), True), ("linear", {}, False)]


def _composed(x, w, iq, wq, conf):
    if w.dim() == 2:
        return F.linear(iq(x), wq(w))
    return F.conv2d(iq(x), wq(w), None, conf["stride"], conf["padding"], 1, conf["groups"])


@pytest.mark.parametrize("kind,conf,unsigned", CASES)
def test_lean_gradients_equal_the_composed_path(kind, conf, unsigned):
    g = torch.Generator().manual_seed(0)
    if kind == "conv":
        x = torch.randn(3, 8, 9, 9, generator=g)
        w = torch.randn(12, 8 // conf["groups"], 3, 3, generator=g)
    else:
        x = torch.randn(5, 16, generator=g)
        w = torch.randn(7, 16, generator=g)
    if unsigned:
        x = x.relu()
    iq, wq = _quantizers(kind, unsigned, w.shape[0])
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    ya = quant_matmul(xa, wa, iq, wq, **conf)
    yb = _composed(xb, wb, iq, wq, conf)
    assert torch.equal(ya, yb)
    gy = torch.randn(ya.shape, generator=g)
    ga = torch.autograd.grad(ya, (xa, wa), gy)
    gb = torch.autograd.grad(yb, (xb, wb), gy)
    assert torch.equal(ga[0], gb[0]) and torch.equal(ga[1], gb[1])
    assert (ga[0] == 0).any() and (ga[0] != 0).any()  # some inputs were clipped, some not
    # gradcheck-style: the input gradient is the clipped straight-through one, the weight gradient the conv's
    scale = 1.5 / (255 if unsigned else 127)
    lo, hi = (0, 255) if unsigned else (-128, 127)
    inside = ((x / scale).round() >= lo) & ((x / scale).round() <= hi)
    xq = iq(x).detach().requires_grad_()
    want = torch.autograd.grad(_composed(xq, wq(w).detach(), lambda t: t, lambda t: t, conf), xq, gy)[0]
    assert torch.equal(ga[0], want * inside)


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_lean_step_keeps_fewer_bytes_for_backward():
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, requires_grad=True)
    iq, wq = _quantizers("conv", False, 16)
    lean = _saved_bytes(lambda: quant_matmul(x, w, iq, wq, 1, 1))
    composed = _saved_bytes(lambda: _composed(x, w, iq, wq, dict(stride=1, padding=1, groups=1)))
    # composed: float Q(x) (4 B) + clip mask (1 B) per input element; lean: int8 + mask (2 B)
    assert lean <= 0.45 * composed, (lean, composed)
    assert lean < x.numel() * 2.2


def test_lean_path_is_not_used_for_learned_amax():
    # LSQ quantizers need the gradient through the scale: the composition runs (and amax gets its gradient)
    iq = make_quantizer(8, learn_amax=True, name="in")
    iq.set_amax(1.5)
    wq = make_quantizer(8, axis=0, amax_shape=(4, 1, 1, 1), dynamic=True, name="w")
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    quant_matmul(x, w, iq, wq, 1, 1).sum().backward()
    assert iq._amax.grad is not None and iq._amax.grad.abs().sum() > 0


def test_rounding_bounds_and_stes_live_in_the_math_module_only():
    # qat_rep (every sub-package) and qat_rep.callbacks: no module but qat_rep/quant/qmath.py rounds, computes an
    # integer range from a bit width, or defines an autograd Function that rounds, clamps or floors (an STE). The
    # check is self-tested on a snippet that breaks each rule.
    import ast
    import pathlib
    import re

    import qat_rep
    import qat_rep.callbacks as cb

    line_rule = re.compile(r"torch\.round\(|\.round_?\(|torch\.floor\(|1 << \(num_bits|2(\.0)? \*\* \(num_bits|"
                           r"def _?q?bounds\(")

    def offences(source: str) -> list[str]:
        found = [ln.strip() for ln in source.splitlines()
                 if line_rule.search(ln) and not ln.strip().startswith(("#", '"', "``"))]
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("autograd.Function") for b in node.bases):
                body = ast.unparse(node)
                if re.search(r"\b(round|round_|clamp|clamp_|floor)\(", body):
                    found.append(f"class {node.name}: an autograd Function that rounds/clamps")
        return found

    bad = ("import torch\nclass S(torch.autograd.Function):\n    @staticmethod\n    def forward(ctx, x):\n"
           "        return x.clamp(0, 1)\n\ndef f(x, num_bits):\n    return torch.round(x), 1 << (num_bits - 1)\n")
    assert len(offences(bad)) == 2  # the rounding line and the Function (the bit range is on the same line)

    roots = [pathlib.Path(qat_rep.__file__).parent, pathlib.Path(cb.__file__).parent]
    math_module = roots[0] / "quant" / "qmath.py"
    result = {}
    for root in roots:
        for path in root.rglob("*.py"):
            if path != math_module:
                hits = offences(path.read_text())
                if hits:
                    result[str(path.relative_to(root.parent))] = hits
    assert not result, result
