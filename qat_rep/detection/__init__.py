"""Object detection on top of the rep-block models: box geometry, data, loss and mAP (torch + numpy only)."""

from .boxes import NMSConfig, batched_nms, decode_outputs, make_anchors, postprocess

__all__ = ["NMSConfig", "batched_nms", "decode_outputs", "make_anchors", "postprocess"]
