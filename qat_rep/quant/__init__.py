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

from .backend import NotCalibratedError, onnx_export_mode
from .calibrate import (
    AMAX_FLOOR,
    CalibrationSession,
    CalibReport,
    DegenerateCalibrationError,
    calibrate,
    check_calibrated,
    check_finite_batch,
    histogram_mse_amax,
    is_calibrated,
)
from .config import QuantConfig
from .insert import PrepareReport, convert, get_config, prepare, quant_layers, quantizers, refresh_weight_amax
from .rep_qat import PHASES, RepQuant
from .report import LayerReport, LayerRow, layer_report
from .schedule import PhaseRule, Schedule, apply_schedule, rep_stages, reset_optimizer_state
from .shared_scales import share_input_scales, tie_quantizers
from .state import check_incoming_state, check_same_config, config_mismatch, quantizers_disabled

__all__ = [
    "QuantConfig",
    "prepare",
    "PrepareReport",
    "calibrate",
    "CalibrationSession",
    "CalibReport",
    "is_calibrated",
    "check_calibrated",
    "check_finite_batch",
    "DegenerateCalibrationError",
    "AMAX_FLOOR",
    "histogram_mse_amax",
    "convert",
    "quant_layers",
    "quantizers",
    "refresh_weight_amax",
    "get_config",
    "share_input_scales",
    "tie_quantizers",
    "RepQuant",
    "PHASES",
    "Schedule",
    "PhaseRule",
    "apply_schedule",
    "reset_optimizer_state",
    "rep_stages",
    "layer_report",
    "LayerReport",
    "LayerRow",
    "NotCalibratedError",
    "config_mismatch",
    "check_same_config",
    "check_incoming_state",
    "quantizers_disabled",
    "onnx_export_mode",
]
