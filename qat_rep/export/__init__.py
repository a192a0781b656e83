"""INT8 artifacts: pickle-free deploy checkpoint, QDQ ONNX export, ONNX Runtime verification."""
