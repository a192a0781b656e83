"""Layer sensitivity: quantize one layer at a time and score the damage at the model output.

By default the damage is the output MSE (and SQNR) against the float model on the calibration batches: one pass of
those batches per layer, cheap enough for every model. Where the output error and the task disagree (a detector's
box branch against its classification branch, say), pass ``metric`` — any ``fn(model) -> float`` where higher is
better, e.g. mAP on a validation subset — and each layer is also scored, and ranked, by how much of the metric it
costs when quantized alone (what YOLOv6's ``tools/partial_quantization`` does with mAP). Either ranking feeds
:attr:`qat_rep.quant.QuantConfig.skip` through :attr:`LayerSensitivity.skip_name`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..reparam import flatten_outputs
from .layers import sim_layers


@dataclass(frozen=True)
class LayerSensitivity:
    """Output error when only ``name`` is quantized: MSE and SQNR in dB (higher SQNR = less sensitive), and with a
    task metric, ``metric_drop``: the metric of the float model minus the metric with only this layer quantized."""

    name: str
    mse: float
    sqnr_db: float
    metric_drop: float | None = None

    @property
    def skip_name(self) -> str:
        """The name that keeps this layer in floating point in :attr:`qat_rep.quant.QuantConfig.skip`: the rep
        block for a fused block's conv (``stage1.0`` for ``stage1.0.rbr_reparam``), the layer itself otherwise."""
        return self.name[: -len(".rbr_reparam")] if self.name.endswith(".rbr_reparam") else self.name


@torch.no_grad()
def _outputs(model: nn.Module, batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any]) -> list[Tensor]:
    return [torch.cat([t.flatten(1) if t.dim() > 1 else t.reshape(-1, 1)
                       for t in flatten_outputs(forward(model, b))], 1) for b in batches]


@torch.no_grad()
def layer_sensitivity(model: nn.Module, batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any],
                      metric: Callable[[nn.Module], float] | None = None) -> list[LayerSensitivity]:
    """Rank the :class:`SimQuantLayer` s of a calibrated working-form model, most sensitive first: by output MSE, or
    by ``metric_drop`` when a ``metric`` (``fn(model) -> float``, higher is better, called in eval mode) is given.

    Each layer's saved switches are restored afterwards. The reference is the same model with every layer float.
    """
    sims = list(sim_layers(model))
    if not sims:
        raise ValueError("the model has no SimQuantLayer; sensitivity runs on the PTQ working form "
                         "(use qat_rep.ptq.sensitivity_report(model, loader, config) on a float model)")
    saved = {n: (s.quant_weight, s.quant_act) for n, s in sims}
    was_training = model.training
    model.eval()
    try:
        for _, s in sims:
            s.quant_weight = s.quant_act = False
        ref = _outputs(model, batches, forward)
        base = None if metric is None else float(metric(model))
        power = sum(float(r.double().pow(2).sum()) for r in ref)
        count = sum(r.numel() for r in ref)
        rows = []
        for name, s in sims:
            s.quant_weight, s.quant_act = saved[name]
            out = _outputs(model, batches, forward)
            err = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(out, ref))
            drop = None if metric is None else base - float(metric(model))
            s.quant_weight = s.quant_act = False
            sqnr = math.inf if err == 0 else 10 * math.log10(max(power, 1e-300) / err)
            rows.append(LayerSensitivity(name, err / count, sqnr, drop))
    finally:
        for n, s in sims:
            s.quant_weight, s.quant_act = saved[n]
        model.train(was_training)
    if metric is not None:
        return sorted(rows, key=lambda r: (-r.metric_drop, -r.mse))
    return sorted(rows, key=lambda r: -r.mse)
