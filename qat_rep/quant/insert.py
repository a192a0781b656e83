"""Quantizer insertion (:func:`prepare`), the deployable fused form (:func:`convert`) and layer discovery.

:func:`prepare` works in place and never wraps the model's forward: rep blocks get ``block.rep_quant`` (a
:class:`~qat_rep.quant.rep_qat.RepQuant`), plain ``nn.Conv2d``/``nn.Linear``/``nn.ConvTranspose2d`` become
``QuantConv2d``/``QuantLinear``/``QuantConvTranspose2d`` holding the same ``Parameter`` objects. The resulting
module names and state-dict keys depend only on the architecture and the :class:`QuantConfig`, so a loader can
rebuild the structure before loading weights.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..blocks import RepBlock
from ..fuse import bn_module_scale, fold_bn_into_conv_
from .backend import (FoldedBatchNorm2d, LeanReLU, QuantAvgPool, QuantConv2d, QuantConvTranspose2d, QuantLinear,
                      TensorQuantizer, make_quantizer)
from .config import CHEAP_RECOMPUTE_MACS, WEIGHT_CALIBRATOR_NAMES, QuantConfig
from . import qmath as qm
from .rep_qat import RepQuant, deploy_kernel_bias, folded_kernel_bias

CONFIG_ATTR = "qat_rep_quant_config"
_PLAIN = (QuantConv2d, QuantLinear, QuantConvTranspose2d)


@dataclass
class PrepareReport:
    """What :func:`prepare` did: quantized rep blocks and plain layers (name → ``(w_bits, a_bits)``), pools with an
    input quantizer (name → ``a_bits``), skipped names."""

    rep_blocks: dict[str, tuple[int, int]] = field(default_factory=dict)
    plain: dict[str, tuple[int, int]] = field(default_factory=dict)
    pools: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    unmatched_skip: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rep_blocks) + len(self.plain)

    def __str__(self) -> str:
        pools = f", {len(self.pools)} pool(s)" if self.pools else ""
        lines = [f"prepared {len(self.rep_blocks)} rep block(s) and {len(self.plain)} plain layer(s){pools}; "
                 f"{len(self.skipped)} skipped"]
        for kind, d in (("rep", self.rep_blocks), ("plain", self.plain)):
            lines += [f"  {n or '<root>'}: {kind} W{w}A{a}" for n, (w, a) in d.items()]
        lines += [f"  {n}: pool input A{a}" for n, a in self.pools.items()]
        lines += [f"  {n}: skipped (float)" for n in self.skipped]
        return "\n".join(lines)


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def _units(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Quantizable units in module order: ``(name, module, kind)``, kind ``rep`` | ``conv`` | ``linear`` |
    ``deconv`` (an ``nn.ConvTranspose2d`` with ``groups=1``, e.g. YOLOv6's upsampling; grouped ones stay float).

    Everything inside an unfused rep block belongs to the block (its branch convs are never quantized on their
    own; an SE inside a block stays float). A fused block's ``rbr_reparam`` is a plain conv.
    """
    units: list[tuple[str, nn.Module, str]] = []
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(m, RepBlock) and not m.fused:
            units.append((name, m, "rep"))
            inside.append(f"{name}." if name else "")
        elif isinstance(m, RepBlock):
            inside.append(f"{name}.se." if name else "se.")
        elif type(m) is nn.Conv2d:
            units.append((name, m, "conv"))
        elif type(m) is nn.Linear:
            units.append((name, m, "linear"))
        elif type(m) is nn.ConvTranspose2d and m.groups == 1:
            units.append((name, m, "deconv"))
    return units


def _pools(model: nn.Module, units: list[tuple[str, nn.Module, str]]) -> list[tuple[str, nn.Module]]:
    """Average pools outside rep blocks, in module order (``QuantConfig.quantize_pools``)."""
    inside = [f"{n}." for n, _, kind in units if kind == "rep"]
    return [(n, m) for n, m in model.named_modules()
            if type(m) in (nn.AdaptiveAvgPool2d, nn.AvgPool2d) and n and not any(n.startswith(p) for p in inside)]


def is_prepared(model: nn.Module) -> bool:
    """True when ``model`` holds any quantized layer (a ``RepQuant``, ``QuantConv2d``, ``QuantLinear``,
    ``QuantConvTranspose2d`` or pool)."""
    return any(isinstance(m, (RepQuant, *_PLAIN, QuantAvgPool)) for m in model.modules())


def get_config(model: nn.Module) -> QuantConfig:
    """The :class:`QuantConfig` that :func:`prepare` recorded on ``model``."""
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is None:
        raise ValueError("model was not prepared by qat_rep.quant.prepare; call prepare(model, QuantConfig()) first")
    return cfg if isinstance(cfg, QuantConfig) else QuantConfig.from_dict(cfg)


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _weight_quantizer(cfg: QuantConfig, bits: int, weight_shape: torch.Size, name: str,
                      axis: int = 0) -> TensorQuantizer:
    """``axis``: the weight's output-channel axis (0 for convs and linears, 1 for a transposed conv)."""
    if cfg.per_channel:
        shape = tuple(int(weight_shape[axis]) if d == axis else 1 for d in range(len(weight_shape)))
        q = make_quantizer(bits, axis=axis, calibrator="max", learn_amax=cfg.learn_amax, amax_shape=shape,
                           dynamic=not cfg.learn_amax, name=name)
    else:
        q = make_quantizer(bits, axis=None, calibrator="max", learn_amax=cfg.learn_amax, dynamic=not cfg.learn_amax,
                           name=name)
    q.qat_rep_role = "weight"
    return q


def _input_quantizer(cfg: QuantConfig, bits: int, name: str) -> TensorQuantizer:
    q = make_quantizer(bits, axis=None, calibrator=cfg.calibrator, learn_amax=cfg.learn_amax,
                       auto_unsigned=cfg.unsigned_activations, name=name)
    q.qat_rep_role = "input"
    return q


def _recomputes_post_bn(cfg: QuantConfig, kernel: torch.Tensor) -> bool:
    """Does a rep block with this equivalent ``kernel`` recompute its conv for a training post-BN
    (``QuantConfig.recompute_post_bn``)? ``kernel[0].numel()`` is the conv's multiply-adds per output element."""
    if cfg.recompute_post_bn == "all":
        return True
    return cfg.recompute_post_bn == "cheap" and kernel[0].numel() <= CHEAP_RECOMPUTE_MACS


def prepare(model: nn.Module, config: QuantConfig | None = None) -> PrepareReport:
    """Insert fake quantizers into ``model`` in place (rep blocks: equivalent-kernel QAT, phase ``qat``).

    Every non-inplace ``nn.ReLU`` becomes a :class:`~.backend.LeanReLU` (same values and gradients, a bit mask kept
    for backward instead of the float output).

    Raises ``ValueError`` for a model with no conv/linear layer or rep block, or one already prepared; warns
    (``UserWarning``) for a ``skip`` pattern that matches no layer. Quantizers start uncalibrated: run
    :func:`qat_rep.quant.calibrate` before a quantized forward (or load a calibrated state dict).
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a qat_rep.quant.QuantConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if is_prepared(model):
        raise ValueError("model is already prepared for quantization (it holds quantized layers); "
                         "prepare a fresh model instead of calling prepare() twice")
    units = _units(model)
    if not units:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d, nn.Linear or rep block to quantize")
    report = PrepareReport()
    used = set()
    active: list[tuple[str, nn.Module, str]] = []
    pools = [(n, m, "pool") for n, m in _pools(model, units)] if config.quantize_pools else []
    for name, m, kind in units + pools:
        hit = [p for p in config.skip if _matches(name, p)]
        used.update(hit)
        if hit:
            report.skipped.append(name)
        else:
            active.append((name, m, kind))
    pools = [(n, m) for n, m, kind in active if kind == "pool"]
    active = [u for u in active if u[2] != "pool"]
    report.unmatched_skip = [p for p in config.skip if p not in used]
    for p in report.unmatched_skip:
        warnings.warn(f"QuantConfig.skip pattern {p!r} matches no quantizable layer of {type(model).__name__}; "
                      f"layers are named like {units[0][0]!r} or {units[-1][0]!r}", UserWarning, stacklevel=2)
    if not active:
        raise ValueError("QuantConfig.skip leaves no layer to quantize; remove patterns from skip")
    edge = {active[0][0], active[-1][0]} if config.first_last_8bit else set()
    for name, m, kind in active:
        w_bits, a_bits = (8, 8) if name in edge else (config.w_bits, config.a_bits)
        if kind == "rep":
            kernel, _ = m.equivalent_kernel_bias()
            rq = RepQuant(_input_quantizer(config, a_bits, f"{name}.rep_quant._input_quantizer"),
                          _weight_quantizer(config, w_bits, kernel.shape, f"{name}.rep_quant._weight_quantizer"),
                          recompute_post_bn=_recomputes_post_bn(config, kernel))
            m.rep_quant = rq.to(device=kernel.device)
            report.rep_blocks[name] = (w_bits, a_bits)
        else:
            cls = {"conv": QuantConv2d, "linear": QuantLinear, "deconv": QuantConvTranspose2d}[kind]
            q = cls.from_float(m, _input_quantizer(config, a_bits, f"{name}._input_quantizer"),
                               _weight_quantizer(config, w_bits, m.weight.shape, f"{name}._weight_quantizer",
                                                 axis=1 if kind == "deconv" else 0))
            q.train(m.training)
            _set_child(model, name, q)
            report.plain[name] = (w_bits, a_bits)
    _pair_conv_bn(model)
    for name, m in [(n, m) for n, m in model.named_modules() if type(m) is nn.ReLU and not m.inplace]:
        _set_child(model, name, LeanReLU.from_relu(m))
    pool_bits = 8 if config.first_last_8bit else config.a_bits  # the pool feeds the (8-bit) classifier
    device = next((b.device for b in model.buffers()), None)
    for name, m in pools:
        iq = _input_quantizer(config, pool_bits, f"{name}._input_quantizer")
        _set_child(model, name, QuantAvgPool(m, iq.to(device=device) if device is not None else iq))
        report.pools[name] = pool_bits
    setattr(model, CONFIG_ATTR, config)
    return report


def _pair_conv_bn(model: nn.Module) -> int:
    """Pair every quantized plain conv with the BN that :func:`convert` will fold into it, so that evaluation mode
    computes the converted conv (:meth:`QuantConv2d.fold_bn`). Only where convert's fold is exact: a dynamic,
    not learned weight quantizer (the amax of the folded kernel is taken from it) and a plain ``BatchNorm2d`` of
    the conv's width. Returns the number of pairs."""
    n = 0
    for name, layer in [(n_, m) for n_, m in model.named_modules() if type(m) is QuantConv2d]:
        wq = layer._weight_quantizer
        if not wq.dynamic or wq.learn_amax:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        found = bn_after(parent, child, layer)
        if found is None or type(found[1]) is not nn.BatchNorm2d or found[1].num_features != layer.out_channels:
            continue
        bn = FoldedBatchNorm2d.from_bn(found[1])
        setattr(parent, found[0], bn)
        layer.fold_bn(bn)
        n += 1
    return n


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quantized layers of a prepared or converted model, in module order.

    Each exposes ``._input_quantizer`` and ``._weight_quantizer``; for a rep block in QAT form that is its
    ``rep_quant`` (named ``<block>.rep_quant``), after :func:`convert` its ``rbr_reparam`` (a ``QuantConv2d``).
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (RepQuant, *_PLAIN))]


def quantizers(model: nn.Module, role: str | None = None) -> list[tuple[str, TensorQuantizer]]:
    """Every qat_rep ``TensorQuantizer`` (``role``: ``"input"``, ``"weight"`` or ``None`` for both)."""
    out = []
    for n, m in model.named_modules():
        if isinstance(m, TensorQuantizer) and (role is None or getattr(m, "qat_rep_role", None) == role):
            out.append((n, m))
    return out


def _parent_block(model: nn.Module, rep_quant_name: str) -> RepBlock:
    parent = rep_quant_name.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model  # type: ignore[return-value]


@torch.no_grad()
def refresh_weight_amax(model: nn.Module, method: str | None = None) -> int:
    """Set every weight ``amax`` from the current (equivalent, post-BN-folded) kernel; returns the count.

    ``max|W|`` per channel/tensor — dynamic weight quantizers do this at every forward anyway. Learned ones
    (``learn_amax``) take it as their initial value, or with ``QuantConfig.weight_calibrator="mse"`` the clipping
    that minimises the kernel's quantization error (:func:`~.qmath.mse_weight_amax`): at 4 bits ``max|W|`` spends
    the grid on a few large weights, and a learned range moves about one learning rate per step. ``method``
    (``"max"``/``"mse"``) overrides the config's.
    """
    if method is None:
        method = get_config(model).weight_calibrator if getattr(model, CONFIG_ATTR, None) is not None else "max"
    if method not in WEIGHT_CALIBRATOR_NAMES:
        raise ValueError(f"method must be one of {', '.join(WEIGHT_CALIBRATOR_NAMES)}; got {method!r}")
    mse = method == "mse"
    n = 0
    for name, layer in quant_layers(model):
        wq = layer._weight_quantizer
        kernel = (folded_kernel_bias(_parent_block(model, name))[0] if isinstance(layer, RepQuant)
                  else layer.weight).detach()
        if mse and wq.learn_amax:
            wq.set_amax(qm.mse_weight_amax(kernel, wq.num_bits, wq.axis is not None))
        else:
            wq.set_amax(wq.reduce_amax(kernel))
        n += 1
    return n


def bn_after(parent: nn.Module, conv_name: str, conv: nn.Module) -> tuple[str, nn.Module] | None:
    """The BN that directly follows ``conv`` in ``parent``: next child of a Sequential, or the ``conv``/``bn`` pair."""
    names = list(parent._modules)
    if isinstance(parent, nn.Sequential):
        i = names.index(conv_name)
        if i + 1 < len(names):
            cand = parent._modules[names[i + 1]]
            if isinstance(cand, nn.BatchNorm2d):
                return names[i + 1], cand
        return None
    if conv_name == "conv" and isinstance(parent._modules.get("bn"), nn.BatchNorm2d):
        return "bn", parent._modules["bn"]
    if conv_name == "rbr_reparam" and isinstance(parent, RepBlock):
        return None  # a fused block folds its own post-BN (fold_post_bn)
    return None


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Turn a prepared model into the deployable fused form, in place; returns ``model``.

    Each rep block's ``rbr_reparam`` becomes a ``QuantConv2d`` with the fused kernel and the block's quantizers
    (QARep post-BN folded; the weight ``amax`` is recomputed from the folded kernel, which is exact for per-channel
    weights and, thanks to folding the post-BN during QAT, for per-tensor ones). A BN that directly follows a
    quantized plain conv (next in a Sequential, or the ``conv``/``bn`` attribute pair) is folded into it (exact for
    per-channel weights; approximate for per-tensor). Skipped (float) rep blocks are fused in float. No branches
    remain. Works on an uncalibrated prepared model (structure only).
    """
    if not is_prepared(model):
        raise ValueError("model is not prepared for quantization; call qat_rep.quant.prepare(model, config) first")
    for name, block in [(n, m) for n, m in model.named_modules() if isinstance(m, RepBlock)]:
        rq = block.rep_quant
        if rq is None:
            block.switch_to_deploy()
            if block.fold_post_bn() and isinstance(block.rbr_reparam, QuantConv2d):
                wq = block.rbr_reparam._weight_quantizer
                if not wq.learn_amax:
                    wq.set_amax(wq.reduce_amax(block.rbr_reparam.weight))
            continue
        kernel, bias = deploy_kernel_bias(block)
        if getattr(block, "bn", None) is not None:
            block.bn = None
        conv = QuantConv2d(block.in_channels, block.out_channels, 3, block.stride, 1, 1, block.groups, True)
        conv = conv.to(device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel.detach())
        conv.bias.copy_(bias.detach())
        conv._input_quantizer = rq._input_quantizer
        conv._weight_quantizer = rq._weight_quantizer
        if not conv._weight_quantizer.learn_amax:
            conv._weight_quantizer.set_amax(conv._weight_quantizer.reduce_amax(conv.weight))
        conv.train(block.training)
        block._drop_branches()
        block.rep_quant = None
        block.rbr_reparam = conv
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantConv2d)]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        found = bn_after(parent, child, layer)
        if found is None or found[1].num_features != layer.out_channels:
            continue
        bn_name, bn = found
        layer.unfold_bn()
        fold_bn_into_conv_(layer, bn)
        wq = layer._weight_quantizer
        if not wq.learn_amax:
            wq.set_amax(wq.reduce_amax(layer.weight))
        elif wq.axis is not None:  # a learned per-channel amax scales exactly with |t|
            t = bn_module_scale(bn)
            wq.set_amax(wq.amax.detach().flatten() * t.abs())
        setattr(parent, bn_name, nn.Identity())
    return model
