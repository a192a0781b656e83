"""Quantization core: config, the pytorch-quantization backend, quantizer insertion, calibration, equivalent-kernel QAT.

Typical use (framework-free)::

    from qat_rep import create_model
    from qat_rep.quant import QuantConfig, prepare, calibrate, convert

    model = create_model("qarepvgg_a0", num_classes=10, small_input=True)
    prepare(model, QuantConfig(w_bits=8, a_bits=8))
    calibrate(model, loader)          # any iterable of batches
    ...                               # train: every block runs one conv of its fake-quantized equivalent kernel
    convert(model)                    # deployable fused form (QuantConv2d per block, post-BN folded)
"""

from .backend import NotCalibratedError
from .calibrate import calibrate
from .config import QuantConfig
from .insert import convert, prepare
from .report import layer_report
from .schedule import Schedule, apply_schedule
from .shared_scales import share_input_scales

__all__ = [
    "QuantConfig",
    "prepare",
    "calibrate",
    "convert",
    "Schedule",
    "apply_schedule",
    "layer_report",
    "share_input_scales",
    "NotCalibratedError",
]
