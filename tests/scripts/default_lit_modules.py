"""LightningModules written the way users write them, for the default ``RepQATCallback(export_dir=...)`` tests.

None of them tells the callback how it is called: a forward with a tensor and a keyword argument, dict batches,
dataclass batches, a network built in ``configure_model``, a siamese module calling its backbone twice, a
ResNet-18-style network with no rep blocks, and a foreign rep block that only has ``switch_to_deploy()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from qat_lit_modules import TinyRepNet, digits, lp, pl
from qat_rep.fuse import fuse_bn_module


def _sgd(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)


def _eval_out(logits: torch.Tensor, y: torch.Tensor) -> dict:
    return {"logits": logits, "target": y}


# 1. forward(x, bias, *, scale) --------------------------------------------------------------------------------------
class BiasScaleL(lp.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = TinyRepNet()

    def forward(self, x, bias, *, scale=1.0):
        return self.net(x) * scale + bias

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x, torch.zeros(1), scale=1.0), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return _eval_out(self(x, torch.zeros(1), scale=1.0), y)

    def configure_optimizers(self):
        return _sgd(self)


# 2. dict batches, forward(image) ------------------------------------------------------------------------------------
class DictDataset(Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {"image": x, "label": y}


class DictBatchPL(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = TinyRepNet()

    def forward(self, image):
        return self.net(image)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["image"]), batch["label"])

    def validation_step(self, batch, batch_idx):
        return _eval_out(self(batch["image"]), batch["label"])

    def configure_optimizers(self):
        return _sgd(self)


# 3. a dataclass batch ------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    pixels: torch.Tensor
    target: torch.Tensor


def collate_batch(items) -> Batch:
    return Batch(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


class DataclassBatchL(lp.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = TinyRepNet()

    def forward(self, pixels):
        return self.net(pixels)

    def training_step(self, batch: Batch, batch_idx):
        return F.cross_entropy(self(batch.pixels), batch.target)

    def validation_step(self, batch: Batch, batch_idx):
        return _eval_out(self(batch.pixels), batch.target)

    def configure_optimizers(self):
        return _sgd(self)


# 4. the network built in configure_model -----------------------------------------------------------------------------
class LazyL(lp.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = TinyRepNet()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return _eval_out(self(x), y)

    def configure_optimizers(self):
        return _sgd(self)


# 5. siamese: one backbone, two calls per step ------------------------------------------------------------------------
class SiameseL(lp.LightningModule):
    def __init__(self):
        super().__init__()
        self.backbone = TinyRepNet()

    def training_step(self, batch, batch_idx):
        x, y = batch
        a, b = self.backbone(x), self.backbone(x.flip(3))
        return F.cross_entropy(a, y) + F.cross_entropy(b, y) + 0.1 * F.mse_loss(a, b)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        a, b = self.backbone(x), self.backbone(x.flip(3))
        return _eval_out((a + b) / 2, y)

    def configure_optimizers(self):
        return _sgd(self)


# 6. a ResNet-18-style network (no rep blocks) ------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18ish(nn.Module):
    """torchvision's ResNet-18 layout ([2, 2, 2, 2] basic blocks) at 1/8 width, with a 3x3 stem for 32x32."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        layers, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


class ResNetL(lp.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = ResNet18ish()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return _eval_out(self(x), y)

    def configure_optimizers(self):
        return _sgd(self)


# 7. a foreign rep block with only switch_to_deploy() -----------------------------------------------------------------
class ForeignRepBlock(nn.Module):
    """RepVGG's block as other code bases write it: branches until ``switch_to_deploy()`` makes one conv."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.rbr_dense = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.rbr_1x1 = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))
        self.stride, self.cin, self.cout = stride, cin, cout

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return F.relu(self.rbr_reparam(x))
        return F.relu(self.rbr_dense(x) + self.rbr_1x1(x))

    @torch.no_grad()
    def switch_to_deploy(self):
        k3, b3 = fuse_bn_module(self.rbr_dense[0].weight, self.rbr_dense[1])
        k1, b1 = fuse_bn_module(self.rbr_1x1[0].weight, self.rbr_1x1[1])
        conv = nn.Conv2d(self.cin, self.cout, 3, self.stride, 1, bias=True)
        conv.weight.copy_(k3 + F.pad(k1, [1, 1, 1, 1]))
        conv.bias.copy_(b3 + b1)
        del self.rbr_dense, self.rbr_1x1
        self.rbr_reparam = conv


class ForeignNet(nn.Module):
    def __init__(self, num_classes: int = 10, w: int = 8):
        super().__init__()
        self.blocks = nn.Sequential(ForeignRepBlock(3, w), ForeignRepBlock(w, 2 * w, 2), ForeignRepBlock(2 * w, 4 * w, 2))
        self.linear = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(self.blocks(x), 1).flatten(1))


class ForeignL(ResNetL):
    def __init__(self):
        lp.LightningModule.__init__(self)
        self.model = ForeignNet()


# data ----------------------------------------------------------------------------------------------------------------
def default_loaders(kind: str = "tuple", image_size: int = 16, n_train: int = 512, n_val: int = 64,
                    batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    """Unshuffled digits loaders yielding ``(x, y)`` tuples, ``{"image", "label"}`` dicts or :class:`Batch`."""
    train, val = digits(n_train, n_val, image_size=image_size)
    if kind == "dict":
        train, val = DictDataset(train), DictDataset(val)
    collate = collate_batch if kind == "dataclass" else None
    return (DataLoader(train, batch_size=batch_size, shuffle=False, collate_fn=collate),
            DataLoader(val, batch_size=batch_size, shuffle=False, collate_fn=collate))
