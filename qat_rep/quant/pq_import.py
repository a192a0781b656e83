"""pytorch-quantization, imported here and nowhere else: once, quietly, and the few names the backend builds on.

The library is imported by :func:`import_quietly` (which keeps the process's log lines single) before any of its
submodules, so the submodules are looked up with :func:`importlib.import_module` after it rather than imported at
the top. :mod:`.backend` takes everything it needs from here.
"""

from __future__ import annotations

import importlib
import logging


def import_quietly() -> None:
    """Import pytorch-quantization without doubling every log line of the process.

    Its ``__init__`` calls ``absl.logging.use_absl_handler()``, which puts absl's handler on the *root* logger; and
    every absl call runs ``logging.basicConfig()`` whenever the root logger has no handler. Either way Lightning,
    which lets records propagate to a configured root logger, then prints each INFO line twice (once in absl's
    format, after a "Logging before flag parsing goes to stderr" notice). When this import added absl's handler, it
    is replaced by one that prints WARNING and above as Python's last-resort handler would (``levelname:name:msg``),
    so INFO chatter appears once and warnings still reach stderr. An absl application re-installs absl's handler in
    ``absl.app.run``; ``logging.basicConfig(force=True)`` replaces ours.
    """
    before = list(logging.root.handlers)
    import pytorch_quantization  # noqa: F401

    added = [h for h in logging.root.handlers if h not in before and type(h).__name__ == "ABSLHandler"]
    for handler in added:
        logging.root.removeHandler(handler)
    if added and not logging.root.handlers:
        quiet = logging.StreamHandler()
        quiet.setLevel(logging.WARNING)
        quiet.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        logging.root.addHandler(quiet)


import_quietly()

#: calibrators (``MaxCalibrator``, ``HistogramCalibrator``) and the quantized layers (``QuantConv2d``, ...)
calib = importlib.import_module("pytorch_quantization.calib")
quant_nn = importlib.import_module("pytorch_quantization.nn")
TensorQuantizer = importlib.import_module("pytorch_quantization.nn.modules.tensor_quantizer").TensorQuantizer
QuantDescriptor = importlib.import_module("pytorch_quantization.tensor_quant").QuantDescriptor
fake_tensor_quant = importlib.import_module("pytorch_quantization.tensor_quant").fake_tensor_quant
#: the library's amax searches over a histogram (TensorRT's entropy, MSE, percentile), private in the library
_histogram = importlib.import_module("pytorch_quantization.calib.histogram")
compute_amax_entropy = _histogram._compute_amax_entropy
compute_amax_mse = _histogram._compute_amax_mse
compute_amax_percentile = _histogram._compute_amax_percentile
