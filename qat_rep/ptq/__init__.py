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

from .api import quantize_ptq, sensitivity_report
from .methods import (AdaRoundConfig, BRECQConfig, CFWSConfig, EntropyConfig, MinMaxConfig, MRECGConfig, MSEConfig,
                      PercentileConfig, PTQMethodConfig, register_ptq_method)

__all__ = [
    "quantize_ptq",
    "MinMaxConfig",
    "PercentileConfig",
    "EntropyConfig",
    "MSEConfig",
    "CFWSConfig",
    "AdaRoundConfig",
    "BRECQConfig",
    "MRECGConfig",
    "PTQMethodConfig",
    "register_ptq_method",
    "sensitivity_report",
]
