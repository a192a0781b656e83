"""The PTQ working form of a model: every conv/linear as a :class:`SimQuantLayer`, then the deployable form.

Why a working form: reconstruction methods (AdaRound, BRECQ, MRECG) differentiate through a soft rounding, learn
activation step sizes and drop quantization noise at random (QDrop) — none of which pytorch-quantization's
TensorQuantizer does. A :class:`SimQuantLayer` simulates exactly the deployed arithmetic (:mod:`.qmath`) and
:func:`finalize` replaces it by the backend's ``QuantConv2d``/``QuantLinear`` (or a :class:`~.cfws.CFWSConv2d`)
carrying the hardened weights and static amax, so the result exports like any other quantized model.
"""

from __future__ import annotations

import fnmatch
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import RepBlock
from .cfws import CFWSConv2d, cfws_split
from ..quant.qmath import channel_amax, fake_quant, fake_quant_ste, grid_floor, qbound, scale_from_amax

# AdaRound's rectified sigmoid stretch (Nagel et al., 2020)
_ZETA, _GAMMA = 1.1, -0.1


def matches_any(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """True when ``name`` equals a pattern, matches it as a glob, or lies under it (``stage1`` covers ``stage1.0.x``)."""
    return any(name == p or fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (``""`` is not allowed: the model itself is never replaced)."""
    if not name:
        raise ValueError("cannot replace the root module; quantize a model that contains the layer")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class SimQuantLayer(nn.Module):
    """A conv or linear layer with simulated input and weight quantization (what the deployed layer computes).

    State: the float weight/bias (frozen), ``w_amax`` (per channel or tensor), ``act_amax`` (per tensor; a
    parameter when step sizes are learned), optionally AdaRound's ``alpha``. Switches: ``quant_weight``,
    ``quant_act``, ``soft`` (soft rounding while reconstructing), ``qdrop`` (probability of quantizing each input
    element; 1.0 = always, 0.5 = QDrop). Stays in eval mode throughout: QDrop is a switch, not ``training``.
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, w_bits: int, a_bits: int, per_channel: bool, *, rep: bool = False):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"SimQuantLayer wraps nn.Conv2d or nn.Linear, got {type(layer).__name__}")
        qbound(w_bits), qbound(a_bits)  # validates
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups) if self.is_conv else None
        self.register_buffer("weight", layer.weight.detach().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.w_bits, self.a_bits, self.per_channel, self.rep = w_bits, a_bits, per_channel, rep
        self.register_buffer("w_amax", channel_amax(self.weight, per_channel).clone())
        self.act_amax: Tensor | nn.Parameter = nn.Parameter(torch.tensor(float("nan")), requires_grad=False)
        self.alpha: nn.Parameter | None = None
        self._ada_floor: Tensor | None = None
        self._ada_scale: Tensor | None = None
        self.last_h: Tensor | None = None
        self.quant_weight = True
        self.quant_act = True
        self.soft = False
        self.qdrop = 1.0
        self.cfws = False
        self.cfws_fine_range = "mse"  # cfws_split's fine_range
        self._split_cache: tuple[tuple, Tensor] | None = None
        # kept out of the module tree (no duplicate parameters, not found as a layer): finalize reuses it
        self.__dict__["float_layer"] = layer

    # ------------------------------------------------------------------------------------------ weights
    def init_adaround(self) -> None:
        """Start AdaRound: ``alpha`` such that the soft rounding equals the float weight exactly."""
        w = self._w_grid()
        rest = w - grid_floor(w)
        alpha = -torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1)
        self.alpha = nn.Parameter(alpha)
        # weight and scale are frozen while the rounding is learned: floor(W / s) and s once, not every iteration
        self._ada_floor, self._ada_scale = grid_floor(w), self._w_scale()
        self.last_h: Tensor | None = None

    def h(self) -> Tensor:
        """AdaRound's rectified sigmoid ``clip(sigmoid(α)·(ζ−γ) + γ, 0, 1)``."""
        if self.alpha is None:
            raise RuntimeError("h() needs AdaRound state: call init_adaround() first")
        return torch.clamp(torch.sigmoid(self.alpha) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)

    def _w_scale(self) -> Tensor:
        return scale_from_amax(self.w_amax, qbound(self.w_bits))

    def _w_grid(self) -> Tensor:
        """``W / s`` clipped to ``[-b, b]``: a clipped element has nothing left to round (rest 0, h → 0)."""
        b = qbound(self.w_bits)
        return torch.clamp(self.weight / self._w_scale(), -b, b)

    def quantized_weight(self) -> Tensor:
        """The weight the layer computes with: float, nearest-rounded, CFWS-split, soft- or hard-AdaRounded."""
        if not self.quant_weight:
            return self.weight
        if self.cfws:
            if self.alpha is not None:
                raise RuntimeError("a CFWS layer is not reconstructed: its weight is split, not AdaRounded")
            # what CFWSConv2d will compute; cached (the fine range search runs once, not on every forward)
            key = (self.weight._version, self.weight.data_ptr(), self.w_bits, self.per_channel, self.cfws_fine_range)
            if self._split_cache is None or self._split_cache[0] != key:
                split = cfws_split(self.weight, self.w_bits, self.per_channel, self.cfws_fine_range)
                self._split_cache = (key, split.coarse_3x3() + fake_quant(split.fine, split.fine_amax, self.w_bits))
            return self._split_cache[1]
        if self.alpha is None:
            return fake_quant(self.weight, self.w_amax, self.w_bits)
        b = qbound(self.w_bits)
        if self.soft:
            up = self.last_h = self.h()  # kept for the rounding regularizer of the same step (one h per step)
        else:
            up = (self.alpha >= 0).to(self.weight.dtype)
        return torch.clamp(self._ada_floor + up, -b, b) * self._ada_scale

    @torch.no_grad()
    def harden(self) -> None:
        """Bake the current rounding into ``weight`` (so nearest rounding reproduces it) and drop ``alpha``."""
        self.soft = False
        if self.alpha is not None:
            self.weight.copy_(self.quantized_weight() if self.quant_weight else self.weight)
            self.alpha = None
            self._ada_floor = self._ada_scale = self.last_h = None

    # ------------------------------------------------------------------------------------------ activations
    def set_act_amax(self, amax: float | Tensor, learn: bool = False) -> None:
        self.act_amax = nn.Parameter(torch.as_tensor(amax, dtype=torch.float32, device=self.weight.device)
                                     .reshape(()).clone(), requires_grad=learn)

    def quant_input(self, x: Tensor) -> Tensor:
        if not self.quant_act:
            return x
        if not torch.isfinite(self.act_amax):
            raise RuntimeError("SimQuantLayer has no activation amax; calibrate it first")
        xq = fake_quant_ste(x, self.act_amax, self.a_bits)
        if self.qdrop < 1.0:
            return torch.where(torch.rand_like(x) < self.qdrop, xq, x)
        return xq

    def forward(self, x: Tensor) -> Tensor:
        x = self.quant_input(x)
        w = self.quantized_weight()
        if self.is_conv:
            stride, padding, dilation, groups = self.conv_args
            return F.conv2d(x, w, self.bias, stride, padding, dilation, groups)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        kind = "conv" if self.is_conv else "linear"
        return (f"{kind} {tuple(self.weight.shape)}, W{self.w_bits}A{self.a_bits}, "
                f"{'per-channel' if self.per_channel else 'per-tensor'}, quant_w={self.quant_weight}, "
                f"quant_a={self.quant_act}, adaround={self.alpha is not None}, cfws={self.cfws}")


def find_layers(model: nn.Module, skip: tuple[str, ...] | list[str] = ()) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Conv2d``/``nn.Linear`` of ``model`` in module order, minus names matching ``skip``."""
    return [(n, m) for n, m in model.named_modules()
            if type(m) in (nn.Conv2d, nn.Linear) and n and not matches_any(n, skip)]


def _rep_conv_names(model: nn.Module) -> set[str]:
    return {f"{n}.rbr_reparam" if n else "rbr_reparam" for n, m in model.named_modules()
            if isinstance(m, RepBlock) and m.rbr_reparam is not None}


def install_sim(model: nn.Module, w_bits: int, a_bits: int, per_channel: bool, skip: tuple[str, ...] = (),
                first_last_bits: int | None = None) -> dict[str, SimQuantLayer]:
    """Replace, in place, every quantizable layer by a :class:`SimQuantLayer`; returns them by name.

    ``first_last_bits`` (e.g. 8) overrides the bits of the first and the last layer, as BRECQ does.
    """
    layers = find_layers(model, skip)
    rep = _rep_conv_names(model)
    out: dict[str, SimQuantLayer] = {}
    for i, (name, layer) in enumerate(layers):
        edge = first_last_bits is not None and i in (0, len(layers) - 1)
        wb, ab = (first_last_bits, first_last_bits) if edge else (w_bits, a_bits)
        sim = SimQuantLayer(layer, wb, ab, per_channel, rep=name in rep)
        set_module(model, name, sim)
        out[name] = sim
    return out


def sim_layers(model: nn.Module) -> Iterator[tuple[str, SimQuantLayer]]:
    """The :class:`SimQuantLayer` s of a model in its working form."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, SimQuantLayer))


@torch.no_grad()
def finalize(model: nn.Module) -> dict[str, str]:
    """Replace every :class:`SimQuantLayer` by its deployable module; returns ``{name: kind}``.

    ``QuantConv2d``/``QuantLinear`` with static amax (the weight is the hardened weight, so the backend's
    nearest rounding reproduces the reconstruction exactly), :class:`CFWSConv2d` for split layers, and the float
    layer for layers kept in floating point (both quantizations off).
    """
    from ..quant import backend

    kinds: dict[str, str] = {}
    for name, sim in list(sim_layers(model)):
        sim.harden()
        if not sim.quant_weight and not sim.quant_act:
            layer = sim.float_layer
            layer.weight.data.copy_(sim.weight)
            set_module(model, name, layer)
            kinds[name] = "float"
            continue
        if not (sim.quant_weight and sim.quant_act):
            raise ValueError(f"layer {name!r} quantizes only its {'weight' if sim.quant_weight else 'input'}; "
                             "a deployable layer quantizes both or neither")
        if sim.cfws:
            mod = CFWSConv2d.from_conv(sim.float_layer, sim.w_bits, sim.a_bits, sim.per_channel).to(sim.weight.device)
            mod.load_split(sim.weight, sim.bias, sim.act_amax.detach(), sim.cfws_fine_range)
            kinds[name] = "cfws"
        else:
            w_shape = tuple(sim.w_amax.shape) if sim.per_channel else ()
            wq = backend.make_quantizer(sim.w_bits, 0 if sim.per_channel else None, amax_shape=w_shape,
                                        name=f"{name}._weight_quantizer")
            aq = backend.make_quantizer(sim.a_bits, name=f"{name}._input_quantizer")
            wq.set_amax(sim.w_amax)
            aq.set_amax(sim.act_amax.detach())
            layer = sim.float_layer
            layer.weight.data.copy_(sim.weight)
            cls = backend.QuantConv2d if sim.is_conv else backend.QuantLinear
            mod = cls.from_float(layer, aq, wq)
            kinds[name] = "conv" if sim.is_conv else "linear"
        mod.train(sim.training)
        set_module(model, name, mod)
    return kinds
