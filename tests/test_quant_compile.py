"""``torch.compile(model, fullgraph=True)`` of a prepared model in train mode: no graph break (no host
synchronisation on the forward path), and the compiled step's integers match eager's within a proven bound.

Bound: a quantizer computes ``clamp(round(x · (1/s)))`` with correctly rounded IEEE operations, so on the same
input compiled and eager code pick the same integers; the conv runs the same external kernel. What inductor does
change is the order of reductions — a training BatchNorm's batch mean and variance — so a BN output may move by a
few ulps. The next quantizer then picks a different integer only for a value within those ulps of a rounding tie,
and by exactly one step: ``|q_compiled − q_eager| ≤ 1``, at a tiny fraction of the elements.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qat_rep import create_model
from qat_rep.blocks import QARepVGGBlock
from qat_rep.quant import QuantConfig, calibrate, prepare

pytestmark = [pytest.mark.slow,
              pytest.mark.usefixtures("one_thread")]


def _prepared_a0(arch: str) -> tuple[nn.Module, torch.Tensor]:
    """A prepared, calibrated A0 in train mode and its 2×3×16×16 input (compiler caches reset)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, small_input=True)
    prepare(model, QuantConfig())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    calibrate(model, [x])
    return model.train(), x


@pytest.mark.parametrize("arch", ["qarepvgg_a0", "repvgg_a0"])
def test_fullgraph_capture_of_prepared_a0_in_train_mode(arch):
    # fullgraph=True fails on any graph break, whatever the backend; aot_eager also traces the backward through
    # AOTAutograd (the lean autograd Functions included) but skips inductor's C++ code generation, which takes
    # minutes per A0 on two shared cores (inductor itself is exercised below and in benchmarks/qat_speed.py)
    model, x = _prepared_a0(arch)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    y_e = eager(x)
    y_e.square().sum().backward()
    # the same kernels in the same order: bit-identical outputs and gradients
    assert torch.equal(y, y_e)
    for (n, p), q in zip(model.named_parameters(), eager.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), n


def test_inductor_integers_within_one_step_of_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = nn.Sequential(QARepVGGBlock(3, 8, stride=2))
    prepare(block, QuantConfig())
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    calibrate(block, [x])
    block.train()
    eager = copy.deepcopy(block)
    h_c = torch.compile(block, fullgraph=True)(x)
    h_e = eager(x)
    # the post-BN statistics moved identically up to reduction order
    torch.testing.assert_close(block[0].bn.running_var, eager[0].bn.running_var, rtol=1e-5, atol=1e-6)
    # the next layer's quantizer on both outputs (scale from the eager output's range, as calibration would)
    scale = float(h_e.abs().max()) / 127
    q_c = torch.clamp(torch.round(h_c.detach() * (1 / scale)), -128, 127)
    q_e = torch.clamp(torch.round(h_e.detach() * (1 / scale)), -128, 127)
    diff = (q_c - q_e).abs()
    assert diff.max() <= 1
    assert diff.count_nonzero() <= 0.01 * diff.numel()
    torch.testing.assert_close(h_c, h_e, rtol=1e-5, atol=1e-5 * scale * 127)


@pytest.mark.parametrize("arch", ["qarepvgg_a0", "repvgg_a0"])
def test_compiled_step_keeps_no_bool_buffer_for_backward(arch):
    # inductor's CPU code writes bool buffers ~20x slower than uint8 ones, which made the compiled step slower than
    # eager: the clip and ReLU masks a compiled step keeps are bytes (qmath.byte_mask), and none of the tensors the
    # forward graph hands to the backward is a bool
    from torch._dynamo.backends.common import aot_autograd

    saved_dtypes: list[torch.dtype] = []

    def forward_compiler(gm, example_inputs):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        saved_dtypes.extend(o.meta["val"].dtype for o in outputs
                            if isinstance(o, torch.fx.Node) and isinstance(o.meta.get("val"), torch.Tensor))
        return gm

    model, x = _prepared_a0(arch)
    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: gm)
    torch.compile(model, fullgraph=True, backend=backend)(x).sum().backward()
    assert torch.uint8 in saved_dtypes  # the masks are there, as bytes
    assert torch.bool not in saved_dtypes


def test_reduce_amax_compiled_equals_eager_on_any_layout():
    # under the compiler the per-channel amax is one reduction over the other dimensions (walked in memory order,
    # also for a channels-last kernel); max and min are exact, so the values are eager's to the bit
    from qat_rep.quant.qmath import reduce_amax

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    compiled = torch.compile(reduce_amax, fullgraph=True)
    for w in (torch.randn(16, 8, 3, 3, generator=g),
              torch.randn(16, 8, 3, 3, generator=g).to(memory_format=torch.channels_last),
              torch.randn(8, 16, 3, 3, generator=g).transpose(0, 1)):
        for axis in (0, 1):
            shape = [-1 if d == axis else 1 for d in range(4)]
            assert torch.equal(compiled(w, (axis,), shape), reduce_amax(w, (axis,), shape))
