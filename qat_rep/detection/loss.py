"""YOLOv6's anchor-free detection loss: task-aligned assignment, varifocal classification, GIoU box regression.

* :class:`TaskAlignedAssigner` (Feng et al., TOOD, ICCV 2021; YOLOv6's ``TaskAlignedAssigner``): for each ground
  truth, the ``topk`` anchor points inside its box with the largest alignment ``score^alpha · IoU^beta`` are
  positives; an anchor claimed by several boxes keeps the one it overlaps most. Soft targets are the alignment,
  normalized per box to the box's best IoU.
* varifocal loss (Zhang et al., VarifocalNet, CVPR 2021): BCE against the soft target, negatives down-weighted by
  ``alpha · p^gamma``.
* GIoU loss on positives, weighted by their soft target. Total = ``cls_weight · cls + iou_weight · iou``
  (YOLOv6's weights 1.0 and 2.5), both normalized by the sum of the soft targets.

DFL (``reg_max > 0``) is not implemented here: the QARep release trains without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .boxes import box_giou, dist2bbox, make_anchors, pairwise_iou, split_outputs

__all__ = ["TaskAlignedAssigner", "DetectionLossConfig", "DetectionLoss", "varifocal_loss"]


@dataclass(frozen=True)
class TaskAlignedAssigner:
    """Task-aligned label assignment (YOLOv6's defaults: ``topk=13``, ``alpha=1``, ``beta=6``)."""

    topk: int = 13
    alpha: float = 1.0
    beta: float = 6.0
    eps: float = 1e-9

    @torch.no_grad()
    def __call__(self, scores: Tensor, boxes: Tensor, points: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
                 gt_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Assign anchors to ground truths.

        ``scores`` ``(B, N, C)`` (probabilities), ``boxes`` ``(B, N, 4)`` predicted (pixels), ``points`` ``(N, 2)``,
        ``gt_labels`` ``(B, M)`` long, ``gt_boxes`` ``(B, M, 4)``, ``gt_mask`` ``(B, M)`` bool (padding is False).
        Returns ``labels`` ``(B, N)``, ``target_boxes`` ``(B, N, 4)``, soft ``target_scores`` ``(B, N, C)`` and
        the foreground mask ``(B, N)``.
        """
        b, n, c = scores.shape
        m = gt_boxes.shape[1]
        if m == 0:
            return (torch.zeros(b, n, dtype=torch.long, device=scores.device), torch.zeros_like(boxes),
                    torch.zeros_like(scores), torch.zeros(b, n, dtype=torch.bool, device=scores.device))
        lt = points[None, None] - gt_boxes[..., None, :2]
        rb = gt_boxes[..., None, 2:] - points[None, None]
        inside = torch.cat([lt, rb], -1).amin(-1) > self.eps  # (B, M, N)
        overlaps = pairwise_iou(gt_boxes, boxes).clamp(min=0)  # (B, M, N)
        cls_scores = scores.gather(2, gt_labels[:, None, :].expand(b, n, m)).transpose(1, 2)  # (B, M, N)
        align = cls_scores.pow(self.alpha) * overlaps.pow(self.beta)
        cand = align * inside
        k = min(self.topk, n)
        top = cand.topk(k, dim=-1).indices
        is_top = torch.zeros_like(inside).scatter_(-1, top, True)
        pos = is_top & inside & gt_mask[..., None]  # (B, M, N)
        multi = pos.sum(1) > 1  # an anchor claimed by several boxes keeps the best-overlapping one
        if multi.any():
            best = F.one_hot(overlaps.argmax(1), m).transpose(1, 2).bool()
            pos = torch.where(multi[:, None], best & inside & gt_mask[..., None], pos)
        fg = pos.any(1)
        gt_idx = pos.float().argmax(1)  # (B, N)
        labels = gt_labels.gather(1, gt_idx)
        target_boxes = gt_boxes.gather(1, gt_idx[..., None].expand(b, n, 4))
        align = align * pos
        norm = (align * (overlaps * pos).amax(-1, keepdim=True) / (align.amax(-1, keepdim=True) + self.eps)).amax(1)
        target_scores = F.one_hot(labels, c).to(scores.dtype) * (norm * fg)[..., None]
        return labels, target_boxes, target_scores, fg


def varifocal_loss(pred: Tensor, target: Tensor, alpha: float = 0.75, gamma: float = 2.0) -> Tensor:
    """Sum of the varifocal loss of probabilities ``pred`` against soft targets ``target`` (same shape)."""
    label = (target > 0).to(pred.dtype)
    weight = alpha * pred.detach().pow(gamma) * (1 - label) + target
    with torch.autocast(device_type=pred.device.type, enabled=False):
        bce = F.binary_cross_entropy(pred.float().clamp(1e-7, 1 - 1e-7), target.float(), reduction="none")
    return (bce * weight).sum()


@dataclass(frozen=True)
class DetectionLossConfig:
    """Weights of the two terms and the assigner (YOLOv6's defaults)."""

    cls_weight: float = 1.0
    iou_weight: float = 2.5
    assigner: TaskAlignedAssigner = TaskAlignedAssigner()

    def __post_init__(self) -> None:
        if self.cls_weight < 0 or self.iou_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got cls={self.cls_weight}, iou={self.iou_weight}")


class DetectionLoss:
    """Loss of a detector's raw outputs against ``(M, 6)`` targets ``[image index, class, x1, y1, x2, y2]``.

    ``loss(raw, targets)`` returns ``(total, {"cls": ..., "iou": ...})`` (the parts detached).
    """

    def __init__(self, num_classes: int, strides: Sequence[int], reg_max: int = 0,
                 config: DetectionLossConfig | None = None):
        if reg_max != 0:
            raise ValueError(f"DetectionLoss trains reg_max=0 heads (no DFL), got reg_max={reg_max}")
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.config = DetectionLossConfig() if config is None else config

    def _pad_targets(self, targets: Tensor, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        if targets.dim() != 2 or targets.shape[1] != 6:
            raise ValueError(f"targets must be (M, 6) [image index, class, x1, y1, x2, y2], got {tuple(targets.shape)}")
        idx = targets[:, 0].long()
        counts = torch.bincount(idx, minlength=batch) if len(idx) else torch.zeros(batch, dtype=torch.long)
        m = int(counts.max()) if len(idx) else 0
        labels = torch.zeros(batch, m, dtype=torch.long, device=targets.device)
        boxes = torch.zeros(batch, m, 4, dtype=targets.dtype, device=targets.device)
        mask = torch.zeros(batch, m, dtype=torch.bool, device=targets.device)
        cls = targets[:, 1].long()
        if len(idx) and (cls.min() < 0 or cls.max() >= self.num_classes):
            raise ValueError(f"target classes must be in [0, {self.num_classes}), got {cls.min()}..{cls.max()}")
        order = torch.argsort(idx, stable=True)
        slot = torch.arange(len(idx), device=targets.device) - torch.cumsum(counts, 0).sub(counts)[idx[order]]
        labels[idx[order], slot] = cls[order]
        boxes[idx[order], slot] = targets[order, 2:]
        mask[idx[order], slot] = True
        return labels, boxes, mask

    def __call__(self, raw: Sequence[Tensor], targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        reg, logits = split_outputs(raw, self.num_classes, 0)
        points, stride_t = make_anchors([r.shape[-2:] for r in raw], self.strides, device=reg.device,
                                        dtype=reg.dtype)
        boxes = dist2bbox(reg, points / stride_t) * stride_t  # pixels
        scores = logits.sigmoid()
        gt_labels, gt_boxes, gt_mask = self._pad_targets(targets.to(reg.device, reg.dtype), len(reg))
        _, target_boxes, target_scores, fg = self.config.assigner(
            scores.detach(), boxes.detach(), points, gt_labels, gt_boxes, gt_mask)
        norm = target_scores.sum().clamp(min=1.0)
        loss_cls = varifocal_loss(scores, target_scores) / norm
        if fg.any():
            weight = target_scores.sum(-1)[fg]
            loss_iou = ((1.0 - box_giou(boxes[fg], target_boxes[fg])) * weight).sum() / norm
        else:
            loss_iou = reg.sum() * 0.0
        total = self.config.cls_weight * loss_cls + self.config.iou_weight * loss_iou
        return total, {"cls": loss_cls.detach(), "iou": loss_iou.detach()}
