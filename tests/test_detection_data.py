"""Detection data: the embedded digits canvases and the YOLO-format folder reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qat_rep.detection.data import (DetectionSpec, collate_detection, glyph_split, load_detection,
                                    make_detection_loaders)

SMALL = DetectionSpec(num_train=40, num_val=20, image_size=64)


def test_embedded_set_is_deterministic_and_valid():
    tr, va, names = load_detection(SMALL)
    tr2, va2, _ = load_detection(SMALL)
    assert names == [str(i) for i in range(10)] and len(tr) == 40 and len(va) == 20
    assert torch.equal(tr.images, tr2.images) and all(torch.equal(a, b) for a, b in zip(va.targets, va2.targets))
    assert not torch.equal(tr.images[:20], va.images)
    assert tr.images.shape == (40, 3, 64, 64) and 0 <= tr.images.min() and tr.images.max() <= 1
    for t in tr.targets + va.targets:
        assert 1 <= len(t) <= SMALL.max_objects
        assert ((t[:, 0] >= 0) & (t[:, 0] <= 9)).all() and (t[:, 0] == t[:, 0].round()).all()
        assert (t[:, 1:] >= 0).all() and (t[:, 1:] <= 64).all() and (t[:, 3:] > t[:, 1:3]).all()
        for i in range(len(t)):  # objects never overlap
            for j in range(i):
                a, b = t[i, 1:], t[j, 1:]
                assert a[0] >= b[2] or b[0] >= a[2] or a[1] >= b[3] or b[1] >= a[3]
    # each box holds ink and the pixels outside every box are background
    img, t = tr[0]
    mask = torch.zeros(64, 64, dtype=torch.bool)
    for _, x1, y1, x2, y2 in t.tolist():
        mask[int(y1):int(y2), int(x1):int(x2)] = True
        assert img[:, int(y1):int(y2), int(x1):int(x2)].max() > 0.4
    assert img[:, ~mask].max() < 0.3


def test_train_and_val_glyphs_are_disjoint():
    train, val = glyph_split(1797, 0.2)
    assert len(set(train) & set(val)) == 0 and len(train) + len(val) == 1797 and len(val) == 359
    assert np.array_equal(glyph_split(1797, 0.2)[1], val)


def test_collate_and_loaders():
    images, targets = collate_detection([(torch.zeros(3, 32, 32), torch.tensor([[1.0, 0, 0, 4, 4]])),
                                         (torch.zeros(3, 32, 32), torch.zeros(0, 5)),
                                         (torch.zeros(3, 32, 32), torch.tensor([[2.0, 1, 1, 5, 5]] * 2))])
    assert images.shape == (3, 3, 32, 32) and targets[:, 0].tolist() == [0, 2, 2] and targets.shape == (3, 6)
    train, val, _ = make_detection_loaders(SMALL, batch_size=16, seed=1)
    x, y = next(iter(val))
    assert x.shape == (16, 3, 64, 64) and y.shape[1] == 6


def _write_yolo(root, split, n, size=48):
    from PIL import Image

    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), 10 * i, dtype=np.uint8)).save(root / "images" / split / f"{i}.png")
        if i:  # image 0 has no label file: no objects
            (root / "labels" / split / f"{i}.txt").write_text(f"{i % 3} 0.5 0.25 0.5 0.25\n\n")


def test_yolo_folder_with_splits(tmp_path):
    _write_yolo(tmp_path, "train", 4)
    _write_yolo(tmp_path, "val", 2)
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    tr, va, names = load_detection(DetectionSpec(source=str(tmp_path), image_size=64))
    assert names == ["cat", "dog", "bird"] and len(tr) == 4 and len(va) == 2
    assert tr.images.shape == (4, 3, 64, 64) and len(tr.targets[0]) == 0
    assert tr.targets[2].tolist() == [[2.0, 16.0, 8.0, 48.0, 24.0]]  # cx .5 cy .25 w .5 h .25 on 64 px
    assert tr.images[1].max().item() == pytest.approx(10 / 255)


def test_yolo_folder_flat_is_split(tmp_path):
    _write_yolo(tmp_path, ".", 10)
    tr, va, names = load_detection(DetectionSpec(source=str(tmp_path), image_size=32, val_fraction=0.2))
    assert len(tr) == 8 and len(va) == 2 and names == ["0", "1", "2"]


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_detection(DetectionSpec(source=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="not a YOLO-format folder"):
        load_detection(DetectionSpec(source=str(tmp_path)))
    _write_yolo(tmp_path, ".", 3)
    (tmp_path / "labels" / "1.txt").write_text("1 0.5 0.5 0.2\n")
    with pytest.raises(ValueError, match=r"1\.txt:1: expected 'class cx cy w h'"):
        load_detection(DetectionSpec(source=str(tmp_path), image_size=32))
    (tmp_path / "labels" / "1.txt").write_text("1 0.5 0.5 1.7 0.2\n")
    with pytest.raises(ValueError, match=r"normalized to \[0, 1\]"):
        load_detection(DetectionSpec(source=str(tmp_path), image_size=32))
    with pytest.raises(ValueError, match="multiple of 32"):
        DetectionSpec(image_size=50)
    with pytest.raises(ValueError, match="min_size"):
        DetectionSpec(min_size=40, max_size=20)
