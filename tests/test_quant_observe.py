"""The one activation recorder (``qat_rep.quant.observe``): hooks in, hooks out, evaluation mode restored; and no
other core module installs forward hooks of its own."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from torch import nn

import qat_rep
from qat_rep.quant.observe import observe, run_in_eval


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_observe_sees_inputs_and_outputs_and_removes_its_hooks():
    net = _net()
    x = torch.randn(5, 4)
    seen: dict[str, list] = {"in": [], "out": []}
    layers = {"0": net[0], "2": net[2]}
    with observe(layers, lambda n, m, a, o: seen["out"].append((n, m, o))), \
            observe(layers, lambda n, m, a, o: seen["in"].append((n, a[0], o)), outputs=False):
        y = net(x)
    assert [n for n, _, _ in seen["out"]] == ["0", "2"] and seen["out"][0][1] is net[0]
    assert torch.equal(seen["out"][1][2], y)
    assert torch.equal(seen["in"][0][1], x) and seen["in"][0][2] is None
    assert torch.equal(seen["in"][1][1], torch.relu(seen["out"][0][2]))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    net(x)  # nothing is called any more
    assert len(seen["out"]) == 2


def test_observe_can_stop_the_forward_and_still_removes_its_hooks():
    net = _net()

    class Stop(Exception):
        pass

    def stop(name, module, args, output):
        raise Stop

    with pytest.raises(Stop):
        with observe({"0": net[0]}, stop, outputs=False):
            net(torch.randn(2, 4))
    assert not net[0]._forward_pre_hooks


def test_run_in_eval_counts_batches_and_restores_training_mode():
    net = _net().train()
    modes = []
    n = run_in_eval(net, [torch.randn(2, 4)] * 5, lambda m, b: modes.append(m.training), max_batches=3)
    assert n == 3 and modes == [False] * 3 and net.training
    with pytest.raises(RuntimeError):
        run_in_eval(net, [torch.randn(2, 4)], lambda m, b: (_ for _ in ()).throw(RuntimeError("bad batch")))
    assert net.training


def test_forward_hooks_live_in_the_recorder_only():
    # the core installs forward hooks in observe.py and in calibration's per-step range check (a session that
    # stays installed across the caller's own steps), nowhere else
    root = pathlib.Path(qat_rep.__file__).parent
    rule = re.compile(r"register_forward_(pre_)?hook\(")
    allowed = {root / "quant" / "observe.py", root / "quant" / "calibrate.py"}
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p not in allowed and rule.search(p.read_text())]
    assert not offenders, offenders
