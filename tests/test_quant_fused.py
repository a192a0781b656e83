"""The ``fused`` phase of progressive re-parameterization: a rep block collapsed into one trainable conv (its dense
branch's own parameters), the optimizer state of the rewritten parameters reset, resume across the ``qat → fused``
transition bit-identical, and 2-process DDP across it with identical weights on both ranks."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import randomize_bn
from torch import nn

from qat_rep import QARepVGGBlock, QARepVGGBlockV2, RepVGGBlock
from qat_rep.quant import QuantConfig, Schedule, apply_schedule, calibrate, convert, prepare

pytestmark = pytest.mark.usefixtures("one_thread")


BLOCKS = [
    (RepVGGBlock, dict(in_channels=8, out_channels=8)),
    (RepVGGBlock, dict(in_channels=8, out_channels=12, stride=2)),
    (QARepVGGBlock, dict(in_channels=8, out_channels=8)),
    (QARepVGGBlockV2, dict(in_channels=8, out_channels=8, groups=2)),
]


def _net(seed: int = 0) -> nn.Module:
    """A tiny network with both block kinds, non-trivial BN statistics, 16×16 inputs."""
    torch.manual_seed(seed)
    m = nn.Sequential(QARepVGGBlock(3, 8, stride=2), RepVGGBlock(8, 8), QARepVGGBlock(8, 8),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    randomize_bn(m, torch.Generator().manual_seed(seed), min_var=0.5)
    return m


def _data(n: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def _prepared(cfg: QuantConfig = QuantConfig(), seed: int = 0) -> nn.Module:
    m = _net(seed)
    prepare(m, cfg)
    calibrate(m, [x for x, _ in _data(2, seed=9)])
    return m.train()


@pytest.mark.parametrize("cls,kw", BLOCKS)
def test_collapse_keeps_the_function_and_reads_one_conv(cls, kw):
    torch.manual_seed(0)
    block = cls(**kw)
    randomize_bn(block, torch.Generator().manual_seed(0))
    block.eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y0 = block(x)
        k0, b0 = block.equivalent_kernel_bias()
    params_before = [id(p) for p in block.parameters()]
    rewritten = block.collapse_to_dense_()
    assert [id(p) for p in block.parameters()] == params_before  # same parameter set
    names = {n for n, p in block.named_parameters() if any(p is r for r in rewritten)}
    assert "rbr_dense.conv.weight" in names and "rbr_dense.bn.bias" in names
    assert not any(n.startswith("bn.") for n in names)  # QARep's post-BN keeps training as it was
    with torch.no_grad():
        k1, b1 = block.equivalent_kernel_bias()
        kc, bc = block.collapsed_kernel_bias()
        y1 = block(x)
    # the cheap read equals the multi-branch assembly bit for bit, and the function is unchanged up to float order
    assert torch.equal(kc, k1) and torch.equal(bc, b1)
    torch.testing.assert_close(k1, k0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b1, b0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5 * float(y0.abs().max()))


def test_fused_phase_trains_one_conv_and_the_post_bn():
    m = _prepared()
    apply_schedule(m, Schedule.all_at_once(fuse_at=0), 0, 0)
    x, y = _data(1)[0]
    F.cross_entropy(m(x), y).backward()
    for i in (0, 1, 2):
        with_grad = sorted(n for n, p in m[i].named_parameters() if p.grad is not None and "rep_quant" not in n)
        expect = ["rbr_dense.bn.bias", "rbr_dense.conv.weight"] + (["bn.bias", "bn.weight"] if i != 1 else [])
        assert with_grad == sorted(expect), (i, with_grad)


def test_fused_phase_rejects_an_uncollapsed_block():
    m = _prepared()
    with pytest.raises(ValueError, match="'fused' phase needs a collapsed block"):
        m[0].rep_quant.phase = "fused"
    with pytest.raises(ValueError, match="phase must be one of float, qat, frozen, fused"):
        m[0].rep_quant.phase = "fuse"


@pytest.mark.parametrize("gran", ["per_channel", "per_tensor"])
def test_fused_eval_equals_converted_bit_for_bit(gran):
    m = _prepared(QuantConfig(w_granularity=gran, first_last_8bit=False))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    sched = Schedule.all_at_once(fuse_at=2, unit="step")
    for step, (x, y) in enumerate(_data(4)):
        apply_schedule(m, sched, 0, step, [opt])
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(m[i].rep_quant.phase == "fused" for i in range(3))
    m.eval()
    x = _data(1, seed=5)[0][0]
    with torch.no_grad():
        assert torch.equal(m(x), convert(copy.deepcopy(m)).eval()(x))


def test_transition_resets_only_the_rewritten_parameters_state_once():
    m = _prepared()
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    x, y = _data(1)[0]
    F.cross_entropy(m(x), y).backward()
    opt.step()
    assert all(p in opt.state for p in m.parameters() if p.grad is not None)
    sched = Schedule.shallow_to_deep(start=0, every=0, fuse_after=1, unit="step", stages=["0", "1"])
    assert apply_schedule(m, sched, 0, 0, [opt]) == {"0": "qat", "1": "qat", "2": "qat"}
    assert apply_schedule(m, sched, 0, 1, [opt]) == {"0": "fused", "1": "fused", "2": "qat"}
    assert m[0].rep_quant.collapsed and m[1].rep_quant.collapsed and not m[2].rep_quant.collapsed
    for i, collapsed in ((0, True), (1, True), (2, False)):
        for n, p in m[i].named_parameters():
            if n.startswith("rbr_") and p.grad is not None:
                assert (p not in opt.state) == collapsed, (i, n)
    assert m[0].bn.weight in opt.state  # the post-BN was not rewritten: its momentum stays
    before = m[0].rbr_dense.conv.weight.detach().clone()
    apply_schedule(m, sched, 0, 2, [opt])  # already collapsed: nothing is rewritten again
    assert torch.equal(m[0].rbr_dense.conv.weight, before)


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched: Schedule, steps: range) -> None:
    data = _data(max(steps) + 1)
    for step in steps:
        apply_schedule(model, sched, 0, step, [opt])
        x, y = data[step]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, weight_decay=1e-4),
    lambda p: torch.optim.Adam(p, lr=1e-3),
], ids=["sgd", "adam"])
def test_resume_across_the_transition_is_bit_identical(tmp_path, make_opt):
    sched = Schedule.all_at_once(qat_at=0, fuse_at=3, unit="step")
    full = _prepared()
    opt = make_opt(full.parameters())
    _train(full, opt, sched, range(0, 2))
    torch.save({"model": full.state_dict(), "opt": opt.state_dict()}, tmp_path / "before.pt")
    _train(full, opt, sched, range(2, 4))  # the transition happens at step 3
    torch.save({"model": full.state_dict(), "opt": opt.state_dict()}, tmp_path / "after.pt")
    _train(full, opt, sched, range(4, 6))
    assert all(full[i].rep_quant.phase == "fused" for i in range(3))
    for ckpt, start in (("before.pt", 2), ("after.pt", 4)):
        state = torch.load(tmp_path / ckpt, weights_only=True)
        resumed = _prepared(seed=123)  # different initial weights: everything must come from the checkpoint
        resumed.load_state_dict(state["model"])
        opt_r = make_opt(resumed.parameters())
        opt_r.load_state_dict(state["opt"])
        _train(resumed, opt_r, sched, range(start, 6))
        for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), (ckpt, n)


def test_old_checkpoint_without_collapsed_flag_loads():
    m = _prepared()
    state = {k: v for k, v in m.state_dict().items() if not k.endswith("_collapsed")}
    fresh = _prepared(seed=3)
    fresh.load_state_dict(state, strict=True)
    assert not fresh[0].rep_quant.collapsed


# ------------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _prepared()  # identical start on both ranks
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.02, momentum=0.9)
        sched = Schedule.all_at_once(qat_at=0, fuse_at=2, unit="step")
        data = _data(8, seed=40 + rank)  # each rank sees its own shard
        for step in range(4):
            apply_schedule(model, sched, 0, step, [opt])
            x, y = data[step]
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        phases = [model[i].rep_quant.phase for i in range(3)]
        torch.save({"state": model.state_dict(), "phases": phases}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_across_the_transition_keeps_ranks_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["phases"] == r1["phases"] == ["fused"] * 3
    start = _prepared().state_dict()
    moved = 0
    for k, a in r0["state"].items():
        if k.endswith(("running_mean", "running_var")):
            continue  # DDP broadcasts BN statistics from rank 0 at the start of each forward: the last is local
        assert torch.equal(a, r1["state"][k]), k
        moved += not torch.equal(a, start[k])
    assert moved > 10  # training did happen
    # the fused weights were trained after the collapse: the dense conv is not the collapse of the start weights
    assert r0["state"]["0.rep_quant._collapsed"]
