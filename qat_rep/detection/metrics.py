"""COCO mAP (0.5:0.95 and 0.5) of detections, computed by pycocotools' reference ``COCOeval``, in memory.

torchmetrics' ``MeanAveragePrecision`` would be the Lightning-native choice, but it requires torchvision, and no
torchvision build matches this project's CPU torch; its ``pycocotools`` backend is what runs underneath, so the
numbers are the same. Inputs use torchmetrics' format: per image a dict with ``boxes`` ``(K, 4)`` (x1, y1, x2, y2),
``scores`` and ``labels`` for predictions, ``boxes`` and ``labels`` for targets.
"""

from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np
from torch import Tensor

__all__ = ["coco_map"]


def _xywh(boxes: Tensor) -> np.ndarray:
    b = boxes.detach().cpu().double().numpy().reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1)


def coco_map(preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> dict[str, float]:
    """``{"map": mAP@0.5:0.95, "map_50": mAP@0.5}`` over all images (areas "all", up to 100 detections per image).

    An image list without any ground-truth box is refused (the metric is undefined); no detections give 0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} prediction dicts but {len(targets)} target dicts; pass one of each per image")
    images, annotations, results, classes = [], [], [], set()
    for i, (p, t) in enumerate(zip(preds, targets)):
        images.append({"id": i})
        for box, label in zip(_xywh(t["boxes"]), t["labels"].tolist()):
            classes.add(int(label))
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(label),
                                "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": 0})
        for box, score, label in zip(_xywh(p["boxes"]), p["scores"].tolist(), p["labels"].tolist()):
            results.append({"image_id": i, "category_id": int(label), "bbox": box.tolist(), "score": float(score)})
    if not annotations:
        raise ValueError("targets hold no boxes: mAP is undefined without ground truth")
    if not results:
        return {"map": 0.0, "map_50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c} for c in sorted(classes | {r["category_id"] for r in results})]}
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": max(float(ev.stats[0]), 0.0), "map_50": max(float(ev.stats[1]), 0.0)}
