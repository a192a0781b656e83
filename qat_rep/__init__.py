"""qat-rep: quantization-aware training and INT8 deployment for structurally re-parameterized CNNs.

The public API is what this module exports. The core is torch-only; the Lightning layer lives in
:mod:`qat_rep.callbacks`.
"""

from __future__ import annotations

import os as _os

from .blocks import QARepVGGBlock, QARepVGGBlockV2, RepBlock, RepVGGBlock
from .data import DataSpec, load_dataset, make_loaders
from .export import export_onnx, load_quantized, save_quantized, verify_onnx
from .models import create_model, list_models
from .quant import QuantConfig
from .reparam import (
    ReparamReport,
    check_equivalence,
    convert_state_dict,
    find_rep_blocks,
    load_state_dict_any_form,
    reparameterize,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "RepBlock",
    "RepVGGBlock",
    "QARepVGGBlock",
    "QARepVGGBlockV2",
    "create_model",
    "list_models",
    "reparameterize",
    "ReparamReport",
    "check_equivalence",
    "convert_state_dict",
    "load_state_dict_any_form",
    "find_rep_blocks",
    "DataSpec",
    "load_dataset",
    "make_loaders",
    "QuantConfig",
    "save_quantized",
    "load_quantized",
    "export_onnx",
    "verify_onnx",
]

# In a source checkout the Lightning layer sits beside this package (``<root>/callbacks``) rather than inside it
# (an installed wheel has ``qat_rep/callbacks``). Let ``import qat_rep.callbacks`` find it either way — this is what
# makes a plain ``python`` started in the repository root work even when a non-editable install exists.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "callbacks")) and _os.path.isfile(
    _os.path.join(_root, "callbacks", "__init__.py")
):
    __path__.append(_os.path.join(_root, "callbacks", _os.pardir))  # type: ignore[name-defined]
