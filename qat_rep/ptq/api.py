"""``quantize_ptq``: one entry point for every post-training method, on the fused model.

Pipeline (each step is one module of this package):

1. :func:`qat_rep.reparameterize` (QARep post-BN folded) and a plain conv's following BN folded — PTQ sees the
   network that will be deployed.
2. Every conv/linear becomes a :class:`~.layers.SimQuantLayer` (``config.skip`` stays float; with
   ``config.first_last_8bit`` the first and last layer keep 8 bits when fewer are requested).
3. Weight ``amax`` = ``max|W|`` (or BRECQ's MSE search); CFWS marks the rep kernels it splits.
4. Activation ``amax`` from ``|input|`` histograms of the float model (:mod:`.kl`): ``max`` / ``percentile`` /
   ``entropy`` / ``mse`` / CFWS's ``improved_kl``; per layer, the maximum replaces a threshold that gives the
   quantized layer a larger output error on the calibration data (:mod:`.act_guard`).
5. Reconstruction: AdaRound / BRECQ / MRECG (:mod:`.reconstruct`).
6. Optional partial quantization: the ``keep_float`` most sensitive layers (:mod:`.sensitivity`) stay float.
7. :func:`~.layers.finalize`: backend ``QuantConv2d``/``QuantLinear``/:class:`~.cfws.CFWSConv2d` with static amax.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..fuse import fold_bn_into_conv_
from ..quant.insert import bn_after
from ..quant import QuantConfig
from ..quant.calibrate import check_calibrated, check_finite_batch, default_forward
from ..reparam import reparameterize
from .act_guard import ActChoice, choose_act_amax
from .kl import amax_from_histogram, collect_input_histograms
from .layers import finalize, install_sim, sim_layers
from .qmath import mse_weight_amax
from .reconstruct import (ReconConfig, UnitResult, _connected, block_units, data_capacity, layer_units,
                          mixed_units, module_capacity, reconstruct)
from .sensitivity import LayerSensitivity, layer_sensitivity

__all__ = ["METHODS", "PTQReport", "quantize_ptq", "sensitivity_report"]

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse", "cfws", "adaround", "brecq", "mrecg")
_CALIB = {"minmax": "max", "percentile": "percentile", "entropy": "entropy", "mse": "mse"}
_RECON = ("adaround", "brecq", "mrecg")
_RECON_KEYS = tuple(f.name for f in fields(ReconConfig))
_OPTIONS: dict[str, tuple[str, ...]] = {
    **{m: () for m in _CALIB},
    "cfws": ("split", "improved_kl"),
    "adaround": _RECON_KEYS + ("act_calibrator", "weight_init", "num_samples"),
    "brecq": _RECON_KEYS + ("act_calibrator", "weight_init", "num_samples", "blocks"),
    "mrecg": _RECON_KEYS + ("act_calibrator", "weight_init", "num_samples", "blocks", "k", "capacity",
                            "stride_penalty"),
}
_COMMON = ("forward", "keep_float", "progress", "bins", "act_guard")


@dataclass
class PTQReport:
    """What :func:`quantize_ptq` did: method, settings, per-layer kinds, activation threshold rules (``act_choice``:
    the calibrator's threshold or the maximum, whichever gave the layer the smaller output error), reconstruction
    losses, timing."""

    method: str
    config: dict[str, Any]
    options: dict[str, Any]
    layers: dict[str, str] = field(default_factory=dict)  # name -> "conv" | "linear" | "cfws" | "float"
    bits: dict[str, str] = field(default_factory=dict)  # name -> "W8A8"
    act_amax: dict[str, float] = field(default_factory=dict)
    act_choice: dict[str, ActChoice] = field(default_factory=dict)  # which threshold rule won, per layer
    units: list[UnitResult] = field(default_factory=list)
    pairs: list[tuple[str, str, float]] = field(default_factory=list)
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    calib_samples: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pairs"] = [list(p) for p in self.pairs]
        return d

    def to_markdown(self) -> str:
        n_cfws = sum(k == "cfws" for k in self.layers.values())
        lines = [f"**PTQ `{self.method}`** — {len(self.layers)} layers ({n_cfws} CFWS, "
                 f"{len(self.kept_float)} float), {self.calib_samples} calibration samples, {self.seconds:.1f} s",
                 ""]
        if self.act_choice:
            rules = [c.winner for c in self.act_choice.values()]
            lines += [f"activation thresholds: " + ", ".join(f"{rules.count(r)} {r}" for r in dict.fromkeys(rules)),
                      "", "| layer | threshold rule | amax | amax / max | output MSE (rule) | output MSE (max) |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {n} | {c.winner}{' (fallback)' if c.fell_back else ''} | {c.amax:.4g} | "
                      f"{c.amax / c.max_amax if c.max_amax > 0 else 1.0:.3f} | {_num(c.rule_mse)} | {_num(c.max_mse)} |"
                      for n, c in self.act_choice.items()]
            lines.append("")
        if self.units:
            lines += ["| unit | kind | loss before | loss after | s |", "|---|---|---|---|---|"]
            lines += [f"| {u.name} | {u.kind} | {u.loss_before:.4g} | {u.loss_after:.4g} | {u.seconds:.1f} |"
                      for u in self.units]
        if self.pairs:
            lines += ["", "jointly reconstructed pairs: " + ", ".join(f"{a}+{b}" for a, b, _ in self.pairs)]
        if self.sensitivity:
            lines += ["", "| layer | output MSE | SQNR dB |", "|---|---|---|"]
            lines += [f"| {s.name} | {s.mse:.3g} | {s.sqnr_db:.1f} |" for s in self.sensitivity]
        return "\n".join(lines)

    def to_rich_table(self) -> Any:
        from rich.table import Table

        table = Table(title=f"PTQ {self.method} ({self.seconds:.1f} s)")
        for col in ("layer", "kind", "bits", "act amax", "threshold rule", "recon loss before → after"):
            table.add_column(col)
        losses = {u.name: u for u in self.units}
        for name, kind in self.layers.items():
            u = losses.get(name)
            c = self.act_choice.get(name)
            table.add_row(name, kind, self.bits.get(name, ""), f"{self.act_amax.get(name, float('nan')):.4g}",
                          "" if c is None else c.winner + (" (fallback)" if c.fell_back else ""),
                          f"{u.loss_before:.4g} → {u.loss_after:.4g}" if u else "")
        return table


# ------------------------------------------------------------------------------------------------- helpers
def _num(v: float) -> str:
    """A table cell: ``—`` for a value that was not measured (NaN)."""
    return "—" if math.isnan(v) else f"{v:.3g}"


def _gather(loader: Iterable[Any], max_batches: int | None, max_samples: int | None) -> tuple[list[Any], int]:
    batches: list[Any] = []
    n = 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        batches.append(batch)
        n += int(x.shape[0]) if hasattr(x, "shape") and len(x.shape) else 1
        if (max_batches is not None and len(batches) >= max_batches) or (max_samples is not None and n >= max_samples):
            break
    return batches, n


@torch.no_grad()
def _fold_plain_bn(model: nn.Module) -> int:
    """Fold a BN that directly follows a plain conv (next in a Sequential, or a ``conv``/``bn`` pair), in float."""
    n = 0
    for _, parent in list(model.named_modules()):
        for child, conv in list(parent._modules.items()):
            if type(conv) is not nn.Conv2d:
                continue
            found = bn_after(parent, child, conv)
            if found is None or found[1].num_features != conv.out_channels:
                continue
            bn_name, bn = found
            fold_bn_into_conv_(conv, bn)
            setattr(parent, bn_name, nn.Identity())
            n += 1
    return n


def _calibrate_activations(sims: dict[str, Any], fmodel: nn.Module, batches: list[Any],
                           fwd: Callable[[nn.Module, Any], Any], rule: str, config: QuantConfig, bins: int,
                           guard: bool) -> dict[str, ActChoice]:
    """Every layer's activation amax: ``rule`` on the histogram of its float input, checked against the maximum
    by the layer's output error when ``guard`` (:mod:`.act_guard`)."""
    hists = collect_input_histograms(fmodel, {n: fmodel.get_submodule(n) for n in sims}, batches, fwd, bins)
    rule_amax = {n: amax_from_histogram(hists[n], rule, s.a_bits, config.percentile) for n, s in sims.items()}
    max_amax = {n: hists[n].amax for n in sims}
    if guard:
        return choose_act_amax(sims, fmodel, batches, fwd, rule, rule_amax, max_amax)
    nan = float("nan")
    for n, s in sims.items():
        s.set_act_amax(rule_amax[n])
    return {n: ActChoice(rule, rule, rule_amax[n], rule_amax[n], max_amax[n], nan, nan) for n in sims}


def _check_options(method: str, options: dict[str, Any]) -> None:
    valid = _OPTIONS[method]
    bad = sorted(set(options) - set(valid))
    if bad:
        raise TypeError(f"method {method!r} got unknown option(s) {bad}; valid: {', '.join(valid) or '(none)'}")


# ------------------------------------------------------------------------------------------------- API
def quantize_ptq(
    model: nn.Module,
    calib_loader: Iterable[Any],
    config: QuantConfig | None = None,
    method: str = "minmax",
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    keep_float: int = 0,
    progress: bool = False,
    bins: int = 2048,
    act_guard: bool = True,
    **method_options: Any,
) -> tuple[nn.Module, PTQReport]:
    """Post-training quantization of ``model`` (in place; returned for chaining) and a :class:`PTQReport`.

    Args:
        model: a float model, train or fused form; it is fused first (``qat_rep.reparameterize``).
        calib_loader: any iterable of batches (``(inputs, targets)`` or inputs). Plain calibration reads
            ``config.calib_batches`` batches; reconstruction reads ``num_samples`` samples (default 1024).
        config: bits, granularity, ``skip`` and ``first_last_8bit`` (:class:`qat_rep.quant.QuantConfig`).
            ``config.calibrator`` is used only where a method does not fix it (reconstruction's activation init
            defaults to ``mse`` instead, as in BRECQ/QDrop).
        method: ``minmax`` | ``percentile`` | ``entropy`` | ``mse`` (calibration only), ``cfws`` (split fused rep
            kernels + improved KL; options ``split=True``, ``improved_kl=True``), ``adaround`` (layer-wise),
            ``brecq`` (block-wise; option ``blocks=[names]`` for non-rep models, else falls back to layer-wise with
            a warning), ``mrecg`` (``k`` jointly reconstructed adjacent pairs, default 3; ``capacity="data_free"``
            or ``"data_dependent"``; ``stride_penalty``). Reconstruction options: every
            :class:`~.reconstruct.ReconConfig` field (``iters``, ``batch_size``, ``qdrop=0.5`` for QDrop, …),
            ``act_calibrator``, ``weight_init`` (``"mse"``/``"max"``), ``num_samples``.
        forward: ``forward(model, batch)``; default ``model(batch[0])`` for tuples/lists, else ``model(batch)``.
        keep_float: keep the N most output-sensitive layers in floating point (partial quantization).
        progress: show a rich progress bar during reconstruction.
        bins: histogram bins for activation calibration.
        act_guard: per layer, keep the calibrator's activation threshold only if the quantized layer's output
            error on the calibration data is not larger than with the maximum; else use the maximum
            (``PTQReport.act_choice`` says which won). ``False`` takes the calibrator's thresholds as they are.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown PTQ method {method!r}; valid: {', '.join(METHODS)}")
    config = QuantConfig() if config is None else config
    _check_ptq_config(config)
    if isinstance(keep_float, bool) or not isinstance(keep_float, int) or keep_float < 0:
        raise ValueError(f"keep_float must be a non-negative integer, got {keep_float!r}")
    if not isinstance(act_guard, bool):
        raise TypeError(f"act_guard must be True or False, got {act_guard!r}")
    _check_options(method, method_options)
    fwd = forward or default_forward
    opts = dict(method_options)

    recon_cfg = None
    if method in _RECON:
        recon_cfg = ReconConfig(**{k: opts[k] for k in _RECON_KEYS if k in opts})
        num_samples = opts.get("num_samples", 1024)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        batches, n_samples = _gather(calib_loader, None, num_samples)
        if n_samples < recon_cfg.batch_size:
            raise ValueError(f"the calibration set has {n_samples} sample(s), fewer than one reconstruction batch "
                             f"(batch_size={recon_cfg.batch_size}); pass more data or a smaller batch_size")
    else:
        batches, n_samples = _gather(calib_loader, config.calib_batches, None)
    if not batches:
        raise ValueError("the calibration loader is empty; PTQ needs at least one batch of representative inputs")
    for i, batch in enumerate(batches):
        check_finite_batch(batch, i)

    reparameterize(model, fold_post_bn=True)
    _fold_plain_bn(model)
    model.eval()
    fmodel = copy.deepcopy(model)
    first_last = 8 if config.first_last_8bit and (config.w_bits < 8 or config.a_bits < 8) else None
    sims = install_sim(model, config.w_bits, config.a_bits, config.per_channel, config.skip, first_last)
    if not sims:
        raise ValueError("the model has no nn.Conv2d/nn.Linear left to quantize (all skipped?); check config.skip")

    # weights first: the activation check below measures each layer with the weights it will deploy
    weight_init = opts.get("weight_init", "mse" if method in _RECON else "max")
    if weight_init not in ("max", "mse"):
        raise ValueError(f"weight_init must be 'max' or 'mse', got {weight_init!r}")
    if weight_init == "mse":
        for sim in sims.values():
            sim.w_amax.copy_(mse_weight_amax(sim.weight, sim.w_bits, sim.per_channel))
    if method == "cfws" and opts.get("split", True):
        for sim in sims.values():
            sim.cfws = sim.rep and sim.is_conv and tuple(sim.weight.shape[-2:]) == (3, 3)

    # activations: histograms of every layer's float input, then the per-layer output-error check
    if method in _CALIB:
        act_method = _CALIB[method]
    elif method == "cfws":
        act_method = "improved_kl" if opts.get("improved_kl", True) else config.calibrator
    else:
        act_method = opts.get("act_calibrator", "mse")
    report = PTQReport(method, config.to_dict(), {k: v for k, v in opts.items()}, calib_samples=n_samples)
    report.act_choice = _calibrate_activations(sims, fmodel, batches, fwd, act_method, config, bins, act_guard)

    if method in _RECON:
        assert recon_cfg is not None
        if method == "adaround":
            units = layer_units(model)
        else:
            units = block_units(model, opts.get("blocks"))
        if method == "mrecg":
            k = opts.get("k", 3)
            capacity = opts.get("capacity", "data_free")
            if capacity == "data_free":
                caps = [module_capacity(model, u, opts.get("stride_penalty", 0.5)) for u in units]
            elif capacity == "data_dependent":
                caps = data_capacity(model, fmodel, units, batches[:2], fwd)
            else:
                raise ValueError(f"capacity must be 'data_free' or 'data_dependent', got {capacity!r}")
            units, report.pairs = mixed_units(units, caps, k,
                                              lambda a, b: _connected(fmodel, a, b, batches[0], fwd))
        if progress:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            with Progress(TextColumn(f"[bold]{method}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as bar:
                report.units = reconstruct(model, fmodel, units, batches, fwd, recon_cfg, bar)
        else:
            report.units = reconstruct(model, fmodel, units, batches, fwd, recon_cfg)

    if keep_float:
        report.sensitivity = layer_sensitivity(model, batches, fwd)
        for row in report.sensitivity[:keep_float]:
            sim = model.get_submodule(row.name)
            sim.quant_weight = sim.quant_act = False
            report.kept_float.append(row.name)

    for name, sim in sim_layers(model):
        report.bits[name] = f"W{sim.w_bits}A{sim.a_bits}"
        report.act_amax[name] = float(sim.act_amax)
    report.layers = finalize(model)
    model.eval()
    check_calibrated(model)  # refuses an activation amax of ~0 (all-zero or constant data at a layer), naming it
    report.seconds = time.perf_counter() - t0
    return model, report


def _check_ptq_config(config: QuantConfig) -> None:
    """PTQ simulates TensorRT-style signed activations and float pools: refuse the QAT-only ONNX Runtime options."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a qat_rep.quant.QuantConfig, got {type(config).__name__}")
    on = [n for n in ("unsigned_activations", "quantize_pools") if getattr(config, n)]
    if on:
        raise ValueError(f"QuantConfig.{' and '.join(on)} is a QAT option (qat_rep.quant.prepare / RepQATCallback); "
                         "post-training quantization simulates signed activations and float pools — pass a config "
                         "with both off, e.g. QuantConfig(w_bits=..., a_bits=...)")


def sensitivity_report(model: nn.Module, calib_loader: Iterable[Any], config: QuantConfig | None = None, *,
                       calibrator: str | None = None, forward: Callable[[nn.Module, Any], Any] | None = None,
                       bins: int = 2048, act_guard: bool = True) -> list[LayerSensitivity]:
    """Per-layer sensitivity of a float model (not modified): each layer quantized alone, output MSE/SQNR.

    Layer names are those of the fused model (``stage1.0.rbr_reparam``; put the block name ``stage1.0`` in
    ``QuantConfig.skip`` to keep it float — the QAT callback and :func:`quantize_ptq` both accept that).
    Activation thresholds as in :func:`quantize_ptq` (``calibrator``, default ``config.calibrator``; ``act_guard``).
    """
    if not isinstance(act_guard, bool):
        raise TypeError(f"act_guard must be True or False, got {act_guard!r}")
    config = QuantConfig() if config is None else config
    _check_ptq_config(config)
    fwd = forward or default_forward
    batches, _ = _gather(calib_loader, config.calib_batches, None)
    if not batches:
        raise ValueError("the calibration loader is empty; sensitivity needs at least one batch")
    for i, batch in enumerate(batches):
        check_finite_batch(batch, i)
    work = copy.deepcopy(model)
    reparameterize(work, fold_post_bn=True)
    _fold_plain_bn(work)
    work.eval()
    ref = copy.deepcopy(work)
    first_last = 8 if config.first_last_8bit and (config.w_bits < 8 or config.a_bits < 8) else None
    sims = install_sim(work, config.w_bits, config.a_bits, config.per_channel, config.skip, first_last)
    _calibrate_activations(sims, ref, batches, fwd, calibrator or config.calibrator, config, bins, act_guard)
    return layer_sensitivity(work, batches, fwd)
