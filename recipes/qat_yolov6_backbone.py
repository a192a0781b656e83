"""QAT of a YOLOv6-style EfficientRep backbone (QARepVGG blocks) inside a user-style LightningModule with its own head.

Run from the repository root::

    python recipes/qat_yolov6_backbone.py                 # FP32 training, then QAT, then QDQ ONNX in ONNX Runtime
    python recipes/qat_yolov6_backbone.py --ckpt out/qat_yolov6_backbone/fp32_yolov6_keys.safetensors --epochs 0

The task: **multi-digit segmentation on a canvas.** One to three handwritten digits from the embedded data set are
pasted on a 64×64 canvas at random positions and random sizes (8 to 32 pixels); every ink pixel must be labelled
with its digit (11 classes: background + 0–9); the score is mean IoU. Why this task and not classification or
detection:

* it needs all three feature maps: an 8-pixel digit is a 1×1 blob at stride 8 and vanishes at stride 32, while a
  32-pixel digit spans the receptive field of the stride-8 map only partly — the stroke pixels of a "1" and a "7"
  look alike locally, so the label of a pixel needs the context of the whole digit. The head (an FPN-lite: 1×1
  laterals on C3/C4/C5, top-down upsample-and-add, a 3×3 conv, upsample to the input) must fuse strides 8, 16, 32,
  as a YOLOv6 neck does;
* its metric is a deterministic function of the logits (no box decoding, no NMS thresholds), so FP32, fake-quant
  and ONNX Runtime INT8 are compared on exactly the same quantity, and the ONNX graph ends at the logits;
* it is built from the embedded digits: offline, and the validation canvases use digits the model never saw.

Starting point, as a YOLOv6 user would have it: the FP32 stage saves its weights with YOLOv6's key names
(``backbone.stem.rbr_dense.conv.weight``, ``backbone.ERBlock_2.1.block.0.bn.running_mean``, …) to
``fp32_yolov6_keys.safetensors``; the QAT stage builds a fresh module and loads that file (a state dict of a YOLOv6
model with QARep blocks loads the same way — ``--ckpt``; head keys missing from it start random). Then
:class:`qat_rep.callbacks.RepQATCallback` fine-tunes, the fused INT8 network is exported as QDQ ONNX and run in ONNX
Runtime on the validation canvases.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Sequence

import recipe_common as common
from recipe_common import (ResultRow, Stopwatch, check_common_args, console, finish_distributed, make_trainer,
    plot_accuracy, prepare_run, results_markdown, results_table)

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from qat_rep import create_model, load_dataset
from qat_rep.quant import QuantConfig

NUM_CLASSES = 11  # background + digits 0-9
CANVAS = 64
_MEAN, _STD = 0.08, 0.25  # canvas pixel statistics (mostly background), fixed so train and val agree


# ------------------------------------------------------------------------------------------------- data
def _digit_glyphs(split: str) -> tuple[Tensor, Tensor]:
    """The embedded digits of one split as [N, 32, 32] intensities in [0, 1] and their labels."""
    train, val, _ = load_dataset("digits")
    ds = train if split == "train" else val
    x = ds.tensors[0][:, 0]
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6), ds.tensors[1]


def make_canvases(split: str, n: int, seed: int, canvas: int = CANVAS, max_digits: int = 3,
                  sizes: tuple[int, int] = (8, 32)) -> TensorDataset:
    """``n`` canvases: images [n, 3, canvas, canvas] (normalized) and per-pixel labels [n, canvas, canvas].

    Digits come from the given split of the embedded data set; placement and sizes are drawn from ``seed``.
    A pixel is labelled with its digit when the (resized) glyph's intensity exceeds 0.35; later digits overwrite
    earlier ones where they overlap.
    """
    glyphs, labels = _digit_glyphs(split)
    rng = np.random.default_rng(seed)
    images = torch.zeros(n, canvas, canvas)
    target = torch.zeros(n, canvas, canvas, dtype=torch.int64)
    for i in range(n):
        for _ in range(int(rng.integers(1, max_digits + 1))):
            j = int(rng.integers(len(glyphs)))
            s = int(rng.integers(sizes[0], sizes[1] + 1))
            g = F.interpolate(glyphs[j][None, None], size=(s, s), mode="bilinear", align_corners=False)[0, 0]
            y0, x0 = int(rng.integers(0, canvas - s + 1)), int(rng.integers(0, canvas - s + 1))
            region = images[i, y0:y0 + s, x0:x0 + s]
            ink = g > 0.35
            images[i, y0:y0 + s, x0:x0 + s] = torch.where(ink, g, torch.maximum(region, g))
            target[i, y0:y0 + s, x0:x0 + s][ink] = int(labels[j]) + 1
    x = ((images - _MEAN) / _STD).unsqueeze(1).repeat(1, 3, 1, 1)
    return TensorDataset(x.contiguous(), target)


class CanvasDataModule(pl.LightningDataModule):
    """Train/val canvases (train digits / val digits), generated once with fixed seeds."""

    def __init__(self, n_train: int = 1024, n_val: int = 256, batch_size: int = 32, seed: int = 0):
        super().__init__()
        self.n_train, self.n_val, self.batch_size, self.seed = n_train, n_val, batch_size, seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = make_canvases("train", self.n_train, seed=1000 + self.seed)
            self.val_set = make_canvases("val", self.n_val, seed=2000)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=64, shuffle=False)


# ------------------------------------------------------------------------------------------------- model
class SegHead(nn.Module):
    """FPN-lite: 1×1 laterals to ``width`` channels, top-down upsample-and-add, 3×3 conv + BN + ReLU, 1×1 classes,
    bilinear upsample ×8 to the input size."""

    def __init__(self, in_channels: Sequence[int], width: int = 48, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.classify = nn.Conv2d(width, num_classes, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        c3, c4, c5 = (lat(f) for lat, f in zip(self.lateral, feats))
        p4 = c4 + F.interpolate(c5, size=c4.shape[-2:], mode="nearest")
        p3 = c3 + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        return F.interpolate(self.classify(self.fuse(p3)), scale_factor=8.0, mode="bilinear", align_corners=False)


class DigitSegmenter(nn.Module):
    """``backbone`` (EfficientRep, YOLOv6 key names) + ``head``; ``forward`` returns per-pixel logits."""

    def __init__(self, size: str = "n", block: str = "qarepvgg"):
        super().__init__()
        self.backbone = create_model(f"efficientrep_{size}", block=block)
        self.head = SegHead(self.backbone.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class SegModule(pl.LightningModule):
    """A user's own LightningModule: cross-entropy on pixels, mean IoU on validation, AdamW + cosine."""

    def __init__(self, size: str = "n", block: str = "qarepvgg", lr: float = 2e-3, weight_decay: float = 1e-4):
        super().__init__()
        self.save_hyperparameters()
        self.net = DigitSegmenter(size, block)
        self.miou = torchmetrics.classification.MulticlassJaccardIndex(NUM_CLASSES, average="macro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.miou(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_miou", self.miou, prog_bar=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=self.hparams.lr * 0.01)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def mean_iou(model: nn.Module | Any, loader: DataLoader) -> float:
    """Macro mean IoU (percent) over the 11 classes of ``model``'s (or an ONNX Runtime callable's) predictions."""
    metric = torchmetrics.classification.MulticlassJaccardIndex(NUM_CLASSES, average="macro")
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    for x, y in loader:
        metric.update(torch.as_tensor(model(x)).argmax(1), y)
    if isinstance(model, nn.Module) and was_training:
        model.train()
    return 100.0 * float(metric.compute())


def ort_runner(path: Path):
    """``x -> logits`` through ONNX Runtime (CPU), for :func:`mean_iou`."""
    from qat_rep.export import ort_session

    sess = ort_session(path, threads=2)
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0])


# ------------------------------------------------------------------------------------------------- checkpoints
def save_yolov6_keyed(net: DigitSegmenter, path: Path) -> Path:
    """The FP32 weights with YOLOv6's key names (``backbone.*``, plus ``head.*``) as safetensors, atomically."""
    return common.write_state_dict(net, path, keys="yolov6")


def load_yolov6_keyed(module: SegModule, path: Path) -> list[str]:
    """Load a YOLOv6-keyed state dict (``backbone.*`` [+ ``head.*``], train or fused form; a ``model.`` or ``net.``
    prefix is stripped). The backbone must match exactly; returns the head keys that were missing (left random)."""
    from qat_rep import load_state_dict_any_form

    state = common.read_state_dict(path)
    for prefix in ("model.", "net."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if not any(k.startswith("backbone.") for k in state):
        raise ValueError(f"{str(path)!r} has no 'backbone.*' keys; expected a YOLOv6-keyed state dict "
                         "(backbone.stem.rbr_dense.conv.weight, …)")
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    load_state_dict_any_form(module.net.backbone, backbone, strict=True)
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    result = module.net.head.load_state_dict(head, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{str(path)!r} has head keys this head does not have: {result.unexpected_keys[:3]}")
    return [f"head.{k}" for k in result.missing_keys]


# ------------------------------------------------------------------------------------------------- recipe
def build_parser() -> argparse.ArgumentParser:
    p = common.base_parser(__doc__.split("\n\n")[0], epochs=12, qat_epochs=3, out="out/qat_yolov6_backbone",
                           block="qarepvgg", blocks=("qarepvgg", "qarepvggv2", "repvgg"), image_size=None)
    p.add_argument("--size", default="n", choices=["n", "s", "m"], help="EfficientRep size (YOLOv6-n/s/m)")
    p.add_argument("--lr", type=float, default=2e-3, help="FP32 peak learning rate (AdamW, cosine)")
    p.add_argument("--qat-lr", type=float, default=2e-4, help="QAT peak learning rate (AdamW, cosine)")
    p.add_argument("--train-canvases", type=int, default=1024, help="number of training canvases")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size per process")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data != "digits":
        parser.error("--data: this recipe builds its canvases from the embedded digits; only 'digits' is supported")
    check_common_args(args, parser)
    if args.bits != [8]:
        parser.error(f"--bits {','.join(map(str, args.bits))}: this recipe ends in ONNX Runtime, and ONNX QDQ "
                     "(opset 13) holds 8-bit integers only; use --bits 8")
    if args.fast:
        args.epochs, args.qat_epochs, args.train_canvases = min(args.epochs, 1), min(args.qat_epochs, 1), 64
    if args.train_canvases < args.batch_size:
        parser.error(f"--train-canvases ({args.train_canvases}) must be >= --batch-size ({args.batch_size})")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    from qat_rep.callbacks import RepQATCallback
    from qat_rep.export import export_onnx, verify_onnx

    args = parse_args(argv)
    out = prepare_run(args)
    sw = Stopwatch()
    dm = CanvasDataModule(args.train_canvases, 32 if args.fast else 256, args.batch_size, args.seed)
    dm.setup()
    keyed = out / "fp32_yolov6_keys.safetensors"
    limit = 2 if args.fast else None
    if args.ckpt and args.epochs == 0:
        start = Path(args.ckpt)
    else:
        with sw("FP32 training"):
            fp32 = SegModule(args.size, args.block, lr=args.lr)
            if args.ckpt:
                missing = load_yolov6_keyed(fp32, Path(args.ckpt))
                console.print(f"loaded {args.ckpt} ({len(missing)} head tensors start random)")
            trainer = make_trainer(args, out, max_epochs=args.epochs, name="fp32", limit_batches=limit)
            trainer.fit(fp32, datamodule=dm)
            if trainer.is_global_zero:
                save_yolov6_keyed(fp32.net, keyed)
            trainer.strategy.barrier()
        start = keyed
    with sw("QAT fine-tuning"):
        module = SegModule(args.size, args.block, lr=args.qat_lr)
        missing = load_yolov6_keyed(module, start)
        if missing:
            console.print(f"[yellow]{len(missing)} head tensors were not in {start}; they start random")
        teacher = copy.deepcopy(module.net).eval()
        cfg = QuantConfig(w_bits=args.bits[0], a_bits=args.bits[0], calib_batches=2 if args.fast else 4)
        # onnx=None: this recipe writes and checks its ONNX files itself below (with mIoU and latency)
        callback = RepQATCallback(config=cfg, export_dir=str(out / "deploy"), export_module="net", onnx=None)
        trainer = make_trainer(args, out, max_epochs=args.qat_epochs, callbacks=[callback], name="qat",
                               limit_batches=limit)
        trainer.fit(module, datamodule=dm)
        trainer.save_checkpoint(str(out / "qat.ckpt"))
    if not finish_distributed():
        return None
    val = dm.val_dataloader()
    tag = f"W{args.bits[0]}A{args.bits[0]}"
    with sw("evaluation + ONNX Runtime"):
        fp32_miou = mean_iou(teacher, val)
        qat_miou = mean_iou(module.net, val)
        example = torch.zeros(1, 3, CANVAS, CANVAS)
        onnx_fp32, onnx_int8 = out / "model_fp32.onnx", out / f"model_{tag.lower()}.onnx"
        export_onnx(copy.deepcopy(teacher), onnx_fp32, example, quantized=False)
        report = export_onnx(module.net, onnx_int8, example)
        ver = verify_onnx(onnx_int8, module.net.eval(), val)
        ort_miou = mean_iou(ort_runner(onnx_int8), val)
        ort_fp32_miou = mean_iou(ort_runner(onnx_fp32), val)
        from qat_rep.export.bench import ort_latency

        lat = {r.label: r.median_ms for r in ort_latency({"fp32": onnx_fp32, "int8": onnx_int8},
                                                          (3, CANVAS, CANVAS), batch_sizes=(1,), threads=2)}
    rows = [ResultRow("FP32", "FP32", fp32_miou, None, "PyTorch"),
            ResultRow("ORT FP32", "FP32", ort_fp32_miou, lat["fp32"], "fused FP32 ONNX"),
            ResultRow("QAT fake-quant", tag, qat_miou, None, f"Δ vs FP32 {qat_miou - fp32_miou:+.2f}"),
            ResultRow("ORT INT8", tag, ort_miou, lat["int8"],
                      f"{report.quantized_layers} QDQ layers; max |Δlogit| {ver.max_diff_steps:.2f} output steps")]
    title = f"EfficientRep-{args.size} ({args.block}) digit segmentation, {len(dm.val_set)} val canvases"
    console.print(results_table(rows, title, metric="mIoU %"))
    plot_accuracy(rows, out / "miou.png", title, metric="mean IoU (%)")
    results = {"recipe": "qat_yolov6_backbone", "size": args.size, "block": args.block, "fp32_miou": fp32_miou,
               "qat_miou": qat_miou, "ort_int8_miou": ort_miou, "ort_fp32_miou": ort_fp32_miou,
               "ort_latency_ms_batch1": lat, "verify": ver.to_dict(), "rows": [r.to_dict() for r in rows]}
    common.finish_run(out, results, f"qat_yolov6_backbone: EfficientRep-{args.size} ({args.block}) {tag}", [
        ("Results", results_markdown(rows, metric="mIoU %") + "\n\n![mIoU](miou.png)"),
        ("Task", __doc__.split("\n\n")[2] + "\n\n" + __doc__.split("\n\n")[3]),
    ], args, sw)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
