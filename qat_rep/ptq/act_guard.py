"""Per-layer check of activation thresholds: a calibrator's threshold stays only if it does not raise the quantized
layer's output error over the full range's.

Why: every histogram calibrator (percentile, TensorRT entropy, CFWS's improved KL, the histogram MSE) scores a
threshold by the *input* values alone. What matters downstream is the error of the layer's *output* — the weights
decide how much a clipped input channel costs. On A0 models trained with another recipe than the one the methods
were developed on, KL thresholds cut the network input and single layers so hard that full CFWS fell below plain
min-max. So, per layer, the output of the quantized layer (its deployed weights: max-, MSE- or CFWS-split
quantized) on the float model's inputs from the calibration data is compared with the float output, once with the
calibrator's threshold and once with the maximum, and the smaller mean squared error wins (the criterion BRECQ and
QDrop reconstruct with). Each decision is an :class:`ActChoice` in the :class:`~.api.PTQReport`.

Layer by layer is not enough: each check sees float inputs, and a clipped threshold's error is biased (every
clipped value moves the same way), so small per-layer gains can add up to a larger error at the network's output.
Measured on a RepVGG-A0 trained with SGD at 32×32, W8A8: the KL thresholds (TensorRT's and improved KL) won the
layer check in 16 layers, each by 1–5 %, and the network's output MSE on the calibration data was 12–14 % above the
maximum's (top-1: two images below); on a RepVGG-A0 of the benchmark's own recipe at W6A6 per-tensor, 2–3 % above
and 9–10 points of top-1 below. :func:`check_network` therefore
runs the whole quantized network on the calibration data once with the chosen thresholds and once with the
maximum everywhere, and keeps the maximum everywhere when that gives the smaller output MSE
(:class:`NetworkChoice`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..quant.observe import observe, run_in_eval
from .layers import SimQuantLayer


@dataclass(frozen=True)
class ActChoice:
    """One layer's activation threshold: the calibrator's (``rule``) or the maximum, whichever gives the quantized
    layer the smaller output MSE on the calibration data (a tie keeps ``rule``)."""

    rule: str  # the calibrator asked for ("improved_kl", "entropy", "mse", ...)
    winner: str  # rule or "max"
    amax: float  # the threshold the layer got
    rule_amax: float
    max_amax: float
    rule_mse: float  # output MSE with the calibrator's threshold
    max_mse: float  # output MSE with the maximum
    network: bool = False  # the layer check kept ``rule``, the network check (check_network) set the maximum

    @property
    def fell_back(self) -> bool:
        """True when the calibrator's threshold lost to the maximum (in the layer or the network check)."""
        return self.winner == "max" and self.rule != "max"


@dataclass(frozen=True)
class NetworkChoice:
    """The network check: output MSE of the whole quantized network on the calibration data with the thresholds
    the layer checks chose (``chosen_mse``) and with the maximum in every layer (``max_mse``); ``winner`` is
    ``"layers"`` (kept; also on a tie) or ``"max"``."""

    winner: str
    chosen_mse: float
    max_mse: float
    layers_changed: int  # layers whose threshold the network check set back to the maximum


@torch.no_grad()
def choose_act_amax(
    sims: dict[str, SimQuantLayer],
    float_model: nn.Module,
    batches: Sequence[Any],
    forward: Callable[[nn.Module, Any], Any],
    rule: str,
    rule_amax: dict[str, float],
    max_amax: dict[str, float],
) -> dict[str, ActChoice]:
    """Set every layer's ``act_amax`` to ``rule_amax[name]`` or ``max_amax[name]``, whichever quantizes the layer's
    output better; returns the decisions by name.

    ``float_model`` is the float copy the layers were taken from (same module names); its layers' inputs and
    outputs on ``batches`` are the reference. The layers compute with their quantized weights as they are now, so
    set the weight amax (and the CFWS split) first. A layer whose two thresholds coincide is not evaluated.
    """
    todo = {n: s for n, s in sims.items() if rule_amax[n] != max_amax[n]}
    sq_err: dict[str, list[float]] = {n: [0.0, 0.0] for n in todo}
    count: dict[str, int] = {n: 0 for n in todo}

    def measure(name: str, _module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        sim, x, ref = todo[name], args[0], out.double()
        for k, amax in enumerate((rule_amax[name], max_amax[name])):
            sim.set_act_amax(amax)
            sq_err[name][k] += float((sim(x).double() - ref).pow(2).sum())
        count[name] += ref.numel()

    with observe({n: float_model.get_submodule(n) for n in todo}, measure):
        run_in_eval(float_model, batches, forward)

    choices: dict[str, ActChoice] = {}
    for name, sim in sims.items():
        r, m = float(rule_amax[name]), float(max_amax[name])
        if name in todo and count[name]:
            e_rule, e_max = (e / count[name] for e in sq_err[name])
        else:
            e_rule = e_max = float("nan")  # same threshold (or the layer never ran): nothing to decide
        winner = "max" if e_max < e_rule else rule
        amax = m if winner == "max" else r
        sim.set_act_amax(amax)
        choices[name] = ActChoice(rule, winner, amax, r, m, e_rule, e_max)
    return choices


def _tensors(out: Any) -> list[Tensor]:
    """The tensors in a model output (a tensor, or tuples/lists/dicts of them), in a fixed order."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in _tensors(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


@torch.no_grad()
def check_network(
    qmodel: nn.Module,
    sims: dict[str, SimQuantLayer],
    float_model: nn.Module,
    batches: Sequence[Any],
    forward: Callable[[nn.Module, Any], Any],
    choices: dict[str, ActChoice],
) -> tuple[dict[str, ActChoice], NetworkChoice | None]:
    """Keep the per-layer ``choices`` only if the quantized network's output error on ``batches`` is not larger
    than with the maximum threshold in every layer; otherwise set every layer to its maximum.

    ``qmodel`` holds ``sims`` (with their thresholds set from ``choices``); ``float_model`` is the float reference.
    Returns the (possibly updated) choices and the measurement, or ``None`` when every layer already has its
    maximum or the outputs hold no tensors (nothing to decide).
    """
    differ = [n for n, c in choices.items() if c.amax != c.max_amax]
    if not differ:
        return choices, None
    was_training = (qmodel.training, float_model.training)
    qmodel.eval()
    float_model.eval()
    try:
        refs = [[t.double() for t in _tensors(forward(float_model, b))] for b in batches]
        if not any(refs):
            return choices, None

        def output_mse() -> float:
            sq, n = 0.0, 0
            for batch, ref in zip(batches, refs):
                for t, r in zip(_tensors(forward(qmodel, batch)), ref):
                    sq += float((t.double() - r).pow(2).sum())
                    n += r.numel()
            return sq / max(n, 1)

        chosen = output_mse()
        for name in differ:
            sims[name].set_act_amax(choices[name].max_amax)
        at_max = output_mse()
    finally:
        qmodel.train(was_training[0])
        float_model.train(was_training[1])
    if at_max < chosen:
        out = {n: dataclasses.replace(c, winner="max", amax=c.max_amax, network=True) if n in differ else c
               for n, c in choices.items()}
        return out, NetworkChoice("max", chosen, at_max, len(differ))
    for name in differ:
        sims[name].set_act_amax(choices[name].amax)
    return choices, NetworkChoice("layers", chosen, at_max, 0)
