"""What you train is what you ship: after QAT steps with non-trivial BN statistics, the evaluation-mode QAT model
and ``convert(copy.deepcopy(model))`` compute the same floats (``torch.equal``), for RepVGG and QARepVGG blocks ×
per-channel and per-tensor weights × learned and calibrated (static) amax."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from qat_rep import create_model
from qat_rep.data import DataSpec, load_dataset
from qat_rep.quant import QuantConfig, calibrate, convert, prepare

pytestmark = pytest.mark.usefixtures("one_thread")


def qat_trained(arch: str, cfg: QuantConfig, steps: int = 3, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """``arch`` at 16×16 with non-trivial BN statistics, prepared, calibrated and trained for a few QAT steps
    (post-BNs keep updating their statistics), plus an evaluation batch.

    The statistics are the data's (a few float forwards in train mode) and the affine parameters random: fully random
    statistics (``randomize_bn``) make a 22-block network's activations grow by orders of magnitude per stage.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = create_model(arch, num_classes=10, small_input=True)
    xs, ys = _digits()
    x, y = xs[:32], ys[:32]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.num_features, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=gen))
                m.momentum = 0.5
        model.train()
        model(x)
        model(x.flip(0))
    prepare(model, cfg)
    calibrate(model, [x[:16], x[16:]])
    opt = torch.optim.SGD(model.parameters(), lr=2e-3, momentum=0.9)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), xs[-64:]


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    train, _, _ = load_dataset(DataSpec(image_size=16))
    return train.tensors


CASES = [(arch, gran, learn) for arch in ("repvgg_a0", "qarepvgg_a0")
         for gran in ("per_channel", "per_tensor") for learn in (False, True)]


@pytest.mark.slow
@pytest.mark.parametrize("arch,gran,learn", CASES)
def test_eval_equals_converted_bit_for_bit(arch, gran, learn):
    model, x = qat_trained(arch, QuantConfig(w_granularity=gran, learn_amax=learn))
    deployed = convert(copy.deepcopy(model)).eval()
    with torch.no_grad():
        y_qat, y_dep = model(x), deployed(x)
    assert y_qat.std(0).max() > 1e-3  # logits that depend on the input: a network that computes something
    assert torch.equal(y_qat, y_dep), float((y_qat - y_dep).abs().max())


@pytest.mark.slow
def test_post_bn_statistics_are_non_trivial_after_training():
    # the QARep case above only means something if the post-BNs moved away from (0, 1) during the steps
    model, _ = qat_trained("qarepvgg_a0", QuantConfig())
    bn = model.stage1[1].bn
    assert bn.running_mean.abs().max() > 1e-2 and (bn.running_var - 1).abs().max() > 1e-2
