"""qat-rep: quantization-aware training and INT8 deployment for structurally re-parameterized CNNs.

The public API is what the ``__all__`` of this package and of its sub-packages (``qat_rep.quant``, ``.ptq``,
``.export``, ``.models``, ``.data``, ``.detection`` and the Lightning layer ``qat_rep.callbacks``) list; the README's
"API" table has every name. Everything else is importable by its module path (``qat_rep.quant.calibrate``, ...) but
may change. The core is torch-only; the Lightning layer lives in :mod:`qat_rep.callbacks`.
"""

from __future__ import annotations

from .data import DataSpec, load_dataset, make_loaders
from .export import deploy, export_onnx, load_quantized, save_quantized, verify_onnx
from .models import create_model, list_models
from .ptq import (AdaRoundConfig, BRECQConfig, CFWSConfig, EntropyConfig, MinMaxConfig, MRECGConfig, MSEConfig,
                  PercentileConfig, quantize_ptq)
from .quant import QuantConfig, Schedule, calibrate, convert, prepare
from .reparam import check_equivalence, load_state_dict_any_form, reparameterize

__version__ = "0.1.0"

__all__ = [
    # models and re-parameterization
    "create_model",
    "list_models",
    "reparameterize",
    "check_equivalence",
    "load_state_dict_any_form",
    # data
    "DataSpec",
    "load_dataset",
    "make_loaders",
    # quantization-aware training
    "QuantConfig",
    "Schedule",
    "prepare",
    "calibrate",
    "convert",
    # post-training quantization: the verb and one config class per method
    "quantize_ptq",
    "MinMaxConfig",
    "PercentileConfig",
    "EntropyConfig",
    "MSEConfig",
    "CFWSConfig",
    "AdaRoundConfig",
    "BRECQConfig",
    "MRECGConfig",
    # deployment
    "save_quantized",
    "load_quantized",
    "export_onnx",
    "verify_onnx",
    "deploy",
]
