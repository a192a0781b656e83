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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .layers import SimQuantLayer

__all__ = ["ActChoice", "choose_act_amax"]


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

    @property
    def fell_back(self) -> bool:
        """True when the calibrator's threshold lost to the maximum."""
        return self.winner == "max" and self.rule != "max"


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

    def hook(name: str, sim: SimQuantLayer):
        def fn(_module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            x, ref = args[0], out.double()
            for k, amax in enumerate((rule_amax[name], max_amax[name])):
                sim.set_act_amax(amax)
                sq_err[name][k] += float((sim(x).double() - ref).pow(2).sum())
            count[name] += ref.numel()
        return fn

    handles = [float_model.get_submodule(n).register_forward_hook(hook(n, s)) for n, s in todo.items()]
    was_training = float_model.training
    float_model.eval()
    try:
        for batch in batches:
            forward(float_model, batch)
    finally:
        for h in handles:
            h.remove()
        float_model.train(was_training)

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
