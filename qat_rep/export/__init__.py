"""INT8 artifacts: pickle-free deploy checkpoint, QDQ ONNX export, ONNX Runtime verification and latency.

* :func:`save_quantized` / :func:`load_quantized` — ``model.safetensors`` + ``qat_rep.json``; the loader rebuilds a
  plain ``nn.Module`` without Lightning and without unpickling anything.
* :func:`export_onnx` — the fused network with QuantizeLinear/DequantizeLinear around every quantized conv/linear
  (or the fused FP32 network), written atomically.
* :func:`verify_onnx` — ONNX Runtime vs the PyTorch fake-quant model: top-1 agreement, max logit difference in
  output quantization steps, accuracy.
* :func:`deploy` — everything a training run's end writes (checkpoint, ONNX file, ONNX Runtime check), once.
* :func:`ort_session` — an ONNX Runtime session with the precise INT8 setting on x86 CPUs without VNNI.

The rest — the artifact format's constants and metadata reader (:mod:`.artifact`), atomic writes (:mod:`.atomic`),
graph inspection (:mod:`.onnx_export`), latency (:mod:`.bench`) — is importable from its module.
"""

from .artifact import load_quantized, save_quantized
from .deploy import deploy
from .onnx_export import export_onnx
from .verify import ort_session, verify_onnx

__all__ = ["save_quantized", "load_quantized", "export_onnx", "verify_onnx", "deploy", "ort_session"]
