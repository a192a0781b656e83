"""LightningModules and data shared by the callback tests and the standalone scripts they run.

Importable from the tests (``tests/scripts`` is put on ``sys.path``) and by the scripts themselves; everything is
module level so ``ddp_spawn`` can pickle it. Both Lightning flavors get the same modules.
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as lp
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from qat_rep import create_model  # noqa: E402
from qat_rep.blocks import QARepVGGBlock, RepVGGBlock  # noqa: E402
from qat_rep.data import DataSpec, load_dataset  # noqa: E402

FLAVORS = {"pytorch_lightning": pl, "lightning.pytorch": lp}
IMAGE = 16


def digits(n_train: int = 64, n_val: int = 32, image_size: int = IMAGE) -> tuple[TensorDataset, TensorDataset]:
    """The first ``n_train``/``n_val`` embedded digits at ``image_size`` (deterministic, no download)."""
    train, val, _ = load_dataset(DataSpec("digits", image_size=image_size))
    return (TensorDataset(*(t[:n_train] for t in train.tensors)), TensorDataset(*(t[:n_val] for t in val.tensors)))


def loaders(batch_size: int = 16, n_train: int = 64, n_val: int = 32, multi_input: bool = False):
    """Unshuffled loaders (deterministic order, so a resumed fit sees the same batches as an uninterrupted one).

    ``multi_input`` adds an auxiliary per-sample vector: batches are ``(image, aux, target)``.
    """
    train, val = digits(n_train, n_val)

    def add_aux(ds: TensorDataset) -> TensorDataset:
        x, y = ds.tensors
        aux = torch.linspace(-1, 1, 4).repeat(len(y), 1) * (y.float().unsqueeze(1) / 10)
        return TensorDataset(x, aux, y)

    if multi_input:
        train, val = add_aux(train), add_aux(val)
    return (DataLoader(train, batch_size=batch_size, shuffle=False),
            DataLoader(val, batch_size=batch_size, shuffle=False))


class TinyRepNet(nn.Module):
    """A plain conv+BN stem, two QARepVGG and two RepVGG blocks, and a linear classifier (fast on CPU)."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.blocks = nn.Sequential(
            QARepVGGBlock(w, 2 * w, stride=2), QARepVGGBlock(2 * w, 2 * w),
            RepVGGBlock(2 * w, 4 * w, stride=2), RepVGGBlock(4 * w, 4 * w),
        )
        self.linear = nn.Linear(4 * w, num_classes)
        self.out_features = 4 * w

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


class _ClassifierMixin:
    """``forward(x) -> logits``; train/val/test steps; the metrics contract (steps return logits and target)."""

    def _init(self, arch: str = "tiny", lr: float = 0.05) -> None:
        self.save_hyperparameters()
        if arch == "tiny":
            self.model = TinyRepNet()
        else:
            self.model = create_model(arch, num_classes=10, small_input=True)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def _eval_step(self, batch, prefix):
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}_loss", F.cross_entropy(logits, y))
        self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean())
        return {"logits": logits, "target": y}

    def validation_step(self, batch, batch_idx):
        return self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-4)


class ClassifierPL(_ClassifierMixin, pl.LightningModule):
    def __init__(self, arch: str = "tiny", lr: float = 0.05):
        super().__init__()
        self._init(arch, lr)


class ClassifierL(_ClassifierMixin, lp.LightningModule):
    def __init__(self, arch: str = "tiny", lr: float = 0.05):
        super().__init__()
        self._init(arch, lr)


class _MultiInputMixin:
    """``forward(image, aux, *, scale=1.0)``: two tensors and a keyword argument; batches ``(image, aux, target)``."""

    def _init(self) -> None:
        self.net = TinyRepNet()
        self.aux_proj = nn.Linear(4, 10)

    def forward(self, image, aux, *, scale: float = 1.0):
        return self.net(image) + scale * self.aux_proj(aux)

    def training_step(self, batch, batch_idx):
        x, aux, y = batch
        loss = F.cross_entropy(self(x, aux, scale=0.5), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, aux, y = batch
        logits = self(x, aux, scale=0.5)
        return {"logits": logits, "target": y}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class MultiInputPL(_MultiInputMixin, pl.LightningModule):
    def __init__(self):
        super().__init__()
        self._init()


class MultiInputL(_MultiInputMixin, lp.LightningModule):
    def __init__(self):
        super().__init__()
        self._init()


def multi_input_forward(module: nn.Module, batch) -> torch.Tensor:
    """Calibration forward for the multi-input modules (module level: picklable for ``ddp_spawn``)."""
    x, aux, _ = batch
    return module(x, aux, scale=0.5)


class NoConvPL(pl.LightningModule):
    """Nothing to quantize: a LightningModule with only a parameter and arithmetic."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x.flatten(1)[:, :10] * self.w

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


MODULES = {"pytorch_lightning": ClassifierPL, "lightning.pytorch": ClassifierL}
MULTI_INPUT = {"pytorch_lightning": MultiInputPL, "lightning.pytorch": MultiInputL}


def trainer_kwargs(**kw):
    """Quiet, deterministic CPU Trainer arguments for tests."""
    base = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                deterministic=True, num_sanity_val_steps=0)
    base.update(kw)
    return base


class DumpState(pl.Callback):
    """Writes every rank's final state dict (and the QAT phases) to ``<out_dir>/rank<k>.pt`` at fit end."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):
        from qat_rep.blocks import RepBlock

        phases = {n: m.rep_quant.phase for n, m in pl_module.named_modules() if isinstance(m, RepBlock)}
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"state": state, "phases": phases, "world_size": trainer.world_size},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))
