"""Layer sensitivity: quantize one layer at a time and score the damage at the model output.

Why not accuracy per layer: YOLOv6 users found a full evaluation per layer far too slow. The output MSE (and SQNR)
against the float model on the calibration batches ranks layers just as well for choosing which few to keep in
floating point (partial quantization), and costs one calibration pass per layer.
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
    """Output error when only ``name`` is quantized: MSE and SQNR in dB (higher SQNR = less sensitive)."""

    name: str
    mse: float
    sqnr_db: float


@torch.no_grad()
def _outputs(model: nn.Module, batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any]) -> list[Tensor]:
    return [torch.cat([t.flatten(1) if t.dim() > 1 else t.reshape(-1, 1)
                       for t in flatten_outputs(forward(model, b))], 1) for b in batches]


@torch.no_grad()
def layer_sensitivity(model: nn.Module, batches: Sequence[Any],
                      forward: Callable[[nn.Module, Any], Any]) -> list[LayerSensitivity]:
    """Rank the :class:`SimQuantLayer` s of a calibrated working-form model, most sensitive first.

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
        power = sum(float(r.double().pow(2).sum()) for r in ref)
        count = sum(r.numel() for r in ref)
        rows = []
        for name, s in sims:
            s.quant_weight, s.quant_act = saved[name]
            out = _outputs(model, batches, forward)
            err = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(out, ref))
            s.quant_weight = s.quant_act = False
            sqnr = math.inf if err == 0 else 10 * math.log10(max(power, 1e-300) / err)
            rows.append(LayerSensitivity(name, err / count, sqnr))
    finally:
        for n, s in sims:
            s.quant_weight, s.quant_act = saved[n]
        model.train(was_training)
    return sorted(rows, key=lambda r: -r.mse)
