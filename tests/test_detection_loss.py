"""Detection loss (task-aligned assigner, varifocal, GIoU) and the COCO mAP wrapper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qat_rep.detection.boxes import bbox2dist, box_giou, make_anchors
from qat_rep.detection.loss import DetectionLoss, TaskAlignedAssigner, varifocal_loss
from qat_rep.detection.metrics import coco_map

STRIDES = (8, 16, 32)
SHAPES = [(8, 8), (4, 4), (2, 2)]


def test_assigner_picks_anchors_inside_the_box():
    points, _ = make_anchors(SHAPES, STRIDES)
    n = len(points)
    gt = torch.tensor([[[8.0, 8.0, 40.0, 40.0], [0, 0, 0, 0]]])
    scores = torch.full((1, n, 3), 0.5)
    boxes = gt[:, :1].expand(1, n, 4).clone()  # every prediction equals the box: alignment = score
    labels, tboxes, tscores, fg = TaskAlignedAssigner(topk=5)(
        scores, boxes, points, torch.tensor([[2, 0]]), gt, torch.tensor([[True, False]]))
    inside = ((points > 8) & (points < 40)).all(-1)
    assert fg[0].sum() == 5 and not (fg[0] & ~inside).any()
    assert (labels[0][fg[0]] == 2).all() and torch.equal(tboxes[0][fg[0]], gt[0, 0].expand(5, 4))
    assert torch.allclose(tscores[0][fg[0]], torch.tensor([0.0, 0.0, 1.0]).expand(5, 3))
    assert tscores[0][~fg[0]].abs().sum() == 0


def test_assigner_without_boxes():
    points, _ = make_anchors(SHAPES, STRIDES)
    out = TaskAlignedAssigner()(torch.rand(2, len(points), 3), torch.rand(2, len(points), 4), points,
                                torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 4),
                                torch.zeros(2, 0, dtype=torch.bool))
    assert not out[3].any() and out[2].sum() == 0


def test_varifocal_loss_formula():
    p = torch.tensor([0.2, 0.7, 0.9])
    q = torch.tensor([0.0, 0.6, 0.0])
    expect = (F.binary_cross_entropy(p, q, reduction="none") * torch.tensor([0.75 * 0.04, 0.6, 0.75 * 0.81])).sum()
    assert torch.allclose(varifocal_loss(p, q), expect)


def _raw_for(boxes_per_image, logits=(-4.0, -4.0, -4.0)):
    """Raw outputs whose every anchor predicts ``boxes_per_image[b]`` with class logits ``logits``."""
    points, stride = make_anchors(SHAPES, STRIDES)
    raw = []
    start = 0
    for (h, w), s in zip(SHAPES, STRIDES):
        sl = slice(start, start + h * w)
        start += h * w
        per_image = []
        for box in boxes_per_image:
            dist = bbox2dist(points[sl], box.expand(h * w, 4)) / s
            cls = torch.tensor(logits)[:, None].expand(len(logits), h * w)
            per_image.append(torch.cat([dist.T, cls]).reshape(-1, h, w))
        raw.append(torch.stack(per_image))
    return raw


def test_loss_prefers_correct_boxes_and_classes():
    box = torch.tensor([8.0, 8.0, 40.0, 40.0])
    targets = torch.tensor([[0, 1, *box.tolist()]])
    loss = DetectionLoss(3, STRIDES)
    _, parts = loss(_raw_for([box, box]), targets)
    _, parts_wrong = loss(_raw_for([box + 12, box]), targets)
    assert parts["iou"] < 1e-5 < 0.1 < parts_wrong["iou"]
    _, right_cls = loss(_raw_for([box, box], (-4.0, 4.0, -4.0)), targets)
    _, wrong_cls = loss(_raw_for([box, box], (4.0, -4.0, -4.0)), targets)
    assert right_cls["cls"] < wrong_cls["cls"]
    raw = [r.requires_grad_() for r in _raw_for([box + 12, box])]
    total, _ = loss(raw, targets)
    total.backward()
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in raw)
    empty, _ = loss(_raw_for([box, box]), torch.zeros(0, 6))
    assert torch.isfinite(empty) and empty > 0  # negatives still pay the classification term


def test_loss_bad_input():
    with pytest.raises(ValueError, match="reg_max=0"):
        DetectionLoss(3, STRIDES, reg_max=16)
    loss = DetectionLoss(3, STRIDES)
    with pytest.raises(ValueError, match=r"targets must be \(M, 6\)"):
        loss(_raw_for([torch.tensor([0, 0, 8, 8.0])]), torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"target classes must be in \[0, 3\)"):
        loss(_raw_for([torch.tensor([0, 0, 8, 8.0])]), torch.tensor([[0, 3, 0, 0, 8, 8.0]]))


def test_giou():
    a = torch.tensor([0.0, 0, 2, 2])
    assert box_giou(a, a).item() == pytest.approx(1.0)
    assert box_giou(a, torch.tensor([4.0, 0, 6, 2])).item() == pytest.approx(-2 / 6)


def test_coco_map():
    t = [{"boxes": torch.tensor([[10.0, 10, 30, 30], [40, 40, 60, 60]]), "labels": torch.tensor([1, 2])}]
    perfect = [{"boxes": t[0]["boxes"], "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}]
    assert coco_map(perfect, t) == {"map": pytest.approx(1.0), "map_50": pytest.approx(1.0)}
    shifted = [{"boxes": t[0]["boxes"] + 4, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}]
    r = coco_map(shifted, t)  # IoU 0.47: misses 0.5 but counts at no threshold
    assert r["map"] == 0.0
    near = [{"boxes": t[0]["boxes"] + 1, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}]
    r = coco_map(near, t)  # IoU 0.82: counts at 0.5..0.8
    assert r["map_50"] == pytest.approx(1.0) and 0.5 < r["map"] < 0.8
    none = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}]
    assert coco_map(none, t)["map"] == 0.0
    with pytest.raises(ValueError, match="one of each per image"):
        coco_map(perfect * 2, t)
