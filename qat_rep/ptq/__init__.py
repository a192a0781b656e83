"""Post-training quantization for re-parameterized networks: CFWS, AdaRound, BRECQ, MRECG, sensitivity.

Typical use (framework-free)::

    from qat_rep import create_model, make_loaders
    from qat_rep.ptq import CFWSConfig, quantize_ptq
    from qat_rep.quant import QuantConfig

    model = create_model("repvgg_a0", num_classes=10, small_input=True)   # trained weights in practice
    train_loader, _, _ = make_loaders("digits", batch_size=32)
    qmodel, report = quantize_ptq(model, train_loader, QuantConfig(w_bits=8, a_bits=8), CFWSConfig())
    print(report.to_markdown())

Each method is a frozen config dataclass (``MinMaxConfig``, ``PercentileConfig``, ``EntropyConfig``, ``MSEConfig``,
``CFWSConfig``, ``AdaRoundConfig``, ``BRECQConfig``, ``MRECGConfig``) dispatched by its type; add your own with
:func:`register_ptq_method` (see :mod:`qat_rep.ptq.methods`).
"""

from .api import METHODS, PTQContext, PTQReport, quantize_ptq, sensitivity_report
from .cfws import CFWSConv2d, CFWSSplit, cfws_split
from .methods import (AdaRoundConfig, BRECQConfig, CFWSConfig, EntropyConfig, MinMaxConfig, MRECGConfig, MSEConfig,
                      PercentileConfig, PTQMethodConfig, register_ptq_method)
from .kl import (HIST_METHODS, Histogram, amax_from_histogram, collect_input_histograms, histogram_quant_mse,
                 improved_kl_amax)
from .reconstruct import ReconConfig, Unit, UnitResult, block_units, layer_units, mixed_units, module_capacity
from .sensitivity import LayerSensitivity, layer_sensitivity

__all__ = [
    "METHODS",
    "quantize_ptq",
    "PTQReport",
    "PTQMethodConfig",
    "MinMaxConfig",
    "PercentileConfig",
    "EntropyConfig",
    "MSEConfig",
    "CFWSConfig",
    "AdaRoundConfig",
    "BRECQConfig",
    "MRECGConfig",
    "register_ptq_method",
    "PTQContext",
    "sensitivity_report",
    "LayerSensitivity",
    "layer_sensitivity",
    "CFWSConv2d",
    "CFWSSplit",
    "cfws_split",
    "Histogram",
    "HIST_METHODS",
    "improved_kl_amax",
    "amax_from_histogram",
    "histogram_quant_mse",
    "collect_input_histograms",
    "ReconConfig",
    "Unit",
    "UnitResult",
    "layer_units",
    "block_units",
    "mixed_units",
    "module_capacity",
]
