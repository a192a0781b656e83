"""Embedded digits, image folders and CIFAR-10 batches on disk: shapes, normalization, fixed split, errors."""

import pickle

import numpy as np
import pytest
import torch

from helpers import PicklePayload
from qat_rep.data import DataSpec, load_dataset, make_loaders


def test_digits_default():
    train, val, classes = load_dataset()
    x, y = train.tensors
    assert classes == [str(i) for i in range(10)]
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    assert set(y.tolist()) == set(range(10))
    train2, val2, _ = load_dataset("digits")  # the split is fixed
    assert torch.equal(val.tensors[1], val2.tensors[1]) and torch.equal(train.tensors[0], train2.tensors[0])


def test_digits_resized_and_loaders():
    train, _, _ = load_dataset(DataSpec(image_size=16))
    assert train.tensors[0].shape[1:] == (3, 16, 16)
    tl, vl, _ = make_loaders("digits", batch_size=100, seed=3)
    a = next(iter(tl))[1]
    b = next(iter(make_loaders("digits", batch_size=100, seed=3)[0]))[1]
    assert torch.equal(a, b) and len(next(iter(vl))[0]) == 100


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in (("cat", 6), ("dog", 4)):
        (tmp_path / cls / "sub").mkdir(parents=True)
        for i in range(n):
            arr = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / ("sub" if i % 2 else "") / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    train, val, classes = load_dataset(DataSpec(str(tmp_path), image_size=12, val_fraction=0.3))
    assert classes == ["cat", "dog"]
    assert len(train) + len(val) == 10 and len(val) == 3
    assert train.tensors[0].shape[1:] == (3, 12, 12)


def _cifar_folder(root, protocol=pickle.DEFAULT_PROTOCOL, key=str):
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        with open(root / name, "wb") as f:
            pickle.dump({key("data"): rng.integers(0, 255, (n, 3072), dtype=np.uint8), key("labels"): list(range(n)),
                         key("filenames"): [key(f"{i}.png") for i in range(n)]}, f, protocol=protocol)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({key("label_names"): [key(f"c{i}") for i in range(10)]}, f, protocol=protocol)


@pytest.mark.parametrize("protocol, key", [(pickle.DEFAULT_PROTOCOL, str), (2, str), (2, str.encode)],
                         ids=["py3", "protocol2", "bytes-keys"])
def test_cifar10_batches(tmp_path, protocol, key):
    _cifar_folder(tmp_path, protocol, key)
    train, val, classes = load_dataset(str(tmp_path))
    assert len(train) == 20 and len(val) == 3 and classes[3] == "c3"
    assert train.tensors[0].shape[1:] == (3, 32, 32)


@pytest.mark.parametrize("victim", ["data_batch_1", "test_batch", "batches.meta", "in-array"])
@pytest.mark.parametrize("entry", ["load_dataset", "make_loaders"])
def test_cifar_payload_never_runs(tmp_path, victim, entry):
    data = tmp_path / "cifar"
    data.mkdir()
    _cifar_folder(data)
    marker = tmp_path / "pwned"
    payload = PicklePayload(marker)
    pickle.loads(pickle.dumps(payload))  # the payload works: plain unpickling creates the marker ...
    assert marker.exists()
    marker.unlink()
    if victim == "in-array":  # hidden in an object array inside an otherwise valid batch
        obj = {"data": np.array([payload], dtype=object), "labels": [0]}
        victim = "data_batch_2"
    else:
        obj = {"data": payload, "labels": [0]} if victim != "batches.meta" else {"label_names": payload}
    with open(data / victim, "wb") as f:
        pickle.dump(obj, f)
    with pytest.raises(ValueError, match=f"{victim}.* is not a CIFAR-10 python batch.*not allowed"):
        (load_dataset if entry == "load_dataset" else make_loaders)(str(data))
    assert not marker.exists()  # ... the restricted unpickler never called it


def test_cifar_batch_wrong_content(tmp_path):
    _cifar_folder(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 10), np.float32), "labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="test_batch.* 'data' must be a uint8 array of shape"):
        load_dataset(str(tmp_path))
    with open(tmp_path / "test_batch", "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch.* is not a CIFAR-10 python batch"):
        load_dataset(str(tmp_path))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass 'digits'"):
        load_dataset(str(tmp_path / "nope"))


def test_folder_without_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="has no images: expected one subfolder per class"):
        load_dataset(str(tmp_path))


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=4), "image_size must be >= 8"),
    (dict(val_fraction=1.0), r"val_fraction must be in \(0, 1\)"),
])
def test_bad_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataSpec(**kwargs)


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        make_loaders(batch_size=0)
