"""Object detection on top of the rep-block models: box geometry, data, loss and mAP (torch + numpy only)."""

from .boxes import NMSConfig, postprocess
from .loss import DetectionLoss, DetectionLossConfig
from .metrics import coco_map

__all__ = ["NMSConfig", "postprocess", "DetectionLoss", "DetectionLossConfig", "coco_map"]
