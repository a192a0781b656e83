"""Progressive re-parameterization: which rep block is ``float``, ``qat``, ``frozen`` or ``fused`` at (epoch, step).

A :class:`Schedule` is data (JSON-safe via :meth:`Schedule.to_dict`); :func:`apply_schedule` is a pure function of
``(epoch, step, schedule)`` and the model's architecture, so a resumed run recomputes exactly the same phases.

The phases, in order: ``float`` (multi-branch, unquantized) → ``qat`` (equivalent-kernel QAT: every branch trains
through the fake-quantized equivalent kernel) → optionally ``frozen`` (that kernel fixed) → ``fused``: the block is
*collapsed* into one trainable conv — its equivalent kernel written into the dense branch's own weight, its bias
into the dense BN's ``β`` (:meth:`~qat_rep.blocks.RepBlock.collapse_to_dense_`); QARep blocks keep their trainable
post-BN. A step of a fused block costs what fuse-first QAT costs (one conv, no kernel assembly from branches).

Optimizer and DDP across the ``→ fused`` transition (the design choice): the parameter set never changes — no
module is created or removed, so an optimizer and a DDP wrapper built before stay valid. The collapse rewrites the
values of the block's branch parameters, so their optimizer state (momentum, Adam moments) no longer means anything:
:func:`apply_schedule` drops it in every optimizer it is given (the parameters restart as fresh ones, as
``BaseFinetuning`` does for unfrozen layers). The other branch parameters receive no gradient from then on (``grad
is None``: optimizers skip them); under DDP use ``find_unused_parameters=True``. The collapse is a deterministic
function of parameters that DDP keeps identical, so every rank collapses to the same values. Whether a block is
collapsed travels with the model's state dict (``rep_quant._collapsed``), so a resumed run never collapses twice
and restores the optimizer state saved after the reset: resume across the transition is bit-identical.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..blocks import RepBlock
from .rep_qat import PHASES, RepQuant

UNITS = ("epoch", "step")


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def _check_at(label: str, value: int | None, floor: int, floor_label: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < floor):
        raise ValueError(f"PhaseRule.{label} must be None or an integer >= {floor_label}={floor}, got {value!r}")


@dataclass(frozen=True)
class PhaseRule:
    """Blocks whose name matches ``pattern`` (a module path, its prefix, or an ``fnmatch`` glob) are ``float``
    before ``qat_at``, ``qat`` from ``qat_at``, ``frozen`` from ``freeze_at`` and ``fused`` (collapsed into one
    trainable conv) from ``fuse_at`` (``None``: never)."""

    pattern: str
    qat_at: int = 0
    freeze_at: int | None = None
    fuse_at: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise TypeError(f"PhaseRule.pattern must be a non-empty string, got {self.pattern!r}")
        if isinstance(self.qat_at, bool) or not isinstance(self.qat_at, int) or self.qat_at < 0:
            raise ValueError(f"PhaseRule.qat_at must be an integer >= 0, got {self.qat_at!r}")
        _check_at("freeze_at", self.freeze_at, self.qat_at, "qat_at")
        if self.freeze_at is not None:
            _check_at("fuse_at", self.fuse_at, self.freeze_at, "freeze_at")
        else:
            _check_at("fuse_at", self.fuse_at, self.qat_at, "qat_at")

    def phase(self, t: int) -> str:
        if t < self.qat_at:
            return "float"
        if self.fuse_at is not None and t >= self.fuse_at:
            return "fused"
        if self.freeze_at is not None and t >= self.freeze_at:
            return "frozen"
        return "qat"


@dataclass(frozen=True)
class Schedule:
    """Phase rules, the time unit (``"epoch"`` or ``"step"``) and the phase of blocks no rule matches.

    ``stagewise`` (set by :meth:`shallow_to_deep`) generates one rule per stage at apply time:
    ``(start, every, freeze_after, fuse_after)`` — stage ``i`` (shallowest first) enters QAT at ``start + i·every``,
    freezes ``freeze_after`` units later and is collapsed (``fused``) ``fuse_after`` units after entering QAT (never
    if ``None``; a 3-tuple means ``fuse_after=None``). ``stages=None`` takes the stages from the model
    (:func:`rep_stages`).
    """

    rules: tuple[PhaseRule, ...] = ()
    unit: str = "epoch"
    default: str = "qat"
    stagewise: tuple[int, int, int | None] | None = None
    stages: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"Schedule.unit must be 'epoch' or 'step', got {self.unit!r}")
        if self.default not in PHASES:
            raise ValueError(f"Schedule.default must be one of {', '.join(PHASES)}, got {self.default!r}")
        object.__setattr__(self, "rules", tuple(self.rules))
        if not all(isinstance(r, PhaseRule) for r in self.rules):
            raise TypeError("Schedule.rules must be PhaseRule instances")
        if self.stagewise is not None:
            if len(self.stagewise) not in (3, 4):
                raise ValueError("Schedule.stagewise must be (start, every, freeze_after[, fuse_after]), "
                                 f"got {self.stagewise!r}")
            start, every, freeze_after, fuse_after = (tuple(self.stagewise) + (None,))[:4]
            PhaseRule("*", start, None if freeze_after is None else start + freeze_after,
                      None if fuse_after is None else start + fuse_after)
            if isinstance(every, bool) or not isinstance(every, int) or every < 0:
                raise ValueError(f"every must be an integer >= 0, got {every!r}")
            object.__setattr__(self, "stagewise", (start, every, freeze_after, fuse_after))
        if self.stages is not None:
            object.__setattr__(self, "stages", tuple(self.stages))

    # ---------------------------------------------------------------------------------------------- presets
    @classmethod
    def all_at_once(cls, qat_at: int = 0, freeze_at: int | None = None, unit: str = "epoch",
                    fuse_at: int | None = None) -> "Schedule":
        """Every block enters QAT at ``qat_at`` (float before), optionally freezes at ``freeze_at`` and is collapsed
        into one trainable conv at ``fuse_at``."""
        return cls(rules=(PhaseRule("*", qat_at, freeze_at, fuse_at),), unit=unit)

    @classmethod
    def fused(cls, qat_at: int = 0, unit: str = "epoch") -> "Schedule":
        """Every block is collapsed into one trainable conv (QARep: plus its trainable post-BN) when it enters QAT
        at ``qat_at``: fuse-first QAT's arithmetic and cost, on the unfused model the user trained. The default of
        :class:`~qat_rep.callbacks.RepQATCallback` — ``benchmarks/qat_accuracy.py`` finds equivalent-kernel QAT
        (:meth:`all_at_once`) no more accurate than this over 3 seeds, two FP32 recipes and both block types, at
        1.09–1.31× its step time."""
        return cls.all_at_once(qat_at=qat_at, unit=unit, fuse_at=qat_at)

    @classmethod
    def shallow_to_deep(cls, start: int = 0, every: int = 1, freeze_after: int | None = None,
                        unit: str = "epoch", stages: Sequence[str] | None = None,
                        fuse_after: int | None = None) -> "Schedule":
        """Stage ``i`` (shallowest first) enters QAT at ``start + i·every``; freezes ``freeze_after`` units later;
        is collapsed into one trainable conv per block ``fuse_after`` units after entering QAT.

        Deeper stages stay float multi-branch until their turn; with ``fuse_after`` set, shallow stages train as
        plain convs (fuse-first's cost) while deeper ones still train every branch.
        """
        return cls(unit=unit, default="qat", stagewise=(start, every, freeze_after, fuse_after),
                   stages=None if stages is None else tuple(stages))

    # ---------------------------------------------------------------------------------------------- logic
    @property
    def leaves_branches_unused(self) -> bool:
        """Can this schedule put a block in ``frozen`` or ``fused``, where its branch parameters get no gradient
        (DDP then needs ``find_unused_parameters=True``)?"""
        rules_stop = any(r.freeze_at is not None or r.fuse_at is not None for r in self.rules)
        stage_stop = self.stagewise is not None and any(v is not None for v in self.stagewise[2:])
        return rules_stop or stage_stop or self.default in ("frozen", "fused")

    def resolve(self, model: nn.Module | None = None) -> tuple[PhaseRule, ...]:
        """The explicit rules (stage rules first, then ``rules``); first match wins."""
        rules: list[PhaseRule] = []
        if self.stagewise is not None:
            stages = self.stages
            if stages is None:
                if model is None:
                    raise ValueError("a shallow_to_deep schedule without stages needs the model to find them")
                stages = tuple(rep_stages(model))
            start, every, freeze_after, fuse_after = self.stagewise
            for i, stage in enumerate(stages):
                q = start + i * every
                rules.append(PhaseRule(stage, q, None if freeze_after is None else q + freeze_after,
                                       None if fuse_after is None else q + fuse_after))
        return tuple(rules) + self.rules

    def phase_of(self, name: str, epoch: int, step: int, rules: Sequence[PhaseRule] | None = None) -> str:
        """The phase of the block ``name`` at ``(epoch, step)``."""
        t = epoch if self.unit == "epoch" else step
        for rule in (self.resolve() if rules is None else rules):
            if _matches(name, rule.pattern):
                return rule.phase(t)
        return self.default

    def to_dict(self) -> dict[str, Any]:
        return {
            "rules": [{"pattern": r.pattern, "qat_at": r.qat_at, "freeze_at": r.freeze_at, "fuse_at": r.fuse_at}
                      for r in self.rules],
            "unit": self.unit,
            "default": self.default,
            "stagewise": None if self.stagewise is None else list(self.stagewise),
            "stages": None if self.stages is None else list(self.stages),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Schedule":
        unknown = sorted(set(data) - {"rules", "unit", "default", "stagewise", "stages"})
        if unknown:
            raise ValueError(f"unknown Schedule key(s) {unknown}")
        sw = data.get("stagewise")
        return cls(rules=tuple(PhaseRule(**r) for r in data.get("rules", ())), unit=data.get("unit", "epoch"),
                   default=data.get("default", "qat"), stagewise=None if sw is None else tuple(sw),
                   stages=None if data.get("stages") is None else tuple(data["stages"]))


def rep_stages(model: nn.Module) -> list[str]:
    """Names of the model's top-level children that hold rep blocks, in module order (shallow → deep).

    RepVGG: ``stage0`` … ``stage4``; EfficientRep: ``stem``, ``ERBlock_2`` … ``ERBlock_5``.
    """
    stages: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, RepBlock) and name:
            top = name.split(".")[0]
            if top not in stages:
                stages.append(top)
    return stages


def reset_optimizer_state(optimizers: Iterable[torch.optim.Optimizer], params: Iterable[nn.Parameter]) -> int:
    """Drop the per-parameter state (momentum, Adam moments, step) of ``params`` in every optimizer; returns how
    many entries were dropped. The parameters stay in their param groups and restart as fresh ones."""
    params = list(params)
    n = 0
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizers must be torch.optim.Optimizer instances, got {type(opt).__name__}")
        for p in params:
            if opt.state.pop(p, None) is not None:
                n += 1
    return n


def apply_schedule(model: nn.Module, schedule: Schedule, epoch: int, step: int,
                   optimizers: Sequence[torch.optim.Optimizer] = ()) -> dict[str, str]:
    """Set every prepared rep block's phase for ``(epoch, step)``; returns block name → phase.

    A pure function of ``(epoch, step, schedule)`` and the architecture: calling it again with the same position
    (e.g. after resuming from a checkpoint) gives the same phases. A block entering ``fused`` for the first time is
    collapsed into its dense branch here, and the state of its rewritten parameters is dropped from every optimizer
    in ``optimizers`` (the ones training the model; none when there is no optimizer yet). Call it once per batch
    (or per epoch for an epoch schedule) before the forward.
    """
    for label, v in (("epoch", epoch), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{label} must be an integer >= 0, got {v!r}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a qat_rep.quant.Schedule, got {type(schedule).__name__}")
    optimizers = list(optimizers)
    rules = schedule.resolve(model)
    phases: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, RepBlock) and isinstance(m.rep_quant, RepQuant):
            phase = schedule.phase_of(name, epoch, step, rules)
            if phase == "fused" and not m.rep_quant.collapsed:
                reset_optimizer_state(optimizers, m.rep_quant.collapse_(m))
            m.rep_quant.phase = phase
            phases[name] = phase
    return phases
