"""Box geometry of anchor-free detectors: anchor points, distance ↔ box, decoding raw head outputs, IoU, NMS.

Everything here runs *after* the network (never inside the quantized graph or an ONNX file): the detector's raw
per-level outputs ``(B, 4·(reg_max+1) + C, H, W)`` hold box distances (left, top, right, bottom) in units of the
level's stride, followed by class logits. Boxes are ``x1, y1, x2, y2`` in input pixels throughout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["make_anchors", "dist2bbox", "bbox2dist", "split_outputs", "decode_outputs", "box_iou", "box_giou", "pairwise_iou",
           "batched_nms", "NMSConfig", "postprocess"]


def make_anchors(shapes: Sequence[tuple[int, int]], strides: Sequence[int], offset: float = 0.5,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Anchor points ``(N, 2)`` (cell centres, in pixels) and their strides ``(N, 1)`` for feature maps ``(H, W)``."""
    points, stride_t = [], []
    for (h, w), s in zip(shapes, strides):
        ys = (torch.arange(h, device=device, dtype=dtype) + offset) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + offset) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx, yy], -1).reshape(-1, 2))
        stride_t.append(torch.full((h * w, 1), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(stride_t)


def dist2bbox(dist: Tensor, points: Tensor) -> Tensor:
    """Distances ``(..., 4)`` (l, t, r, b) from ``points`` ``(..., 2)`` → boxes ``(..., 4)`` (x1, y1, x2, y2)."""
    lt, rb = dist.split(2, -1)
    return torch.cat([points - lt, points + rb], -1)


def bbox2dist(points: Tensor, boxes: Tensor) -> Tensor:
    """Boxes ``(..., 4)`` → distances (l, t, r, b) from ``points`` ``(..., 2)``; the inverse of :func:`dist2bbox`."""
    x1y1, x2y2 = boxes.split(2, -1)
    return torch.cat([points - x1y1, x2y2 - points], -1)


def split_outputs(raw: Sequence[Tensor], num_classes: int, reg_max: int = 0) -> tuple[Tensor, Tensor]:
    """Flatten per-level raw outputs into ``(B, N, 4·(reg_max+1))`` distances and ``(B, N, C)`` class logits."""
    reg_ch = 4 * (reg_max + 1)
    flat = []
    for r in raw:
        if r.dim() != 4 or r.shape[1] != reg_ch + num_classes:
            raise ValueError(f"raw head output must be (B, {reg_ch + num_classes}, H, W) for {num_classes} classes "
                             f"and reg_max={reg_max}, got {tuple(r.shape)}")
        flat.append(r.flatten(2).transpose(1, 2))
    out = torch.cat(flat, 1)
    return out[..., :reg_ch], out[..., reg_ch:]


def _distances(reg: Tensor, reg_max: int) -> Tensor:
    """Box distances in stride units; with DFL the expectation over ``reg_max + 1`` bins."""
    if reg_max == 0:
        return reg
    prob = F.softmax(reg.unflatten(-1, (4, reg_max + 1)), -1)
    return prob @ torch.arange(reg_max + 1, dtype=reg.dtype, device=reg.device)


def decode_outputs(raw: Sequence[Tensor], strides: Sequence[int], num_classes: int,
                   reg_max: int = 0) -> tuple[Tensor, Tensor]:
    """Raw head outputs → boxes ``(B, N, 4)`` (xyxy pixels) and class scores ``(B, N, C)`` (sigmoid)."""
    reg, cls = split_outputs(raw, num_classes, reg_max)
    points, stride_t = make_anchors([r.shape[-2:] for r in raw], strides, device=reg.device, dtype=reg.dtype)
    boxes = dist2bbox(_distances(reg, reg_max), points / stride_t) * stride_t
    return boxes, cls.sigmoid()


def box_iou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """Element-wise IoU of aligned boxes ``(..., 4)``."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter + eps)


def box_giou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """Element-wise generalized IoU of aligned boxes ``(..., 4)`` (Rezatofighi et al., CVPR 2019), in [-1, 1]."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1) + (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1) - inter
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    iou = inter / (union + eps)
    return iou - (hull - union) / (hull + eps)


def pairwise_iou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of every box in ``a`` ``(..., M, 4)`` with every box in ``b`` ``(..., N, 4)`` → ``(..., M, N)``."""
    return box_iou(a.unsqueeze(-2), b.unsqueeze(-3), eps)


@torch.no_grad()
def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_thres: float) -> Tensor:
    """Greedy class-aware NMS: indices of the kept boxes, highest score first.

    Same contract as ``torchvision.ops.batched_nms`` (a box is suppressed by a higher-scoring box of the same label
    with IoU > ``iou_thres``); written here because this package's CPU torch has no matching torchvision build.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True)
    # shift each label's boxes to its own region so boxes of different labels never overlap
    shift = labels[order].to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 1)
    b = boxes[order] + shift
    over = pairwise_iou(b, b) > iou_thres
    suppressed = torch.zeros(len(b), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(len(b)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


@dataclass(frozen=True)
class NMSConfig:
    """Post-processing thresholds (YOLOv6's evaluation defaults: confidence 0.03, IoU 0.65, 300 boxes); at most
    ``max_candidates`` boxes per image, the highest-scoring, enter NMS."""

    conf_thres: float = 0.03
    iou_thres: float = 0.65
    max_det: int = 300
    max_candidates: int = 3000

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf_thres < 1.0:
            raise ValueError(f"conf_thres must be in [0, 1), got {self.conf_thres}")
        if not 0.0 < self.iou_thres <= 1.0:
            raise ValueError(f"iou_thres must be in (0, 1], got {self.iou_thres}")
        if self.max_det < 1 or self.max_candidates < 1:
            raise ValueError(f"max_det and max_candidates must be >= 1, got {self.max_det}, {self.max_candidates}")


@torch.no_grad()
def postprocess(boxes: Tensor, scores: Tensor, config: NMSConfig | None = None) -> list[dict[str, Tensor]]:
    """Per-image detections after class-aware NMS (:func:`batched_nms`), best class per anchor.

    Returns one dict per image with ``boxes`` ``(K, 4)``, ``scores`` ``(K,)`` and ``labels`` ``(K,)`` — the format
    of torchmetrics' ``MeanAveragePrecision`` and of :func:`qat_rep.detection.metrics.coco_map`.
    """
    config = NMSConfig() if config is None else config
    out = []
    for b, s in zip(boxes, scores):
        conf, labels = s.max(-1)
        keep = conf > config.conf_thres
        b, conf, labels = b[keep].float(), conf[keep].float(), labels[keep]
        if len(conf) > config.max_candidates:
            top = conf.topk(config.max_candidates).indices
            b, conf, labels = b[top], conf[top], labels[top]
        idx = batched_nms(b, conf, labels, config.iou_thres)[: config.max_det]
        out.append({"boxes": b[idx], "scores": conf[idx], "labels": labels[idx]})
    return out
