"""The lean quantized conv/linear step (:func:`qat_rep.quant.backend.quant_matmul`): the input saved as int8/uint8
plus a bit-packed clip mask and rebuilt in backward; the fake-quantized kernel recomputed in backward from its source
(a parameter, a rep block's branches) or, for a computed kernel without one, kept as int8 + its scale; and the block
ReLUs of a prepared model kept as bit masks (``LeanReLU``) — same outputs and gradients as the composition of the
quantizers' straight-through functions with the conv and ``torch.relu``, fewer bytes kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qat_rep.quant.backend import LeanReLU, make_quantizer, quant_matmul


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
         ("conv", dict(stride=1, padding=1, groups=1), True), ("linear", {}, False),
         ("kernel_bound", dict(stride=2, padding=1, groups=1), False)]


def _composed(x, w, iq, wq, conf):
    from qat_rep.quant import qmath as qm
    if w.dim() == 2:
        return F.linear(iq(x), wq(w))
    return qm.conv_or_linear(iq(x), wq(w), conf["stride"], conf["padding"], 1, conf["groups"])


@pytest.mark.parametrize("kind,conf,unsigned", CASES)
def test_lean_gradients_equal_the_composed_path(kind, conf, unsigned):
    g = torch.Generator().manual_seed(0)
    if kind == "conv":
        x = torch.randn(3, 8, 9, 9, generator=g)
        w = torch.randn(12, 8 // conf["groups"], 3, 3, generator=g)
    elif kind == "kernel_bound":  # 3 x 5 x 5 = 75 output positions, 96 channels: the conv runs as one GEMM
        x = torch.randn(3, 8, 9, 9, generator=g)
        w = torch.randn(96, 8, 3, 3, generator=g)
    else:
        x = torch.randn(5, 16, generator=g)
        w = torch.randn(7, 16, generator=g)
    if unsigned:
        x = x.relu()
    iq, wq = _quantizers("linear" if kind == "linear" else "conv", unsigned, w.shape[0])
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


def _lean_and_composed(x, w, iq, wq, conf, parameter=False):
    """One step through quant_matmul and one through the composition, from the same x and w (a Parameter when
    ``parameter``): ``(y, dx, dw, d input amax, d weight amax)`` each, amax gradients None when not learned."""
    steps = []
    for lean in (True, False):
        xa = x.clone().requires_grad_()
        wa = torch.nn.Parameter(w.clone()) if parameter else w.clone().requires_grad_()
        for q in (iq, wq):
            q._amax.grad = None
        y = quant_matmul(xa, wa, iq, wq, **conf) if lean else _composed(
            xa, wa, iq, wq, dict(stride=1, padding=conf.get("padding", 0), groups=1))
        y.mul(torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        steps.append((y.detach(), xa.grad, wa.grad,
                      *(None if q._amax.grad is None else q._amax.grad.clone() for q in (iq, wq))))
    return steps


@pytest.mark.parametrize("wkind", ["dynamic", "lsq"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("unsigned", [False, True])
def test_lean_lsq_step_equals_the_composed_path(wkind, kind, unsigned):
    # a learned-amax (LSQ) input quantizer: only the float input is kept; the gradients to the input, the weight
    # and the input amax equal the composition's bit for bit
    g = torch.Generator().manual_seed(3)
    if kind == "conv":
        x, w, conf = torch.randn(3, 6, 7, 7, generator=g), torch.randn(8, 6, 3, 3, generator=g), dict(padding=1)
    else:
        x, w, conf = torch.randn(5, 12, generator=g), torch.randn(7, 12, generator=g), {}
    if unsigned:
        x = x.relu()
    iq = make_quantizer(4, learn_amax=True, unsigned=unsigned, name="in")
    iq.set_amax(1.2)  # some inputs clipped
    wq = _weight_quantizer(wkind, w)
    (ya, *ga), (yb, *gb) = _lean_and_composed(x, w, iq, wq, conf)
    assert torch.equal(ya, yb)
    for a, b in zip(ga, gb):
        assert (a is None and b is None) or torch.equal(a, b)
    assert ga[2] != 0 and (ga[0] == 0).any() and (ga[0] != 0).any()  # amax learns; some inputs clipped
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    kept = [k for k in _saved_dtypes(lambda: quant_matmul(xa, wa, iq, wq, **conf)) if k[1] == x.numel()]
    assert kept == [(torch.float32, x.numel())]  # the input once, nothing else of its size


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


def _weight_quantizer(wkind: str, w):
    shape = (w.shape[0],) + (1,) * (w.dim() - 1)
    if wkind == "dynamic":
        return make_quantizer(4, axis=0, amax_shape=shape, dynamic=True, name="w")
    if wkind == "fixed_channel":  # torch.fake_quantize_per_channel_affine, some weights clipped
        q = make_quantizer(8, axis=0, amax_shape=shape, name="w")
        q.set_amax(w.detach().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) * 0.7)
        return q
    if wkind == "fixed_tensor":  # the clipped per-tensor STE
        q = make_quantizer(6, name="w")
        q.set_amax(w.detach().abs().max() * 0.6)
        return q
    q = make_quantizer(4, axis=0, amax_shape=shape, learn_amax=True, name="w")  # LSQ weights
    q.set_amax(w.detach().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) * 0.8)
    return q


@pytest.mark.parametrize("wkind", ["dynamic", "fixed_channel", "fixed_tensor", "lsq"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_lean_step_keeps_the_weights_as_int8_with_the_composed_gradients(wkind, kind):
    # the fake-quantized kernel is saved as int8 + the weight scale and rebuilt in backward: the gradients to the
    # input, the weight and (LSQ) the weight amax equal the composition's bit for bit, for every weight quantizer
    g = torch.Generator().manual_seed(1)
    if kind == "conv":
        x, w, conf = torch.randn(2, 6, 7, 7, generator=g), torch.randn(10, 6, 3, 3, generator=g), dict(padding=1)
    else:
        x, w, conf = torch.randn(4, 12, generator=g), torch.randn(9, 12, generator=g), {}
    iq = make_quantizer(8, name="in")
    iq.set_amax(1.5)
    wq = _weight_quantizer(wkind, w)
    (ya, gxa, gwa, _, gaa), (yb, gxb, gwb, _, gab) = _lean_and_composed(x, w, iq, wq, conf)
    assert torch.equal(ya, yb) and torch.equal(gxa, gxb) and torch.equal(gwa, gwb)
    if gaa is not None:
        assert torch.equal(gaa, gab) and gaa.abs().sum() > 0
    # and the weights really are kept as one byte each
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    kept = _saved_dtypes(lambda: quant_matmul(xa, wa, iq, wq, **conf))
    assert (torch.int8, w.numel()) in kept
    if not wq.learn_amax:  # (LSQ's own straight-through function keeps float copies for the amax gradient)
        assert (torch.float32, w.numel()) not in kept


def _saved_dtypes(fn) -> list[tuple[torch.dtype, int]]:
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append((t.dtype, t.numel())) or t, lambda t: t):
        fn()
    return kept


@pytest.mark.parametrize("shape", [(256, 8), (3, 5, 7), (1,), (9,), (2, 48, 5, 5)])
def test_pack_mask_round_trips_every_bit_pattern(shape):
    from qat_rep.quant import qmath as qm
    if shape == (256, 8):  # every byte value once, bit i of row r = bit i of r
        mask = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1 == 1
    else:
        mask = torch.rand(shape, generator=torch.Generator().manual_seed(2)) > 0.5
    packed = qm.pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    if shape == (256, 8):
        assert torch.equal(packed, torch.arange(256, dtype=torch.uint8))  # element i in bit i
    assert torch.equal(qm.unpack_mask(packed, mask.shape), mask)


def test_mask_relu_equals_relu_and_keeps_one_bit_per_element():
    from qat_rep.quant import qmath as qm
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0, -1e-30] * 4)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = qm.MaskReLU.apply(a), torch.relu(b)
    assert torch.equal(ya, yb) and torch.equal(ya.signbit(), yb.signbit())
    gy = torch.arange(x.numel(), dtype=torch.float32)
    ya.backward(gy)
    yb.backward(gy)
    assert torch.equal(a.grad, b.grad)
    kept = _saved_dtypes(lambda: qm.MaskReLU.apply(torch.randn(64, requires_grad=True)))
    assert kept == [(torch.uint8, 8)]


@pytest.mark.parametrize("arch", ["repvgg_a0", "qarepvgg_a0"])
@pytest.mark.parametrize("fused", [False, True])
def test_quantized_block_training_step_is_lean_and_equals_the_plain_relu_step(arch, fused):
    # a prepared model's training step with the lean ReLU (prepare swaps nn.ReLU for LeanReLU) gives the same loss
    # and gradients as the same step with the ReLUs run as torch.relu
    import copy

    from qat_rep import create_model
    from qat_rep.quant import QuantConfig, Schedule, apply_schedule, calibrate, prepare

    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, small_input=True)
    x = torch.randn(4, 3, 16, 16)
    prepare(model, QuantConfig())
    calibrate(model, [x])
    if fused:
        apply_schedule(model, Schedule.fused(), 0, 0)
    model.train()
    plain = copy.deepcopy(model)
    relu_out = []
    lean = [n for n, m in plain.named_modules() if isinstance(m, LeanReLU)]
    assert len(lean) >= 10 and not any(type(m) is torch.nn.ReLU for m in model.modules())
    for name in lean:
        parent, _, child = name.rpartition(".")
        relu = torch.nn.ReLU()
        relu.register_forward_hook(lambda mod, inp, out: relu_out.append(out.numel()))
        setattr(plain.get_submodule(parent), child, relu)
    steps = []
    for m in (model, plain):
        loss = torch.nn.functional.cross_entropy(m(x), torch.arange(4))
        loss.backward()
        steps.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = steps
    assert torch.equal(la, lb) and ga.keys() == gb.keys() and len(ga) > 0
    assert all(torch.equal(ga[n], gb[n]) for n in ga)
    # every block ReLU output (4 bytes per element, kept by torch.relu) is kept as a 1-bit mask instead
    relu_out.clear()
    base = sum(n * t.itemsize for t, n in _saved_dtypes_full(lambda: plain(x)))
    lean = sum(n * t.itemsize for t, n in _saved_dtypes_full(lambda: model(x)))
    assert len(relu_out) >= 10
    assert base - lean >= 0.99 * sum(relu_out) * (4 - 1 / 8), (base, lean, sum(relu_out))


def _saved_dtypes_full(fn):
    # (dtype, numel) of every distinct saved tensor that is not a parameter
    kept, seen = [], set()

    def pack(t):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if not isinstance(t, torch.nn.Parameter) and key not in seen:
            seen.add(key)
            kept.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return kept


def _lsq_autograd_composition(x, amax, qmin, qmax):
    # LSQ written with autograd ops: what LSQFakeQuant must reproduce, bit for bit, in value and gradients
    scale = amax.clamp_min(1.0 / (1 << 24)) / qmax
    q = torch.clamp(x / scale, qmin, qmax)
    q = q + (torch.round(q) - q).detach()
    return q * scale


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bounds", [(-8, 7), (0, 15), (-128, 127)])
def test_lsq_fake_quant_equals_the_autograd_composition(per_channel, bounds):
    from qat_rep.quant import qmath as qm
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, 3, 3, generator=g) * 2
    amax = (torch.rand(6, 1, 1, 1, generator=g) + 0.5) if per_channel else torch.tensor(1.3)
    qmin, qmax = bounds
    gy = torch.randn(x.shape, generator=g)
    res = []
    for fn in (qm.lsq_fake_quant, _lsq_autograd_composition):
        xa, aa = x.clone().requires_grad_(), amax.clone().requires_grad_()
        y = fn(xa, aa, qmin, qmax)
        y.backward(gy)
        res.append((y.detach(), xa.grad, aa.grad))
    for a, b in zip(*res):
        assert torch.equal(a, b)
    assert (res[0][1] == 0).any() and (res[0][1] != 0).any()  # clipped and unclipped elements
    kept = _saved_dtypes(lambda: qm.lsq_fake_quant(x.clone().requires_grad_(), amax.clone().requires_grad_(),
                                                   qmin, qmax))
    assert [n for _, n in kept if n == x.numel()] == [x.numel()]  # x once; no float copies of it


def _kept_except(fn, keep: tuple[torch.Tensor, ...]) -> list[tuple[torch.dtype, int]]:
    # (dtype, numel) of every saved tensor that does not share storage with one of ``keep`` (parameters, buffers)
    ptrs = {t.untyped_storage().data_ptr() for t in keep}
    kept = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in ptrs:
            kept.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return kept


@pytest.mark.parametrize("wkind", ["dynamic", "fixed_channel", "fixed_tensor", "lsq"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("lsq_input", [False, True])
def test_a_parameter_kernel_is_recomputed_in_backward_not_kept(wkind, kind, lsq_input):
    # a layer's own weight (an nn.Parameter, alive through the step anyway) is its kernel's source: the lean
    # functions keep no copy of the kernel, recompute Q(W) in backward, and the gradients equal the composition's
    g = torch.Generator().manual_seed(5)
    if kind == "conv":
        x, w, conf = torch.randn(2, 6, 7, 7, generator=g), torch.randn(10, 6, 3, 3, generator=g), dict(padding=1)
    else:
        x, w, conf = torch.randn(4, 12, generator=g), torch.randn(9, 12, generator=g), {}
    iq = make_quantizer(8, learn_amax=lsq_input, name="in")
    iq.set_amax(1.5)
    wq = _weight_quantizer(wkind, w)
    grads = _lean_and_composed(x, w, iq, wq, conf, parameter=True)
    for a, b in zip(*grads):
        assert (a is None and b is None) or torch.equal(a, b)
    assert grads[0][2].abs().sum() > 0
    xa, wa = x.clone().requires_grad_(), torch.nn.Parameter(w.clone())
    kept = _kept_except(lambda: quant_matmul(xa, wa, iq, wq, **conf), (wa, xa))
    # nothing kernel-sized but the parameter itself (torch.fake_quantize_per_channel_affine keeps its own clip mask)
    assert kept and all(n != w.numel() or (wkind, dt) == ("fixed_channel", torch.bool) for dt, n in kept), kept


def test_a_kernel_changed_between_forward_and_backward_is_refused():
    # the recomputation relies on the parameter being the forward's: autograd's version counter refuses otherwise
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(6, 4, 3, 3))
    iq, wq = _quantizers("conv", False, 6)
    y = quant_matmul(x, w, iq, wq, 1, 1)
    with torch.no_grad():
        w.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("arch", ["repvgg_a0", "qarepvgg_a0"])
@pytest.mark.parametrize("phase", ["qat", "frozen", "fused"])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_rep_block_kernels_are_recomputed_with_the_composed_gradients(arch, phase, granularity):
    # a rep block's equivalent (or collapsed) kernel is rebuilt in backward from its branch parameters: the loss and
    # every gradient equal the step run as the quantizers' composition (lean functions off); with per-channel
    # weights nothing kernel-sized is kept but the parameters themselves
    import copy

    from helpers import prepared_a0
    from qat_rep.quant import QuantConfig
    from qat_rep.quant import backend

    model, x = prepared_a0(arch, phase, QuantConfig(w_granularity=granularity))
    composed = copy.deepcopy(model)
    steps = []
    for m, lean in ((model, True), (composed, False)):
        ok = backend._lean_ok
        if not lean:
            backend._lean_ok = lambda *a, **k: False
        try:
            loss = torch.nn.functional.cross_entropy(m(x), torch.arange(4))
        finally:
            backend._lean_ok = ok
        loss.backward()
        steps.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = steps
    assert torch.equal(la, lb) and ga.keys() == gb.keys() and len(ga) > 0
    assert all(torch.equal(ga[n], gb[n]) for n in ga)
    if granularity == "per_channel":
        model.zero_grad(set_to_none=True)
        sizes = {p.numel() for n, p in model.named_parameters() if "rbr_dense.conv" in n}  # the 3x3 kernels
        kept = _kept_except(lambda: model(x), (*model.parameters(), *model.buffers()))
        assert len(sizes) >= 4 and not [k for k in kept if k[1] in sizes], kept


@pytest.mark.parametrize("conf", [(8, 48, 30, 48, 2, 1, 1, 1, 3), (4, 16, 17, 32, 2, 1, 1, 1, 3),
                                  (3, 16, 9, 24, 2, 1, 2, 1, 3), (3, 16, 9, 24, 1, 0, 1, 1, 1),
                                  (2, 8, 10, 8, 3, 1, 1, 1, 3), (2, 12, 15, 12, 1, 2, 1, 2, 3),
                                  (4, 12, 15, 12, 1, 1, 12, 1, 3), (2, 6, 8, 10, 2, 0, 1, 1, 1)])
def test_input_gradient_without_the_input_equals_convolution_backward(conf):
    # the lean backward's input gradient (a transposed conv, so the rebuilt Q(x) can be freed first) is
    # convolution_backward's input gradient bit for bit: strides that drop rows, groups, dilation, 1x1
    from qat_rep.quant import qmath as qm
    n, c, h, o, s, p, groups, d, k = conf
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(n, c, h, h + 1, generator=g), torch.randn(o, c // groups, k, k, generator=g)
    y = F.conv2d(x, w, None, s, p, d, groups)
    gy = torch.randn(y.shape, generator=g)
    want = torch.ops.aten.convolution_backward(gy, x, w, None, [s, s], [p, p], [d, d], False, [0, 0], groups,
                                               [True, False, False])[0]
    got = qm._input_grad(gy, x.shape, w, ([s, s], [p, p], [d, d], groups))
    assert got.shape == x.shape and torch.equal(got, want)


@pytest.mark.parametrize("conf", [(2, 16, 4, 80, 2, 1, 1), (4, 8, 3, 64, 1, 1, 1), (1, 12, 7, 200, 1, 0, 2),
                                  (3, 16, 5, 96, 1, 0, 1), (2, 8, 6, 32, (2, 1), (0, 1), 1)])
def test_a_kernel_bound_conv_runs_as_one_gemm_with_conv2d_gradients(conf):
    # more output channels than output positions: one GEMM against the kernel in place, conv2d's values (up to
    # summation order), strides and gradients (bit for bit)
    from qat_rep.quant import qmath as qm
    n, c, h, o, s, p, d = conf
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(n, c, h, h + 1, generator=g), torch.randn(o, c, 3, 3, generator=g)
    assert qm._kernel_bound(x, w, s, p, d, 1)
    xa, wa, xb, wb = (t.clone().requires_grad_() for t in (x, w, x, w))
    ya, yb = qm.conv_or_linear(xa, wa, s, p, d, 1), F.conv2d(xb, wb, None, s, p, d)
    assert ya.grad_fn.name().startswith("KernelGemmConv")
    assert ya.shape == yb.shape and ya.stride() == yb.stride()
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5 * c * 9)
    gy = torch.randn(ya.shape, generator=g)
    ga, gb = torch.autograd.grad(ya, (xa, wa), gy), torch.autograd.grad(yb, (xb, wb), gy)
    assert torch.equal(ga[0], gb[0]) and torch.equal(ga[1], gb[1])


def test_only_kernel_bound_plain_convs_take_the_gemm():
    from qat_rep.quant import qmath as qm
    w = torch.randn(64, 8, 3, 3)
    assert qm._kernel_bound(torch.randn(2, 8, 5, 5), w, 1, 1, 1, 1)  # 50 positions < 64 channels
    assert not qm._kernel_bound(torch.randn(2, 8, 6, 6), w, 1, 1, 1, 1)  # 72 positions
    assert not qm._kernel_bound(torch.randn(2, 8, 5, 5), torch.randn(64, 4, 3, 3), 1, 1, 1, 2)  # grouped


@pytest.mark.parametrize("arch", ["repvgg_a0", "qarepvgg_a0"])
@pytest.mark.parametrize("phase", ["qat", "frozen", "fused"])
def test_rep_block_kernels_quantized_in_their_own_buffer_change_nothing(monkeypatch, arch, phase):
    # a rep block fake-quantizes the kernel it assembled in its own buffer (TensorQuantizer.in_place): the step's
    # outputs and every gradient equal those of the step that quantizes into a new buffer, over two SGD steps
    import contextlib
    import copy

    from helpers import prepared_a0
    from qat_rep.quant import qmath as qm
    from qat_rep.quant.backend import TensorQuantizer

    model, x = prepared_a0(arch, phase)
    copied = copy.deepcopy(model)
    in_place = []
    apply = qm.RoundSTE.apply
    monkeypatch.setattr(qm.RoundSTE, "apply", lambda *a: in_place.append(a[-1]) or apply(*a))
    runs = []
    for m, allowed in ((model, True), (copied, False)):
        if not allowed:
            monkeypatch.setattr(TensorQuantizer, "in_place", lambda self: contextlib.nullcontext())
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        steps = []
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(m(x), torch.arange(4))
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
        runs.append(steps)
    # a collapsed RepVGG block hands out its dense weight (a parameter: copied); every other case assembles kernels
    assert any(in_place) != (arch == "repvgg_a0" and phase == "fused")
    for (la, ga), (lb, gb) in zip(*runs):
        assert torch.equal(la, lb) and ga.keys() == gb.keys()
        assert [n for n in ga if not torch.equal(ga[n], gb[n])] == []


def test_in_place_quantization_leaves_parameters_and_views_alone():
    from qat_rep.quant.backend import make_quantizer

    wq = make_quantizer(8, axis=0, amax_shape=(4, 1, 1, 1), dynamic=True, name="w")
    weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    base = torch.randn(4, 3, 3, 3, requires_grad=True)
    computed = base * 2
    kept = (weight.detach().clone(), base.detach().clone())
    with wq.in_place():
        out_w = wq(weight)
        out_v = wq(base.view(4, 27).view(4, 3, 3, 3))
        out_c = wq(computed)
    assert torch.equal(weight.detach(), kept[0]) and torch.equal(base.detach(), kept[1])  # never written
    assert out_w.data_ptr() != weight.data_ptr() and out_v.data_ptr() != base.data_ptr()
    assert out_c.data_ptr() == computed.data_ptr()  # the computed temporary is quantized where it is
    assert torch.equal(out_c, wq(base.detach() * 2)) and wq._in_place is False
