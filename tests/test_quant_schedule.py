"""Progressive schedule: transitions exactly at the configured epochs/steps, pure in (epoch, step), parameters kept."""

from __future__ import annotations

import json

import pytest
import torch

from qat_rep import create_model
from qat_rep.quant import PhaseRule, QuantConfig, Schedule, apply_schedule, prepare, rep_stages

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    m = create_model("qarepvgg_a0", num_classes=10, small_input=True)
    prepare(m, QuantConfig())
    return m


def test_rep_stages_shallow_to_deep(model):
    assert rep_stages(model) == ["stage0", "stage1", "stage2", "stage3", "stage4"]
    assert rep_stages(create_model("efficientrep_n", small_input=True)) == [
        "stem", "ERBlock_2", "ERBlock_3", "ERBlock_4", "ERBlock_5"]


def test_all_at_once_transitions_exactly_at_configured_epochs(model):
    s = Schedule.all_at_once(qat_at=2, freeze_at=5)
    seen = {}
    for epoch in range(7):
        phases = apply_schedule(model, s, epoch=epoch, step=epoch * 100)
        assert len(set(phases.values())) == 1 and len(phases) == 22
        seen[epoch] = next(iter(phases.values()))
    assert seen == {0: "float", 1: "float", 2: "qat", 3: "qat", 4: "qat", 5: "frozen", 6: "frozen"}
    assert model.stage3[4].rep_quant.phase == "frozen"


def test_shallow_to_deep_by_epoch(model):
    s = Schedule.shallow_to_deep(start=1, every=2, freeze_after=3)
    expect = {  # stage i: qat at 1 + 2i, frozen at 4 + 2i
        0: ["float"] * 5,
        1: ["qat", "float", "float", "float", "float"],
        3: ["qat", "qat", "float", "float", "float"],
        4: ["frozen", "qat", "float", "float", "float"],
        9: ["frozen", "frozen", "frozen", "qat", "qat"],
        12: ["frozen"] * 5,
    }
    for epoch, want in expect.items():
        phases = apply_schedule(model, s, epoch, 0)
        got = [phases["stage0"], phases["stage1.0"], phases["stage2.3"], phases["stage3.13"], phases["stage4.0"]]
        assert got == want, epoch


def test_step_unit_and_first_rule_wins(model):
    s = Schedule(rules=(PhaseRule("stage1", qat_at=10), PhaseRule("stage*", qat_at=0, freeze_at=20)), unit="step")
    assert apply_schedule(model, s, epoch=99, step=9)["stage1.1"] == "float"
    assert apply_schedule(model, s, epoch=0, step=10)["stage1.1"] == "qat"
    assert apply_schedule(model, s, epoch=0, step=25)["stage1.1"] == "qat"  # stage1 rule has no freeze
    assert apply_schedule(model, s, epoch=0, step=25)["stage2.0"] == "frozen"


def test_pure_function_of_position_and_parameters_unchanged(model):
    s = Schedule.shallow_to_deep(every=1, freeze_after=2)
    names = [n for n, _ in model.named_parameters()]
    a = apply_schedule(model, s, 3, 0)
    apply_schedule(model, s, 0, 0)
    apply_schedule(model, s, 7, 0)
    b = apply_schedule(model, s, 3, 0)  # resumed: same position → same phases
    assert a == b and [n for n, _ in model.named_parameters()] == names
    assert all(p.requires_grad for p in model.parameters())


def test_schedule_round_trips_through_json():
    for s in (Schedule.all_at_once(1, 4, unit="step"), Schedule.shallow_to_deep(2, 3, None, stages=["a", "b"]),
              Schedule(rules=(PhaseRule("x.*", 1),), default="frozen"), Schedule.all_at_once(0, fuse_at=3),
              Schedule.shallow_to_deep(0, 1, fuse_after=2, unit="step")):
        assert Schedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    # a schedule saved before the fused phase existed (3-element stagewise, rules without fuse_at)
    old = {"rules": [{"pattern": "a", "qat_at": 1, "freeze_at": None}], "unit": "epoch", "default": "qat",
           "stagewise": [0, 1, 2], "stages": None}
    assert Schedule.from_dict(old) == Schedule(rules=(PhaseRule("a", 1),), stagewise=(0, 1, 2, None))


def _fresh() -> torch.nn.Module:
    m = create_model("qarepvgg_a0", num_classes=10, small_input=True)
    prepare(m, QuantConfig())
    return m


def test_eqk_to_fused_by_stage_and_epoch():
    m = _fresh()
    s = Schedule.shallow_to_deep(start=0, every=1, fuse_after=1)  # stage i: qat at i, fused at i + 1
    by_stage = lambda phases: [phases[n] for n in ("stage0", "stage1.0", "stage2.0", "stage3.0", "stage4.0")]
    assert by_stage(apply_schedule(m, s, 0, 0)) == ["qat", "float", "float", "float", "float"]
    assert by_stage(apply_schedule(m, s, 2, 0)) == ["fused", "fused", "qat", "float", "float"]
    assert m.stage1[1].rep_quant.collapsed and not m.stage2[0].rep_quant.collapsed
    assert by_stage(apply_schedule(m, s, 5, 0)) == ["fused"] * 5


def test_eqk_to_fused_by_step():
    m = _fresh()
    s = Schedule.all_at_once(qat_at=0, fuse_at=30, unit="step")
    assert set(apply_schedule(m, s, epoch=3, step=29).values()) == {"qat"}
    assert set(apply_schedule(m, s, epoch=0, step=30).values()) == {"fused"}


@pytest.mark.parametrize("make,match", [
    (lambda: Schedule(unit="batch"), "Schedule.unit must be 'epoch' or 'step'"),
    (lambda: Schedule(default="fuse"), "Schedule.default must be one of float, qat, frozen, fused"),
    (lambda: PhaseRule("*", qat_at=-1), "qat_at must be an integer >= 0"),
    (lambda: PhaseRule("*", qat_at=3, freeze_at=2), "freeze_at must be None or an integer >= qat_at=3"),
    (lambda: Schedule.shallow_to_deep(every=-1), "every must be an integer >= 0"),
    (lambda: PhaseRule("*", qat_at=3, fuse_at=2), "fuse_at must be None or an integer >= qat_at=3"),
    (lambda: PhaseRule("*", qat_at=1, freeze_at=4, fuse_at=3), "fuse_at must be None or an integer >= freeze_at=4"),
    (lambda: Schedule(stagewise=(0, 1)), r"stagewise must be \(start, every, freeze_after\[, fuse_after\]\)"),
    (lambda: Schedule.from_dict({"unit": "epoch", "phases": []}), r"unknown Schedule key\(s\) \['phases'\]"),
    (lambda: Schedule.shallow_to_deep().resolve(None), "needs the model to find them"),
])
def test_schedule_value_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_schedule_type_errors(model):
    with pytest.raises(TypeError, match="PhaseRule.pattern must be a non-empty string"):
        PhaseRule("")
    with pytest.raises(TypeError, match="Schedule.rules must be PhaseRule instances"):
        Schedule(rules=({"pattern": "*"},))
    with pytest.raises(TypeError, match="schedule must be a qat_rep.quant.Schedule"):
        apply_schedule(model, {"unit": "epoch"}, 0, 0)
    with pytest.raises(ValueError, match="epoch must be an integer >= 0, got -1"):
        apply_schedule(model, Schedule.all_at_once(), -1, 0)
