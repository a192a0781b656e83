"""Reconstruction-based PTQ: AdaRound (layer-wise), BRECQ (block-wise), MRECG (mixed granularity), QDrop option.

All three share one loop: units are processed in network order; a unit's input comes from the
*quantized* model (earlier units already hardened), its target is the *float* model's output of the same unit, and
the unit's weights are soft-rounded with AdaRound's rectified sigmoid ``h(V)``::

    W̃ = s · clip(floor(W / s) + h(V), −b, b),       h(V) = clip(sigmoid(V) · 1.2 − 0.1, 0, 1)
    loss = mean_{batch, positions} Σ_channels (ŷ − y)² + λ · Σ (1 − |2h − 1|^β)

with β annealed 20 → 2 after a 20 % warm-up, λ = 0.01, Adam(lr 1e-3), batch 32 — the published values; the
iteration count is scaled down for CPUs (20 000 → :attr:`ReconConfig.iters`, with the learning rate scaled up to
match) and a final hardening phase is added (below). Activation step sizes are learned
jointly (Adam, lr 4e-5 on the step size, cosine decay), as BRECQ's second phase and QDrop do. ``qdrop=0.5``
quantizes each activation element with probability 0.5 during reconstruction (QDrop). A unit whose hardened
result is worse than nearest rounding on its calibration data (possible with CPU-short runs) keeps nearest
rounding and its calibrated step sizes (``UnitResult.reverted``).

Granularity is just the choice of units: every quantized layer (AdaRound), every rep block / residual unit plus
the remaining layers (BRECQ), or BRECQ's units with the ``k`` adjacent pairs of largest capacity difference merged
(MRECG; ``k = 0`` is BRECQ exactly).

BRECQ on a fused plain chain (RepVGG/QARepVGG): a fused rep block is one 3×3 conv followed by its ReLU, so a BRECQ
unit holds the same weights as an AdaRound unit and differs only in the target — the block's post-ReLU output
instead of the conv's pre-ReLU output. That is deliberate, not a degenerate case: errors on outputs the ReLU zeroes
never reach the next layer, and the block is the unit the network was designed in (BRECQ's "block" is the residual
unit; a plain chain has none to offer, and merging several blocks is what MRECG's pairs do, chosen by capacity).
The two methods therefore give different roundings (e.g. repvgg_a0 on digits, W4A4, 50 iterations: AdaRound 97.2 %,
BRECQ 98.3 %); an earlier benchmark table where both read exactly the same accuracy was not reproduced.

Schedule: β anneals over ``[warmup, 1 − harden)`` of the run; in the final ``harden`` fraction λ grows to
``round_weight_end`` so that every ``h(V)`` ends exactly at 0 or 1 (see :class:`ReconConfig`). Cost per unit: the
unit's quantized input and float target come from running the previous unit when units form a chain, so a
whole-model forward runs only at the start of a chain (see :func:`reconstruct`); ``floor(W/s)`` and ``s`` are
computed once per unit and ``h(V)`` once per step.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..blocks import RepBlock
from .layers import SimQuantLayer, matches_any, sim_layers
from ..quant.qmath import qbound
from ..quant.observe import observe

log = logging.getLogger(__name__)

ForwardFn = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class ReconConfig:
    """Hyper-parameters of AdaRound/BRECQ/MRECG reconstruction (published values except ``iters``).

    Args:
        iters: optimization steps per unit (published: 20 000; CPU default 500).
        batch_size: reconstruction batch (published 32; MRECG reports larger batches help).
        lr: Adam learning rate of the rounding variables; ``None`` scales the published 1e-3 by
            ``20 000 / iters`` (capped at 0.1) so that the rounding variables can still travel to a hard 0/1 in the
            shorter run (Adam's step is ≈ lr, and ``|V|`` must reach ≈ 2.4).
        round_weight: λ of the rounding regularizer.
        beta: (start, end) of the annealed β.
        warmup: fraction of ``iters`` without the regularizer.
        learn_act: learn activation step sizes jointly.
        act_lr: Adam learning rate of the activation step sizes.
        qdrop: probability of quantizing an activation element during reconstruction (1.0 off, 0.5 QDrop).
        seed: seeds the batch sampling and QDrop masks of every unit.
        harden: final fraction of ``iters`` in which β stays at its end value and λ grows geometrically from
            ``round_weight`` to ``round_weight_end``. At CPU run lengths the published schedule (β 20 → 2 over the
            whole run, λ fixed) leaves many ``h(V)`` undecided near 0.5 — the reconstruction then optimizes a soft
            weight that is not the deployed one. With λ dominating at the end the regularizer's loss is concave in
            ``h`` and every ``h`` is driven into the rectified sigmoid's flat part (exactly 0 or 1) while the
            reconstruction term can still flip the decisions it cares about. ``harden=0`` is the published schedule.
        round_weight_end: λ at the last iteration (used only when ``harden > 0``).
    """

    iters: int = 500
    batch_size: int = 32
    lr: float | None = None
    round_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    learn_act: bool = True
    act_lr: float = 4e-5
    qdrop: float = 1.0
    seed: int = 0
    harden: float = 0.25
    round_weight_end: float = 10.0

    def __post_init__(self) -> None:
        for name in ("iters", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "act_lr", "round_weight"):
            v = getattr(self, name)
            if name == "lr" and v is None:
                continue
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup!r}")
        if not 0.0 <= self.harden < 1.0 or self.warmup + self.harden >= 1.0:
            raise ValueError(f"harden must be in [0, 1) with warmup + harden < 1, got harden={self.harden!r}, "
                             f"warmup={self.warmup!r}")
        if not isinstance(self.round_weight_end, (int, float)) or self.round_weight_end < self.round_weight:
            raise ValueError(f"round_weight_end must be a number >= round_weight ({self.round_weight}), got "
                             f"{self.round_weight_end!r}")
        if not 0.0 < self.qdrop <= 1.0:
            raise ValueError(f"qdrop must be in (0, 1] (1.0 = always quantize, 0.5 = QDrop), got {self.qdrop!r}")
        if len(self.beta) != 2 or min(self.beta) <= 0:
            raise ValueError(f"beta must be a (start, end) pair of positive numbers, got {self.beta!r}")
        object.__setattr__(self, "beta", (float(self.beta[0]), float(self.beta[1])))

    @property
    def effective_lr(self) -> float:
        return float(self.lr) if self.lr is not None else min(0.1, 1e-3 * 20000 / self.iters)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["beta"] = list(self.beta)
        return d


@dataclass(frozen=True)
class Unit:
    """A reconstruction unit: consecutive modules (by name) run one after the other."""

    names: tuple[str, ...]
    kind: str  # "layer" | "block" | "pair"

    @property
    def name(self) -> str:
        return "+".join(self.names)


@dataclass
class UnitResult:
    name: str
    kind: str
    loss_before: float
    loss_after: float
    seconds: float
    round_gap: float = 0.0  # max over weights of min(h, 1 − h) at the end of AdaRound (0 = all hard)
    round_binary: float = 1.0  # fraction of weights whose h ends within 1e-3 of 0 or 1
    reverted: bool = False  # the hardened result was worse than nearest rounding on the unit's data: kept nearest


# ------------------------------------------------------------------------------------------------- units
def layer_units(model: nn.Module) -> list[Unit]:
    """One unit per quantized layer (AdaRound)."""
    return [Unit((n,), "layer") for n, _ in sim_layers(model)]


def block_units(model: nn.Module, blocks: Sequence[str] | None = None) -> list[Unit]:
    """Rep blocks (or the modules named in ``blocks``) as units, plus every quantized layer outside them.

    Without rep blocks and without ``blocks`` there is nothing block-shaped to reconstruct: this falls back to
    layer-wise units with a warning (documented behaviour of ``brecq``/``mrecg`` on foreign models).
    """
    if blocks is not None:
        names = list(blocks)
        for n in names:
            try:
                model.get_submodule(n)
            except AttributeError:
                raise ValueError(f"block {n!r} is not a submodule of the model; pass module names as given by "
                                 "model.named_modules()") from None
    else:
        names = [n for n, m in model.named_modules() if isinstance(m, RepBlock) and n]
        names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    if not names:
        warnings.warn("no rep blocks (and no `blocks=`) found: block-wise reconstruction falls back to layer-wise "
                      "units; pass blocks=[module names] to define residual units", UserWarning, stacklevel=3)
        return layer_units(model)
    units: list[Unit] = []
    seen: set[str] = set()
    for n, m in model.named_modules():
        if n in names and n not in seen:
            units.append(Unit((n,), "block"))
            seen.add(n)
        elif isinstance(m, SimQuantLayer) and not matches_any(n, names):
            units.append(Unit((n,), "layer"))
    return units


def module_capacity(model: nn.Module, unit: Unit, stride_penalty: float = 0.5) -> float:
    """Data-free ModCap: Σ over the unit's quantized layers of parameters × weight bits × penalty^(stride − 1)."""
    cap = 0.0
    for name in unit.names:
        mod = model.get_submodule(name)
        layers = [mod] if isinstance(mod, SimQuantLayer) else [m for m in mod.modules() if isinstance(m, SimQuantLayer)]
        for layer in layers:
            stride = layer.conv_args[0][0] if layer.is_conv else 1
            cap += layer.weight.numel() * layer.w_bits * stride_penalty ** (stride - 1)
    return cap


# ------------------------------------------------------------------------------------------------- capture
class _Stop(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, names: Sequence[str], batches: Sequence[Any], forward: ForwardFn,
            what: str = "input") -> dict[str, Tensor]:
    """The input (or output) of each module in ``names`` over ``batches``, concatenated along the batch dimension.

    The forward pass stops as soon as every requested tensor of the batch has been seen.
    """
    store: dict[str, list[Tensor]] = {n: [] for n in names}
    pending: set[str] = set()

    def grab(name: str, _module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if name in pending:
            store[name].append((args[0] if what == "input" else output).detach().clone())
            pending.discard(name)
            if not pending:
                raise _Stop

    with observe({n: model.get_submodule(n) for n in names}, grab, outputs=what != "input"):
        for batch in batches:
            pending.update(names)
            try:
                forward(model, batch)
            except _Stop:
                pass
            if pending:
                raise RuntimeError(f"modules {sorted(pending)} were not called by the model's forward; they cannot "
                                   "be reconstructed")
    return {n: torch.cat(v) for n, v in store.items()}


def _run(modules: list[nn.Module], x: Tensor) -> Tensor:
    for m in modules:
        x = m(x)
    return x


def _rec_loss(pred: Tensor, target: Tensor) -> Tensor:
    """BRECQ's ``lp_loss``: squared error summed over channels (dim 1), mean over batch and positions.

    The scale matters: λ = 0.01 is balanced against exactly this loss.
    """
    return (pred - target).pow(2).sum(1).mean()


@torch.no_grad()
def data_capacity(qmodel: nn.Module, fmodel: nn.Module, units: list[Unit], batches: Sequence[Any],
                  forward: ForwardFn) -> list[float]:
    """Data-dependent ModCap: each unit's reconstruction loss with nearest rounding, fed with float inputs."""
    firsts = [u.names[0] for u in units]
    lasts = [u.names[-1] for u in units]
    x_in = capture(fmodel, sorted(set(firsts)), batches, forward, "input")
    y_out = capture(fmodel, sorted(set(lasts)), batches, forward, "output")
    caps = []
    for u in units:
        mods = [qmodel.get_submodule(n) for n in u.names]
        caps.append(float(_rec_loss(_run(mods, x_in[u.names[0]]), y_out[u.names[-1]])))
    return caps


@torch.no_grad()
def _links(fmodel: nn.Module, pairs: Sequence[tuple[str, str]], batch: Any, forward: ForwardFn) -> list[bool]:
    """For each ``(a, b)``: module ``b`` consumes exactly what module ``a`` produces, so the pair can run as a chain
    (checked on one float batch: one capture pass for all outputs, one for all inputs)."""
    if not pairs:
        return []
    outs = capture(fmodel, sorted({a for a, _ in pairs}), [batch], forward, "output")
    ins = capture(fmodel, sorted({b for _, b in pairs}), [batch], forward, "input")
    return [a != b and outs[a].shape == ins[b].shape and torch.equal(outs[a], ins[b]) for a, b in pairs]


def connected(fmodel: nn.Module, a: str, b: str, batch: Any, forward: ForwardFn) -> bool:
    """True when module ``b`` consumes exactly what module ``a`` produces (so the pair can run as a chain)."""
    return _links(fmodel, [(a, b)], batch, forward)[0]


def mixed_units(units: list[Unit], capacities: list[float], k: int, connected: Callable[[str, str], bool]) -> tuple[
        list[Unit], list[tuple[str, str, float]]]:
    """MRECG: merge the ``k`` adjacent, connected, non-overlapping unit pairs with the largest capacity difference.

    Returns the new unit list and the chosen pairs ``(first, second, |Δcapacity|)``. ``k = 0`` returns ``units``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k (number of jointly reconstructed pairs) must be a non-negative integer, got {k!r}")
    if len(capacities) != len(units):
        raise ValueError("one capacity per unit is needed")
    if k == 0:
        return list(units), []
    order = sorted(range(len(units) - 1), key=lambda i: -abs(capacities[i] - capacities[i + 1]))
    taken: set[int] = set()
    chosen: list[int] = []
    for i in order:
        if len(chosen) == k:
            break
        if i in taken or i + 1 in taken or len(units[i].names) + len(units[i + 1].names) != 2:
            continue
        if not connected(units[i].names[-1], units[i + 1].names[0]):
            continue
        chosen.append(i)
        taken.update((i, i + 1))
    out: list[Unit] = []
    i = 0
    while i < len(units):
        if i in chosen:
            out.append(Unit(units[i].names + units[i + 1].names, "pair"))
            i += 2
        else:
            out.append(units[i])
            i += 1
    pairs = [(units[i].name, units[i + 1].name, abs(capacities[i] - capacities[i + 1])) for i in sorted(chosen)]
    return out, pairs


# ------------------------------------------------------------------------------------------------- the loop
def _round_schedule(cfg: ReconConfig, it: int, warm: int, hard: int) -> tuple[float, float]:
    """(β, λ) at iteration ``it``: β anneals start → end over ``[warm, hard)``; in ``[hard, iters)`` β stays at
    its end value and λ grows geometrically from ``round_weight`` to ``round_weight_end`` (see ``harden``)."""
    b0, b1 = cfg.beta
    if it < hard:
        frac = (it - warm) / max(1, hard - warm)
        return b1 + (b0 - b1) * max(0.0, 1.0 - frac), cfg.round_weight
    span = max(1, cfg.iters - 1 - hard)
    ratio = cfg.round_weight_end / cfg.round_weight if cfg.round_weight > 0 else 1.0
    return b1, cfg.round_weight * ratio ** ((it - hard) / span)


def _unit_sims(modules: list[nn.Module]) -> list[SimQuantLayer]:
    sims: list[SimQuantLayer] = []
    for m in modules:
        sims += [s for s in m.modules() if isinstance(s, SimQuantLayer)]
    return sims


def _chain_links(fmodel: nn.Module, units: list[Unit], batch: Any, forward: ForwardFn) -> list[bool]:
    """``links[k]``: unit ``k + 1`` consumes exactly what unit ``k`` produces, so its inputs can be computed by
    running unit ``k`` instead of the whole model again."""
    return _links(fmodel, [(u.names[-1], v.names[0]) for u, v in zip(units[:-1], units[1:])], batch, forward)


@torch.no_grad()
def _run_batched(modules: list[nn.Module], x: Tensor, batch_size: int = 256) -> Tensor:
    return torch.cat([_run(modules, x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def reconstruct(qmodel: nn.Module, fmodel: nn.Module, units: list[Unit], batches: Sequence[Any],
                forward: ForwardFn, cfg: ReconConfig, progress: Any = None) -> list[UnitResult]:
    """Reconstruct ``units`` of ``qmodel`` (working form, see :mod:`.layers`) one after the other; see module doc.

    ``fmodel`` is the float model with the same module names. ``progress`` is an optional ``rich.progress.Progress``.

    Cost: a unit's quantized input and float target come from running the previous unit (quantized and float)
    when the units form a chain (:func:`_chain_links`); only at the start and after a break (pooling, a branch, a
    skipped layer between units) does a model forward (:func:`capture`, stopping at the unit) run again.
    """
    results: list[UnitResult] = []
    task = progress.add_task("reconstruct", total=len(units) * cfg.iters) if progress is not None else None
    qmodel.eval()
    fmodel.eval()
    links = _chain_links(fmodel, units, batches[0], forward)
    x_next: Tensor | None = None  # quantized input of the next unit, when chained
    xf_next: Tensor | None = None  # float input of the next unit, when chained
    for ui, unit in enumerate(units):
        t0 = time.perf_counter()
        modules = [qmodel.get_submodule(n) for n in unit.names]
        fmodules = [fmodel.get_submodule(n) for n in unit.names]
        sims = _unit_sims(modules)
        if x_next is not None and xf_next is not None:
            x_in, y_fp = x_next, _run_batched(fmodules, xf_next)
            xf_in = xf_next
        else:
            x_in = capture(qmodel, [unit.names[0]], batches, forward, "input")[unit.names[0]]
            xf_in = capture(fmodel, [unit.names[0]], batches, forward, "input")[unit.names[0]]
            y_fp = _run_batched(fmodules, xf_in)
        del xf_in
        n = x_in.shape[0]
        with torch.no_grad():
            before = float(_rec_loss(_run_batched(modules, x_in), y_fp))
        snapshot = [(s.weight.clone(), s.act_amax.detach().clone()) for s in sims]
        wsims = [s for s in sims if s.quant_weight]
        for s in wsims:
            s.init_adaround()
            s.soft = True
        asims = [s for s in sims if s.quant_act]
        groups = [{"params": [s.alpha for s in wsims], "lr": cfg.effective_lr}] if wsims else []
        act_groups = []
        if cfg.learn_act and asims and cfg.act_lr > 0:
            for s in asims:
                s.act_amax.requires_grad_(True)
                # the published rate is for the step size s = amax / bound; Adam's step is scale-free, so scale it
                act_groups.append({"params": [s.act_amax], "lr": cfg.act_lr * qbound(s.a_bits)})
        for s in sims:
            s.qdrop = cfg.qdrop
        opt = torch.optim.Adam(groups) if groups else None
        opt_a = torch.optim.Adam(act_groups) if act_groups else None
        sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=cfg.iters, eta_min=0.0) if opt_a else None
        gen = torch.Generator().manual_seed(cfg.seed + ui)
        torch.manual_seed(cfg.seed + ui)  # QDrop masks
        warm = int(cfg.warmup * cfg.iters)
        hard = cfg.iters - int(cfg.harden * cfg.iters)  # first iteration of the hardening phase
        try:
            if opt is not None or opt_a is not None:
                for it in range(cfg.iters):
                    idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
                    out = _run(modules, x_in[idx])
                    loss = _rec_loss(out, y_fp[idx])
                    if wsims and it >= warm and cfg.round_weight > 0:
                        beta, lam = _round_schedule(cfg, it, warm, hard)
                        # the h(V) of this step's forward (one sigmoid per step, shared with the weights)
                        reg = sum((1 - (2 * s.last_h - 1).abs().pow(beta)).sum() for s in wsims)
                        loss = loss + lam * reg
                    if opt is not None:
                        opt.zero_grad(set_to_none=True)
                    if opt_a is not None:
                        opt_a.zero_grad(set_to_none=True)
                    loss.backward()
                    if opt is not None:
                        opt.step()
                    if opt_a is not None:
                        opt_a.step()
                        sched_a.step()
                        with torch.no_grad():
                            for s in asims:
                                s.act_amax.clamp_(min=1e-6)
                    if task is not None:
                        progress.advance(task)
            with torch.no_grad():
                gaps = [torch.minimum(s.h(), 1 - s.h()).flatten() for s in wsims if s.alpha is not None]
                gaps = torch.cat(gaps) if gaps else torch.zeros(1)
                gap, binary = float(gaps.max()), float((gaps <= 1e-3).double().mean())
        finally:
            for s in sims:
                s.harden()
                s.qdrop = 1.0
                s.act_amax.requires_grad_(False)
        with torch.no_grad():
            out = _run_batched(modules, x_in)
            after = float(_rec_loss(out, y_fp))
            reverted = not after <= before
            if reverted:  # a short run can end worse than nearest rounding: never make a unit worse
                for s, (w, a) in zip(sims, snapshot):
                    s.weight.copy_(w)
                    s.act_amax.data.copy_(a)
                out = _run_batched(modules, x_in)
                after = float(_rec_loss(out, y_fp))
        chained = ui < len(links) and links[ui]
        x_next, xf_next = (out, y_fp) if chained else (None, None)
        del out, x_in
        results.append(UnitResult(unit.name, unit.kind, before, after, time.perf_counter() - t0, gap, binary,
                                  reverted))
        log.debug("unit %s: loss %.4g -> %.4g", unit.name, before, after)
        if math.isnan(after):
            raise FloatingPointError(f"reconstruction of {unit.name} diverged (loss is NaN); lower lr/act_lr")
    return results
