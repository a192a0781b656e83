"""``QuantConfig``: what to quantize and how, as one JSON-safe dataclass (checkpoints and deploy artifacts carry it)."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping

GRANULARITIES = ("per_channel", "per_tensor")
CALIBRATOR_NAMES = ("max", "percentile", "entropy", "mse")
WEIGHT_CALIBRATOR_NAMES = ("max", "mse")
RECOMPUTE_CHOICES = ("never", "cheap", "all")
#: ``recompute_post_bn="cheap"`` recomputes a block whose conv costs at most this many multiply-adds per output
#: element (``in_channels / groups · kh · kw``): a 3×3 conv on RGB (27) or a depthwise one (9)
CHEAP_RECOMPUTE_MACS = 32


def did_you_mean(name: object, valid: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest valid name, or ``""``: the suffix of every unknown-name error."""
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6) if isinstance(name, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class QuantConfig:
    """Symmetric, TensorRT-compatible fake quantization of a model's conv/linear layers and rep blocks.

    Args:
        w_bits: weight bits, 2–8. Weights are symmetric, ``amax = max|W|`` of the current (equivalent) kernel.
        a_bits: activation (layer input) bits, 2–8, per tensor, signed as TensorRT's INT8.
        w_granularity: ``"per_channel"`` (TensorRT's default: one scale per output channel) or ``"per_tensor"``.
        calibrator: how activation ``amax`` is chosen: ``max``, ``percentile``, ``entropy`` (TensorRT/YOLOv6) or
            ``mse`` (histogram MSE search, runs on CPU).
        percentile: the percentile for ``calibrator="percentile"`` (0 < p ≤ 100).
        calib_batches: how many batches :func:`qat_rep.quant.calibrate` reads.
        skip: layer names or ``fnmatch`` globs (e.g. ``"linear"``, ``"stage4.*"``) left in floating point. A rep
            block is one layer named by its module path. A pattern that matches nothing warns.
        learn_amax: learn every ``amax`` (LSQ-style: gradient through the scale, STE on the rounding) after
            calibration initialises it.
        weight_calibrator: where a learned weight ``amax`` starts: ``max`` (``max|W|``) or ``mse`` (per channel or
            tensor, the clipping of ``max|W|`` that minimises the kernel's ``Σ|W − Q(W)|^2.4``; the low-bit
            choice — at 4 bits ``max|W|`` spends the grid on a few outliers). ``mse`` needs ``learn_amax`` (a
            dynamic weight range is ``max|W|`` at every step).
        first_last_8bit: the default policy for the first conv and the classifier — both stay *quantized* (as
            TensorRT deploys them: nothing is skipped by default), and when ``w_bits``/``a_bits`` are below 8 the
            first and the last quantized layer (module order: the stem block and the classifier) keep 8 bits, the
            common practice of low-bit QAT recipes (BRECQ, QDrop, LSQ). Set ``False`` to quantize them at the
            requested bits too, or list them in ``skip`` to keep them in floating point.
        unsigned_activations: an activation quantizer whose calibration input is never negative (every ReLU
            output) uses the unsigned range ``[0, 2^a_bits - 1]``: one more bit of resolution, and in ONNX Runtime
            UINT8 tensors with the ReLU folded into the quantizer, integer from conv to conv. TensorRT has no UINT8
            activations: keep ``False`` (the default) for a TensorRT deployment.
        quantize_pools: put an input quantizer on every ``nn.AdaptiveAvgPool2d``/``nn.AvgPool2d`` (as
            pytorch-quantization's automatic mode does), so the conv before the global pool also runs in INT8
            (``8`` bits under ``first_last_8bit``, since it feeds the classifier).
        recompute_post_bn: which rep blocks with a trainable post-BN (QARepVGG) keep no float activation for that
            BatchNorm and run their conv again in backward, on its int8 input (same values and gradients, bit for
            bit): ``"cheap"`` (the default) where the conv costs at most ``CHEAP_RECOMPUTE_MACS`` (32)
            multiply-adds per output element — a stem on RGB, a depthwise conv: large activations, little compute
            (QARepVGG-A0 at 224×224 b8: 93.0 → 74.7 MB of step memory, ~1 % of its convolutions); ``"all"`` recomputes
            in every block (one more convolution per block and step, measured 1.20–1.30× the step time; QARepVGG-A0's
            fused step 0.45× → 0.39× FP32 multi-branch's step memory at 32×32 b32, but 0.40× → 0.43× at 224×224 b8,
            where the recomputed conv output is one more activation-sized buffer in backward; see
            ``benchmarks/qat_speed.py``); ``"never"``. Applies with fixed (calibrated) input ranges, outside
            ``torch.compile``; a learned input range (``learn_amax``) keeps the ordinary step.

    :meth:`for_onnxruntime` is the preset for an ONNX Runtime (CPU) deployment: both options on.
    """

    w_bits: int = 8
    a_bits: int = 8
    w_granularity: str = "per_channel"
    calibrator: str = "max"
    percentile: float = 99.99
    calib_batches: int = 4
    skip: tuple[str, ...] = ()
    learn_amax: bool = False
    weight_calibrator: str = "max"
    first_last_8bit: bool = True
    unsigned_activations: bool = False
    quantize_pools: bool = False
    recompute_post_bn: str = "cheap"

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
                raise ValueError(f"{name} must be an integer between 2 and 8, got {v!r}")
        if self.w_granularity not in GRANULARITIES:
            raise ValueError(f"w_granularity must be one of {', '.join(GRANULARITIES)}; got {self.w_granularity!r}")
        if self.calibrator not in CALIBRATOR_NAMES:
            raise ValueError(f"calibrator must be one of {', '.join(CALIBRATOR_NAMES)}; got {self.calibrator!r}"
                             f"{did_you_mean(self.calibrator, CALIBRATOR_NAMES)}")
        if self.weight_calibrator not in WEIGHT_CALIBRATOR_NAMES:
            raise ValueError(f"weight_calibrator must be one of {', '.join(WEIGHT_CALIBRATOR_NAMES)}; got "
                             f"{self.weight_calibrator!r}")
        if self.weight_calibrator == "mse" and self.learn_amax is not True:
            raise ValueError("weight_calibrator='mse' sets where a learned weight range starts: it needs "
                             "learn_amax=True (without it the weight range is max|W| at every step)")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be a number in (0, 100], got {self.percentile!r}")
        self.percentile = float(self.percentile)
        if isinstance(self.calib_batches, bool) or not isinstance(self.calib_batches, int) or self.calib_batches < 1:
            raise ValueError(f"calib_batches must be a positive integer, got {self.calib_batches!r}")
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        if not isinstance(self.skip, (tuple, list)):
            raise TypeError(f"skip must be a list or tuple of layer names or globs (e.g. ['linear', 'stage4.*']; "
                            f"[] for none), got {self.skip!r}")
        skip = tuple(self.skip)
        if not all(isinstance(s, str) and s for s in skip):
            raise TypeError(f"skip must be a sequence of non-empty layer names or globs, got {self.skip!r}")
        self.skip = skip
        if self.recompute_post_bn not in RECOMPUTE_CHOICES:
            raise ValueError(f"recompute_post_bn must be one of {', '.join(RECOMPUTE_CHOICES)}; got "
                             f"{self.recompute_post_bn!r}{did_you_mean(self.recompute_post_bn, RECOMPUTE_CHOICES)}")
        for name in ("learn_amax", "first_last_8bit", "unsigned_activations", "quantize_pools"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def for_onnxruntime(cls, **overrides: Any) -> "QuantConfig":
        """The preset for ONNX Runtime: ``unsigned_activations`` and ``quantize_pools`` on; ``overrides`` as in
        the constructor. Measured in ``benchmarks/deploy_speed.py`` against the TensorRT-style default."""
        return cls(**{"unsigned_activations": True, "quantize_pools": True, **overrides})

    @property
    def per_channel(self) -> bool:
        return self.w_granularity == "per_channel"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (``skip`` as a list) that :meth:`from_dict` turns back into an equal config."""
        d = asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantConfig":
        """Rebuild from :meth:`to_dict` output; unknown keys are an error (a newer or foreign artifact)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"QuantConfig.from_dict expects a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig key(s) {unknown}; valid keys: {sorted(known)}")
        kw = dict(data)
        if "skip" in kw and not isinstance(kw["skip"], str):
            kw["skip"] = tuple(kw["skip"])
        return cls(**kw)
