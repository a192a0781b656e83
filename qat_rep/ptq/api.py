"""``quantize_ptq``: one entry point for every post-training method, on the fused model.

Pipeline (the method's part, steps 3–5, is the handler registered for its config type, :mod:`.methods`):

1. :func:`qat_rep.reparameterize` (QARep post-BN folded) and a plain conv's following BN folded — PTQ sees the
   network that will be deployed.
2. Every conv/linear becomes a :class:`~.layers.SimQuantLayer` (``config.skip`` stays float; with
   ``config.first_last_8bit`` the first and last layer keep 8 bits when fewer are requested).
3. Weight ``amax`` = ``max|W|`` (or BRECQ's MSE search); CFWS marks the rep kernels it splits.
4. Activation ``amax`` from ``|input|`` histograms of the float model (:mod:`.kl`): ``max`` / ``percentile`` /
   ``entropy`` / ``mse`` / CFWS's ``improved_kl``; per layer, the maximum replaces a threshold that gives the
   quantized layer a larger output error on the calibration data, and the maximum replaces them all when the
   quantized network's output error is larger with them than without (:mod:`.act_guard`).
5. Reconstruction: AdaRound / BRECQ / MRECG (:mod:`.reconstruct`).
6. Optional partial quantization: the ``keep_float`` most sensitive layers (:mod:`.sensitivity`) stay float.
7. :func:`~.layers.finalize`: backend ``QuantConv2d``/``QuantLinear``/:class:`~.cfws.CFWSConv2d` with static amax.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import nn

from ..fuse import fold_bn_into_conv_
from ..quant.insert import bn_after
from ..quant import QuantConfig
from ..quant.calibrate import check_calibrated, check_finite_batch, default_forward
from ..reparam import reparameterize
from .act_guard import ActChoice, NetworkChoice, check_network, choose_act_amax
from .kl import amax_from_histogram, collect_input_histograms
from .layers import SimQuantLayer, finalize, install_sim, sim_layers
from .methods import BUILTIN_METHODS, MinMaxConfig, PTQMethodConfig, method_config, ptq_handler
from ..quant.qmath import mse_weight_amax
from .reconstruct import UnitResult, connected
from .sensitivity import LayerSensitivity, layer_sensitivity

log = logging.getLogger(__name__)

#: the built-in methods' string forms (``quantize_ptq(..., method=name, **options)``)
METHODS = tuple(t.name for t in BUILTIN_METHODS)


@dataclass
class PTQReport:
    """What :func:`quantize_ptq` did: method, settings, per-layer kinds, activation threshold rules (``act_choice``:
    the calibrator's threshold or the maximum, whichever gave the layer the smaller output error; ``act_network``:
    the network-level check of those choices against the maximum everywhere), reconstruction losses, timing."""

    method: str
    config: dict[str, Any]
    options: dict[str, Any]
    layers: dict[str, str] = field(default_factory=dict)  # name -> "conv" | "linear" | "cfws" | "float"
    bits: dict[str, str] = field(default_factory=dict)  # name -> "W8A8"
    act_amax: dict[str, float] = field(default_factory=dict)
    act_choice: dict[str, ActChoice] = field(default_factory=dict)  # which threshold rule won, per layer
    act_network: NetworkChoice | None = None  # None: no layer had a threshold below its maximum to check
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
            lines += [f"activation thresholds: " + ", ".join(f"{rules.count(r)} {r}" for r in dict.fromkeys(rules))]
            net = self.act_network
            if net is not None:
                lines.append(f"network output MSE on the calibration data: {_num(net.chosen_mse)} with the layers' "
                             f"choices, {_num(net.max_mse)} with the maximum everywhere → "
                             + ("choices kept" if net.winner == "layers"
                                else f"maximum everywhere ({net.layers_changed} layer(s) set back)"))
            lines += ["", "| layer | threshold rule | amax | amax / max | output MSE (rule) | output MSE (max) |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {n} | {c.winner}{_fallback(c)} | {c.amax:.4g} | "
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
                          "" if c is None else c.winner + _fallback(c),
                          f"{u.loss_before:.4g} → {u.loss_after:.4g}" if u else "")
        return table


# ------------------------------------------------------------------------------------------------- helpers
def _num(v: float) -> str:
    """A table cell: ``—`` for a value that was not measured (NaN)."""
    return "—" if math.isnan(v) else f"{v:.3g}"


@torch.no_grad()
def _fallback(c: ActChoice) -> str:
    return (" (fallback, network)" if c.network else " (fallback)") if c.fell_back else ""


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


def _calibrate_activations(qmodel: nn.Module, sims: dict[str, Any], fmodel: nn.Module, batches: list[Any],
                           fwd: Callable[[nn.Module, Any], Any], rule: str, config: QuantConfig, bins: int,
                           guard: bool) -> tuple[dict[str, ActChoice], NetworkChoice | None]:
    """Every layer's activation amax: ``rule`` on the histogram of its float input; when ``guard``, checked
    against the maximum by the layer's output error, then by the network's (:mod:`.act_guard`)."""
    hists = collect_input_histograms(fmodel, {n: fmodel.get_submodule(n) for n in sims}, batches, fwd, bins)
    rule_amax = {n: amax_from_histogram(hists[n], rule, s.a_bits, config.percentile) for n, s in sims.items()}
    max_amax = {n: hists[n].amax for n in sims}
    if guard:
        choices = choose_act_amax(sims, fmodel, batches, fwd, rule, rule_amax, max_amax)
        return check_network(qmodel, sims, fmodel, batches, fwd, choices)
    nan = float("nan")
    for n, s in sims.items():
        s.set_act_amax(rule_amax[n])
    return {n: ActChoice(rule, rule, rule_amax[n], rule_amax[n], max_amax[n], nan, nan) for n in sims}, None


@dataclass
class PTQContext:
    """What a PTQ method's handler (:func:`~.methods.register_ptq_method`) works on.

    ``model`` is the fused model in its working form: every quantized layer a :class:`~.layers.SimQuantLayer`
    (``sims``, by name) with its weight amax at ``max|W|`` and no activation amax yet. ``float_model`` is its fused
    float copy (same module names), the reference; ``batches`` are the calibration batches, run with ``forward``.
    A handler sets every layer's activation amax (:meth:`calibrate_activations`), may change weights and weight
    amax, and records what it did in ``report``.
    """

    model: nn.Module
    float_model: nn.Module
    sims: dict[str, SimQuantLayer]
    batches: list[Any]
    forward: Callable[[nn.Module, Any], Any]
    config: QuantConfig
    report: PTQReport
    bins: int = 2048
    act_guard: bool = True
    progress: bool = False

    def calibrate_activations(self, rule: str) -> None:
        """Every layer's activation amax by ``rule`` (``max``, ``percentile``, ``entropy``, ``mse``,
        ``improved_kl``) from histograms of its float input, checked against the maximum by the layer's output
        error, then by the network's, when ``act_guard`` (:mod:`.act_guard`); the decisions go to
        ``report.act_choice`` and ``report.act_network``. Set the weights first: the checks measure each layer
        with the weights it will deploy."""
        self.report.act_choice, self.report.act_network = _calibrate_activations(
            self.model, self.sims, self.float_model, self.batches, self.forward, rule, self.config, self.bins,
            self.act_guard)

    @torch.no_grad()
    def mse_weight_amax(self) -> None:
        """Every layer's weight amax by MSE search (BRECQ's initialization) instead of ``max|W|``."""
        for sim in self.sims.values():
            sim.w_amax.copy_(mse_weight_amax(sim.weight, sim.w_bits, sim.per_channel))

    def connected(self, a: str, b: str) -> bool:
        """True when module ``b`` consumes exactly what module ``a`` produces (checked on one float batch)."""
        return connected(self.float_model, a, b, self.batches[0], self.forward)

    def progress_bar(self, label: str) -> ContextManager[Any]:
        """A ``rich`` progress bar for :func:`~.reconstruct.reconstruct` when ``progress``, else ``None``."""
        if not self.progress:
            return contextlib.nullcontext(None)
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return Progress(TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), transient=True)


def _prepare(model: nn.Module, calib_loader: Iterable[Any], config: QuantConfig | None, method: PTQMethodConfig,
             forward: Callable[[nn.Module, Any], Any] | None, bins: int, act_guard: bool, progress: bool,
             purpose: str) -> PTQContext:
    """Validate, read the method's calibration batches, fuse ``model`` in place (rep blocks with QARep's post-BN,
    a plain conv's BN) and install the simulated layers: the setup of :func:`quantize_ptq` and
    :func:`sensitivity_report`."""
    config = QuantConfig() if config is None else config
    _check_ptq_config(config)
    if not isinstance(act_guard, bool):
        raise TypeError(f"act_guard must be True or False, got {act_guard!r}")
    batches, n_samples = method.calibration_batches(calib_loader, config.calib_batches)
    if not batches:
        raise ValueError(f"the calibration loader is empty; {purpose} needs at least one batch of representative "
                         "inputs")
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
    report = PTQReport(method.name, config.to_dict(), method.to_dict(), calib_samples=n_samples)
    return PTQContext(model, fmodel, sims, batches, forward or default_forward, config, report, bins, act_guard,
                      progress)


def _keep_float(ctx: PTQContext, n: int) -> None:
    """Partial quantization: the ``n`` layers whose quantization changes the model output most stay float."""
    ctx.report.sensitivity = layer_sensitivity(ctx.model, ctx.batches, ctx.forward)
    for row in ctx.report.sensitivity[:n]:
        sim = ctx.model.get_submodule(row.name)
        sim.quant_weight = sim.quant_act = False
        ctx.report.kept_float.append(row.name)


# ------------------------------------------------------------------------------------------------- API
def quantize_ptq(model: nn.Module, calib_loader: Iterable[Any], config: QuantConfig | None = None,
                 method: PTQMethodConfig | str = MinMaxConfig(), *,
                 forward: Callable[[nn.Module, Any], Any] | None = None, keep_float: int = 0, progress: bool = False,
                 bins: int = 2048, act_guard: bool = True, **method_options: Any) -> tuple[nn.Module, PTQReport]:
    """Post-training quantization of ``model`` (in place; returned for chaining) and a :class:`PTQReport`.

    ``model`` (train or fused form) is fused first. ``calib_loader`` is any iterable of batches (``(inputs,
    targets)`` or inputs), ``config`` the bits, granularity, ``skip`` and ``first_last_8bit``. ``method`` is a
    method config (:mod:`.methods`: ``MinMaxConfig()``, ``PercentileConfig()``, ``EntropyConfig()``,
    ``MSEConfig()``, ``CFWSConfig()``, ``AdaRoundConfig(iters=...)``, ``BRECQConfig(blocks=...)``,
    ``MRECGConfig(k=..., capacity=...)`` or one of your own) or a method's name with its fields as keywords
    (``method="mrecg", k=2``). ``forward(model, batch)`` runs a batch (default ``model(batch[0])`` for tuples and
    lists); ``keep_float`` keeps the N most output-sensitive layers float; ``progress`` shows a progress bar while
    reconstructing; ``bins`` are the activation histograms' bins; ``act_guard`` keeps a calibrator's threshold
    only where the layer's output error is not larger than with the maximum (``report.act_choice``).
    """
    t0 = time.perf_counter()
    method = method_config(method, method_options)
    if isinstance(keep_float, bool) or not isinstance(keep_float, int) or keep_float < 0:
        raise ValueError(f"keep_float must be a non-negative integer, got {keep_float!r}")
    ctx = _prepare(model, calib_loader, config, method, forward, bins, act_guard, progress, "PTQ")
    ptq_handler(method)(ctx, method)
    if keep_float:
        _keep_float(ctx, keep_float)
    for name, sim in sim_layers(model):
        ctx.report.bits[name] = f"W{sim.w_bits}A{sim.a_bits}"
        ctx.report.act_amax[name] = float(sim.act_amax)
    ctx.report.layers = finalize(model)
    model.eval()
    check_calibrated(model)  # refuses an activation amax of ~0 (all-zero or constant data at a layer), naming it
    ctx.report.seconds = time.perf_counter() - t0
    return model, ctx.report


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
                       bins: int = 2048, act_guard: bool = True,
                       metric: Callable[[nn.Module], float] | None = None) -> list[LayerSensitivity]:
    """Per-layer sensitivity of a float model (not modified): each layer quantized alone, output MSE/SQNR.

    Layer names are those of the fused model (``stage1.0.rbr_reparam``; put the block name ``stage1.0`` in
    ``QuantConfig.skip`` to keep it float — the QAT callback and :func:`quantize_ptq` both accept that).
    Activation thresholds as in :func:`quantize_ptq` (``calibrator``, default ``config.calibrator``; ``act_guard``),
    on ``config.calib_batches`` batches.

    ``metric``: a task score of the model (``fn(model) -> float``, higher is better, e.g. mAP on a validation
    subset; the model is in eval mode and returns what the float model returns). Each layer is then also scored by
    the metric it costs when quantized alone (``LayerSensitivity.metric_drop``), and the rows are ranked by that.
    One evaluation per layer: keep the metric's data small.
    """
    ctx = _prepare(copy.deepcopy(model), calib_loader, config, MinMaxConfig(), forward, bins, act_guard, False,
                   "sensitivity")
    ctx.calibrate_activations(calibrator or ctx.config.calibrator)
    return layer_sensitivity(ctx.model, ctx.batches, ctx.forward, metric)
