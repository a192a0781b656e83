"""YOLOv6 detectors: upstream keys load strictly, fusion is exact, raw vs decoded outputs, box decoding and NMS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import randomize_bn

from qat_rep import reparameterize
from qat_rep.detection.boxes import NMSConfig, batched_nms, decode_outputs, make_anchors, pairwise_iou, postprocess
from qat_rep.models import create_model, list_models

UPSTREAM = json.loads((Path(__file__).parent / "data" / "yolov6n_upstream_keys.json").read_text())


def test_registered():
    assert list_models("yolov6_*") == ["yolov6_n", "yolov6_s"]


@pytest.mark.parametrize("block,listed", [("repvgg", "repvgg"), ("qarepvgg", "qarepvggv2"),
                                          ("qarepvggv2", "qarepvggv2")])
def test_upstream_state_dict_loads_strictly(block, listed):
    shapes = UPSTREAM[listed]
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g))
          for k, s in shapes.items()}
    model = create_model("yolov6_n", num_classes=80, block=block)
    ours = model.state_dict()
    assert {k: list(v.shape) for k, v in ours.items()} == shapes
    model.load_state_dict(sd, strict=True)
    k = "neck.Rep_n4.block.0.rbr_dense.conv.weight"
    assert torch.equal(model.state_dict()[k], sd[k])


def test_prefixes_and_strides():
    model = create_model("yolov6_n", num_classes=3)
    assert [n for n, _ in model.named_children()] == ["backbone", "neck", "detect"]
    model.train()
    raw = model(torch.randn(1, 3, 64, 96))
    assert [tuple(r.shape) for r in raw] == [(1, 7, 8, 12), (1, 7, 4, 6), (1, 7, 2, 3)]


@pytest.mark.parametrize("block", ["repvgg", "qarepvgg", "qarepvggv2"])
def test_reparameterized_detector_equals_train_form(block):
    torch.manual_seed(0)
    model = create_model("yolov6_n", num_classes=5, block=block)
    randomize_bn(model, torch.Generator().manual_seed(1))
    for p in model.detect.parameters():  # the prediction convs start at zero: give them weights
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    model.eval().export = True
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        reparameterize(model, fold_post_bn=True)
        out = model(x)
    assert not any(n.endswith("rbr_dense") for n, _ in model.named_modules())
    for a, b in zip(ref, out):
        rel = ((a - b).norm() / a.norm()).item()
        assert rel < 1e-5, rel


def test_eval_decodes_and_export_keeps_raw():
    model = create_model("yolov6_n", num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        boxes, scores = model(x)
        model.export = True
        raw = model(x)
    n = 8 * 8 + 4 * 4 + 2 * 2
    assert boxes.shape == (2, n, 4) and scores.shape == (2, n, 4)
    assert isinstance(raw, list) and len(raw) == 3
    b2, s2 = decode_outputs(raw, model.strides, 4)
    assert torch.equal(b2, boxes) and torch.equal(s2, scores)
    # upstream's head start: zero weights, distance bias 1 → a 2-stride square around each cell centre
    points, stride = make_anchors([(8, 8), (4, 4), (2, 2)], (8, 16, 32))
    expect = torch.cat([points - stride, points + stride], -1)
    assert torch.allclose(boxes[0], expect)
    assert torch.allclose(scores, torch.full_like(scores, 0.01), atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="reg_max must be 0"):
        create_model("yolov6_n", num_classes=3, reg_max=7)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        create_model("yolov6_n", num_classes=0)
    with pytest.raises(ValueError, match="unknown block type"):
        create_model("yolov6_n", num_classes=3, block="resnet")
    with pytest.raises(ValueError, match=r"raw head output must be \(B, 7, H, W\)"):
        decode_outputs([torch.zeros(1, 6, 2, 2)], (8,), 3)


def _reference_nms(boxes, scores, labels, thr):
    keep = []
    for i in sorted(range(len(scores)), key=lambda i: -float(scores[i])):
        if all(labels[j] != labels[i] or pairwise_iou(boxes[i:i + 1], boxes[j:j + 1])[0, 0] <= thr for j in keep):
            keep.append(i)
    return keep


def test_batched_nms_matches_greedy_reference():
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        xy = torch.rand(60, 2, generator=g) * 40
        boxes = torch.cat([xy, xy + 5 + torch.rand(60, 2, generator=g) * 20], 1)
        scores = torch.rand(60, generator=g)
        labels = torch.randint(0, 3, (60,), generator=g)
        assert batched_nms(boxes, scores, labels, 0.5).tolist() == _reference_nms(boxes, scores, labels, 0.5)
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).numel() == 0


def test_postprocess_thresholds():
    boxes = torch.tensor([[[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 5, 5.0]]])
    scores = torch.tensor([[[0.9, 0.0], [0.8, 0.1], [0.0, 0.7], [0.01, 0.02]]])
    (det,) = postprocess(boxes, scores, NMSConfig(conf_thres=0.05, iou_thres=0.5))
    assert det["labels"].tolist() == [0, 1] and det["scores"].tolist() == pytest.approx([0.9, 0.7])
    with pytest.raises(ValueError, match="iou_thres"):
        NMSConfig(iou_thres=0.0)
