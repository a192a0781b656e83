"""Per-layer quantization report: bits, weight amax range, activation amax, weight SQNR and output error.

The output error of a layer is measured locally: on the input the layer actually receives in the quantized model,
its fake-quantized output is compared with the float output of the same layer (float kernel, float input) — so
each row shows what that layer adds, not the error accumulated before it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fuse import fuse_bn_module
from .backend import QuantConv2d, QuantConvTranspose2d, TensorQuantizer
from .calibrate import default_forward
from .insert import get_config, quant_layers
from .observe import observe, run_in_eval
from .rep_qat import RepQuant, deploy_kernel_bias, folded_kernel_bias


def _db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass
class LayerRow:
    name: str
    kind: str
    w_bits: int
    a_bits: int
    w_amax_min: float
    w_amax_max: float
    a_amax: float
    w_sqnr_db: float
    out_sqnr_db: float
    out_rel_err: float  # RMS(quantized − float) / RMS(float) of the layer output


@dataclass
class LayerReport:
    rows: list[LayerRow] = field(default_factory=list)
    batches: int = 0

    def to_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    _HEAD = ("layer", "kind", "W/A bits", "weight amax [min, max]", "act amax", "weight SQNR dB", "out SQNR dB",
             "out rel err")

    def _cells(self, r: LayerRow) -> tuple[str, ...]:
        return (r.name, r.kind, f"{r.w_bits}/{r.a_bits}", f"[{r.w_amax_min:.4g}, {r.w_amax_max:.4g}]",
                f"{r.a_amax:.4g}", f"{r.w_sqnr_db:.1f}", f"{r.out_sqnr_db:.1f}", f"{r.out_rel_err:.2e}")

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self._HEAD) + " |", "|" + "---|" * len(self._HEAD)]
        lines += ["| " + " | ".join(self._cells(r)) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def to_rich_table(self):
        from rich.table import Table

        table = Table(title=f"qat-rep layer report ({self.batches} batch(es))")
        for h in self._HEAD:
            table.add_column(h, justify="left" if h in ("layer", "kind") else "right")
        for r in self.rows:
            table.add_row(*self._cells(r))
        return table


def _float_weight(model: nn.Module, name: str, layer: nn.Module) -> Tensor:
    if isinstance(layer, RepQuant):
        parent = name.rpartition(".")[0]
        return folded_kernel_bias(model.get_submodule(parent) if parent else model)[0]
    return layer.weight


def _float_out(layer: nn.Module, args: tuple) -> Tensor:
    if isinstance(layer, RepQuant):
        block, x = args
        if layer.phase == "float":
            return block.post_bn(block.branches(x))
        # the report runs in eval, where rep_quant outputs the deployed conv (post-BN folded): compare with its float
        k, b = deploy_kernel_bias(block)
        return block.conv(x, k, b)
    x = args[0]
    if isinstance(layer, QuantConv2d):
        weight, bias = layer.weight, layer.bias
        bn = layer.__dict__.get("_eval_bn")
        if bn is not None:  # eval mode: the layer outputs the BN-folded conv; compare with its float
            weight, bias = fuse_bn_module(weight, bn, bias)
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    if isinstance(layer, QuantConvTranspose2d):
        return F.conv_transpose2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.output_padding,
                                  layer.groups, layer.dilation)
    return F.linear(x, layer.weight, layer.bias)


@torch.no_grad()
def layer_report(model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any] | None = None,
                 max_batches: int | None = None) -> LayerReport:
    """Measure every quantized layer of a prepared (calibrated) or converted model on ``batches``.

    Reads up to ``max_batches`` (default: the config's ``calib_batches``, or 4 for a converted model). Raises
    ``ValueError`` for an empty iterable and ``NotCalibratedError`` for an uncalibrated quantizer.
    """
    layers = quant_layers(model)
    if not layers:
        raise ValueError("model has no quantized layer; call qat_rep.quant.prepare(model, config) first")
    if max_batches is None:
        try:
            max_batches = get_config(model).calib_batches
        except ValueError:
            max_batches = 4
    forward = default_forward if forward is None else forward
    sig = {n: 0.0 for n, _ in layers}
    err = {n: 0.0 for n, _ in layers}

    def measure(name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        ref = _float_out(module, args).double()
        sig[name] += float((ref ** 2).sum())
        err[name] += float(((output.double() - ref) ** 2).sum())

    with observe(dict(layers), measure):
        n = run_in_eval(model, batches, forward, max_batches)
    if n == 0:
        raise ValueError("layer_report got no batches: the iterable is empty")
    report = LayerReport(batches=n)
    for name, layer in layers:
        wq: TensorQuantizer = layer._weight_quantizer
        iq: TensorQuantizer = layer._input_quantizer
        w = _float_weight(model, name, layer).detach()
        w_q = wq(w)
        amax = wq.amax.detach().flatten()
        kind = ("rep" if isinstance(layer, RepQuant) else "conv" if isinstance(layer, QuantConv2d)
                else "deconv" if isinstance(layer, QuantConvTranspose2d) else "linear")
        if isinstance(layer, RepQuant):
            kind = f"rep/{layer.phase}"
        rel = math.sqrt(err[name] / sig[name]) if sig[name] > 0 else (0.0 if err[name] == 0 else math.inf)
        report.rows.append(LayerRow(
            name=name, kind=kind, w_bits=wq.num_bits, a_bits=iq.num_bits,
            w_amax_min=float(amax.min()), w_amax_max=float(amax.max()), a_amax=float(iq.amax.reshape(-1)[0]),
            w_sqnr_db=_db(float((w.double() ** 2).sum()), float(((w.double() - w_q.double()) ** 2).sum())),
            out_sqnr_db=_db(sig[name], err[name]), out_rel_err=rel,
        ))
    return report
