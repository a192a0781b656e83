"""PTQ methods as config objects, dispatched by the config's type.

Each method is a frozen dataclass holding its settings, validated when it is built, and one handler registered
for its type with :func:`register_ptq_method`; :func:`~.api.quantize_ptq` looks the handler up by
``type(method)`` (the pattern of torchao's ``quantize_`` and its ``register_quantize_module_handler``)::

    quantize_ptq(model, loader, QuantConfig(w_bits=4, a_bits=4), MRECGConfig(k=2, iters=200, qdrop=0.5))

The string form ``quantize_ptq(..., method="mrecg", k=2, iters=200)`` builds the same config (:func:`method_config`).

A handler receives a :class:`~.api.PTQContext` — the fused model with every quantized layer a
:class:`~.layers.SimQuantLayer` (weight amax at ``max|W|``, activation amax not yet set), its float copy, the
calibration batches — and sets every layer's thresholds (and, for reconstruction, its weights).
``quantize_ptq`` does the rest (optional float layers, deployable modules, the calibration check). A method of
your own::

    @dataclass(frozen=True)
    class HalfMaxConfig(PTQMethodConfig):
        name: ClassVar[str] = "halfmax"
        fraction: float = 0.5

    @register_ptq_method(HalfMaxConfig)
    def _halfmax(ctx: PTQContext, method: HalfMaxConfig) -> None:
        ctx.calibrate_activations("max")
        for sim in ctx.sims.values():
            sim.set_act_amax(float(sim.act_amax) * method.fraction)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Sequence, TypeVar

from .cfws import FINE_RANGES
from ..quant.config import did_you_mean
from .kl import HIST_METHODS
from .reconstruct import (ReconConfig, Unit, block_units, data_capacity, layer_units, mixed_units, module_capacity,
                          reconstruct)

if TYPE_CHECKING:
    from .api import PTQContext

PTQHandler = Callable[["PTQContext", Any], None]
_HANDLERS: dict[type, PTQHandler] = {}
_C = TypeVar("_C", bound=PTQHandler)


def _positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _flag(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {v!r}")


def gather_batches(loader: Iterable[Any], max_batches: int | None, max_samples: int | None) -> tuple[list[Any], int]:
    """The first batches of ``loader``: up to ``max_batches`` batches or until ``max_samples`` samples (``None``: no
    limit); returns them and their number of samples."""
    batches: list[Any] = []
    n = 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        batches.append(batch)
        n += int(x.shape[0]) if hasattr(x, "shape") and len(x.shape) else 1
        if (max_batches is not None and len(batches) >= max_batches) or (max_samples is not None and n >= max_samples):
            break
    return batches, n


# ------------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class PTQMethodConfig:
    """Base of every PTQ method's settings. A subclass is a frozen dataclass with a ``name`` (the method's string
    form and ``PTQReport.method``), validates its fields in ``__post_init__`` and has a handler registered with
    :func:`register_ptq_method`."""

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        """Validate the fields (subclasses extend this; the base has none)."""

    def calibration_batches(self, loader: Iterable[Any], calib_batches: int) -> tuple[list[Any], int]:
        """The batches this method reads from the calibration loader, and their number of samples: the first
        ``calib_batches`` (``QuantConfig.calib_batches``) by default."""
        return gather_batches(loader, calib_batches, None)

    def to_dict(self) -> dict[str, Any]:
        """The settings, for :class:`~.api.PTQReport` (``options``)."""
        return asdict(self)


@dataclass(frozen=True)
class _HistogramCalibration(PTQMethodConfig):
    """Calibration only: weights at ``max|W|``, activation thresholds by ``rule`` from input histograms."""

    rule: ClassVar[str] = "max"


@dataclass(frozen=True)
class MinMaxConfig(_HistogramCalibration):
    """Calibration only: activation threshold = the maximum of ``|input|`` on the calibration data (``"max"``, as
    ``QuantConfig.calibrator`` names it; ``"minmax"``, the PTQ literature's name, is accepted as an alias)."""

    name: ClassVar[str] = "max"
    rule: ClassVar[str] = "max"


@dataclass(frozen=True)
class PercentileConfig(_HistogramCalibration):
    """Calibration only: activation threshold at ``QuantConfig.percentile`` of ``|input|``."""

    name: ClassVar[str] = "percentile"
    rule: ClassVar[str] = "percentile"


@dataclass(frozen=True)
class EntropyConfig(_HistogramCalibration):
    """Calibration only: TensorRT's KL (entropy) threshold, kept where it quantizes no worse than the maximum."""

    name: ClassVar[str] = "entropy"
    rule: ClassVar[str] = "entropy"


@dataclass(frozen=True)
class MSEConfig(_HistogramCalibration):
    """Calibration only: the activation threshold of least quantization MSE on the input histogram."""

    name: ClassVar[str] = "mse"
    rule: ClassVar[str] = "mse"


@dataclass(frozen=True)
class CFWSConfig(PTQMethodConfig):
    """Coarse & fine weight splitting: fused rep 3×3 kernels run as a coarse centre plus a fine rest (:mod:`.cfws`).

    Args:
        split: split the fused rep 3×3 kernels (``False``: improved KL alone).
        improved_kl: activation thresholds by CFWS's improved KL (``False``: ``QuantConfig.calibrator``).
        fine_range: the fine part's weight amax: ``"mse"`` (default) or ``"max"`` (the paper's); see :mod:`.cfws`.
    """

    name: ClassVar[str] = "cfws"
    split: bool = True
    improved_kl: bool = True
    fine_range: str = "mse"

    def __post_init__(self) -> None:
        _flag("split", self.split)
        _flag("improved_kl", self.improved_kl)
        if self.fine_range not in FINE_RANGES:
            raise ValueError(f"fine_range must be one of {FINE_RANGES}, got {self.fine_range!r}")


@dataclass(frozen=True)
class _ReconMethodConfig(ReconConfig, PTQMethodConfig):
    """Reconstruction (every :class:`~.reconstruct.ReconConfig` field: ``iters``, ``batch_size``, ``qdrop=0.5`` for
    QDrop, …) after calibration.

    Args:
        act_calibrator: activation thresholds before reconstruction (``mse`` as in BRECQ/QDrop), one of
            ``max``/``percentile``/``entropy``/``mse``/``improved_kl``.
        weight_init: weight amax before reconstruction: ``mse`` (search) or ``max``.
        num_samples: calibration samples read from the loader (at least one ``batch_size``).
    """

    act_calibrator: str = "mse"
    weight_init: str = "mse"
    num_samples: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.act_calibrator not in HIST_METHODS:
            raise ValueError(f"unknown calibration method {self.act_calibrator!r}"
                             f"{did_you_mean(self.act_calibrator, HIST_METHODS)}; valid: {', '.join(HIST_METHODS)}")
        if self.weight_init not in ("max", "mse"):
            raise ValueError(f"weight_init must be 'max' or 'mse', got {self.weight_init!r}")
        _positive_int("num_samples", self.num_samples)

    def calibration_batches(self, loader: Iterable[Any], calib_batches: int) -> tuple[list[Any], int]:
        """``num_samples`` samples; refuses fewer than one reconstruction batch."""
        batches, n = gather_batches(loader, None, self.num_samples)
        if batches and n < self.batch_size:
            raise ValueError(f"the calibration set has {n} sample(s), fewer than one reconstruction batch "
                             f"(batch_size={self.batch_size}); pass more data or a smaller batch_size")
        return batches, n


@dataclass(frozen=True)
class AdaRoundConfig(_ReconMethodConfig):
    """AdaRound: layer-wise reconstruction of the rounding (see :class:`_ReconMethodConfig` for the fields)."""

    name: ClassVar[str] = "adaround"


def _blocks(blocks: Sequence[str] | None) -> tuple[str, ...] | None:
    if blocks is None:
        return None
    if isinstance(blocks, str) or not all(isinstance(b, str) for b in blocks):
        raise TypeError(f"blocks must be a list of module names, got {blocks!r}")
    return tuple(blocks)


@dataclass(frozen=True)
class BRECQConfig(_ReconMethodConfig):
    """BRECQ: block-wise reconstruction.

    Args:
        blocks: module names of the blocks (residual units) for a model without rep blocks; by default every rep
            block is a unit (without any, reconstruction falls back to layer-wise units with a warning).
    """

    name: ClassVar[str] = "brecq"
    blocks: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "blocks", _blocks(self.blocks))


@dataclass(frozen=True)
class MRECGConfig(_ReconMethodConfig):
    """MRECG: BRECQ's units with the ``k`` adjacent pairs of largest capacity difference reconstructed jointly.

    Args:
        blocks: as :class:`BRECQConfig`.
        k: jointly reconstructed adjacent pairs (``0`` is BRECQ).
        capacity: ``data_free`` (parameters × bits × ``stride_penalty^(stride − 1)``) or ``data_dependent`` (each
            unit's loss with nearest rounding).
        stride_penalty: the data-free capacity's penalty per stride step.
    """

    name: ClassVar[str] = "mrecg"
    blocks: tuple[str, ...] | None = None
    k: int = 3
    capacity: str = "data_free"
    stride_penalty: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "blocks", _blocks(self.blocks))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"k (number of jointly reconstructed pairs) must be a non-negative integer, "
                             f"got {self.k!r}")
        if self.capacity not in ("data_free", "data_dependent"):
            raise ValueError(f"capacity must be 'data_free' or 'data_dependent', got {self.capacity!r}")
        if isinstance(self.stride_penalty, bool) or not isinstance(self.stride_penalty, (int, float)) \
                or not math.isfinite(self.stride_penalty) or self.stride_penalty <= 0:
            raise ValueError(f"stride_penalty must be a positive number, got {self.stride_penalty!r}")


# ------------------------------------------------------------------------------------------------- registry
def register_ptq_method(*config_types: type[PTQMethodConfig]) -> Callable[[_C], _C]:
    """Decorator: ``handler(ctx, method)`` runs :func:`~.api.quantize_ptq` for configs of these exact types.

    Each type must be a dataclass subclassing :class:`PTQMethodConfig` (frozen, as the base) with a unique ``name``;
    the name also becomes the method's string form (``quantize_ptq(..., method=name, **fields)``). Registering a
    type again replaces its handler.
    """
    for t in config_types:
        if not (isinstance(t, type) and issubclass(t, PTQMethodConfig) and is_dataclass(t)):
            raise TypeError(f"register_ptq_method takes PTQMethodConfig dataclasses, got {t!r}")
        if not t.name or t.name in ALIASES or any(o.name == t.name and o is not t for o in _HANDLERS):
            raise ValueError(f"{t.__name__}.name must be a non-empty name no other PTQ method has, got {t.name!r}")

    def decorate(handler: _C) -> _C:
        for t in config_types:
            _HANDLERS[t] = handler
        return handler

    return decorate


def ptq_handler(method: PTQMethodConfig) -> PTQHandler:
    """The handler registered for ``type(method)``."""
    try:
        return _HANDLERS[type(method)]
    except KeyError:
        raise TypeError(f"no PTQ handler is registered for {type(method).__name__}; decorate one with "
                        f"@register_ptq_method({type(method).__name__})") from None


#: other names of registered methods (the string form only)
ALIASES: dict[str, str] = {"minmax": "max"}


def method_config(method: PTQMethodConfig | str, options: dict[str, Any]) -> PTQMethodConfig:
    """``method`` as a config: a config is returned as it is (``options`` must be empty); a registered name builds
    its config from ``options`` (the string form of :func:`~.api.quantize_ptq`)."""
    if isinstance(method, PTQMethodConfig):
        if options:
            raise TypeError(f"options {sorted(options)} given beside a {type(method).__name__}; set them in the "
                            "config object")
        ptq_handler(method)
        return method
    by_name = {t.name: t for t in _HANDLERS}
    if isinstance(method, str):
        method = ALIASES.get(method, method)
    if not isinstance(method, str) or method not in by_name:
        raise ValueError(f"unknown PTQ method {method!r}{did_you_mean(method, by_name)}; valid: {', '.join(by_name)}")
    cls = by_name[method]
    valid = [f.name for f in fields(cls)]
    bad = sorted(set(options) - set(valid))
    if bad:
        raise TypeError(f"method {method!r} got unknown option(s) {bad}; valid: {', '.join(valid) or '(none)'}")
    return cls(**options)


# ------------------------------------------------------------------------------------------------- handlers
#: the methods this package registers, in the order of ``qat_rep.ptq.api.METHODS``
BUILTIN_METHODS: tuple[type[PTQMethodConfig], ...] = (MinMaxConfig, PercentileConfig, EntropyConfig, MSEConfig,
                                                      CFWSConfig, AdaRoundConfig, BRECQConfig, MRECGConfig)


@register_ptq_method(MinMaxConfig, PercentileConfig, EntropyConfig, MSEConfig)
def _calibrate(ctx: PTQContext, method: _HistogramCalibration) -> None:
    ctx.calibrate_activations(method.rule)


@register_ptq_method(CFWSConfig)
def _cfws(ctx: PTQContext, method: CFWSConfig) -> None:
    if method.split:
        for sim in ctx.sims.values():
            sim.cfws = sim.rep and sim.is_conv and tuple(sim.weight.shape[-2:]) == (3, 3)
            sim.cfws_fine_range = method.fine_range
    ctx.calibrate_activations("improved_kl" if method.improved_kl else ctx.config.calibrator)


def _reconstruct(ctx: PTQContext, method: _ReconMethodConfig, units: Callable[[], list[Unit]]) -> None:
    """Weights, then activation thresholds (measured with the weights they will meet), then the units."""
    if method.weight_init == "mse":
        ctx.mse_weight_amax()
    ctx.calibrate_activations(method.act_calibrator)
    todo = units()
    with ctx.progress_bar(method.name) as bar:
        ctx.report.units = reconstruct(ctx.model, ctx.float_model, todo, ctx.batches, ctx.forward, method, bar)


@register_ptq_method(AdaRoundConfig)
def _adaround(ctx: PTQContext, method: AdaRoundConfig) -> None:
    _reconstruct(ctx, method, lambda: layer_units(ctx.model))


@register_ptq_method(BRECQConfig)
def _brecq(ctx: PTQContext, method: BRECQConfig) -> None:
    _reconstruct(ctx, method, lambda: block_units(ctx.model, method.blocks))


@register_ptq_method(MRECGConfig)
def _mrecg(ctx: PTQContext, method: MRECGConfig) -> None:
    def units() -> list[Unit]:
        blocks = block_units(ctx.model, method.blocks)
        if method.capacity == "data_free":
            caps = [module_capacity(ctx.model, u, method.stride_penalty) for u in blocks]
        else:
            caps = data_capacity(ctx.model, ctx.float_model, blocks, ctx.batches[:2], ctx.forward)
        merged, ctx.report.pairs = mixed_units(blocks, caps, method.k, ctx.connected)
        return merged

    _reconstruct(ctx, method, units)
