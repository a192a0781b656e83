"""INT8 artifacts: pickle-free deploy checkpoint, QDQ ONNX export, ONNX Runtime verification and latency.

* :func:`save_quantized` / :func:`load_quantized` — ``model.safetensors`` + ``qat_rep.json``; the loader rebuilds a
  plain ``nn.Module`` without Lightning and without unpickling anything.
* :func:`export_onnx` — the fused network with QuantizeLinear/DequantizeLinear around every quantized conv/linear
  (or the fused FP32 network), written atomically.
* :func:`verify_onnx` — ONNX Runtime vs the PyTorch fake-quant model: top-1 agreement, max logit difference in
  output quantization steps, accuracy.
* :func:`deploy` — everything a training run's end writes (checkpoint, ONNX file, ONNX Runtime check), once.
* :func:`ort_latency` — median ONNX Runtime CPU latency of ONNX files, measured interleaved in one run.
"""

from .artifact import (
    ARTIFACT_FILES,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    LayerInfo,
    artifact_layers,
    canonical_json,
    load_quantized,
    read_metadata,
    save_quantized,
)
from .atomic import ArtifactWriteError
from .calls import ModelCall
from .deploy import MIN_AGREEMENT, ONNX_FILE, VERIFY_FILE, DeployReport, deploy
from .bench import LatencyResult, ort_latency, ort_op_counts
from .onnx_export import TARGETS, ExportReport, export_onnx, quantized_node_names, shared_scale_violations
from .verify import PRECISE_INT8_KEY, VerifyResult, ort_session, verify_onnx

__all__ = [
    "save_quantized",
    "load_quantized",
    "read_metadata",
    "artifact_layers",
    "LayerInfo",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "META_FILE",
    "ARTIFACT_FILES",
    "canonical_json",
    "ArtifactWriteError",
    "export_onnx",
    "ExportReport",
    "TARGETS",
    "quantized_node_names",
    "shared_scale_violations",
    "verify_onnx",
    "VerifyResult",
    "ort_session",
    "PRECISE_INT8_KEY",
    "deploy",
    "DeployReport",
    "ModelCall",
    "ONNX_FILE",
    "VERIFY_FILE",
    "MIN_AGREEMENT",
    "ort_latency",
    "ort_op_counts",
    "LatencyResult",
]
