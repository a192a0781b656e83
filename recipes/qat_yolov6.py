"""A YOLOv6 detector from FP32 to INT8: FP32 training → plain PTQ baseline → QAT → QDQ ONNX → mAP in ONNX Runtime.

Run from the repository root::

    python recipes/qat_yolov6.py                       # yolov6_n, QARep-V2 blocks, the embedded digits detection set
    python recipes/qat_yolov6.py --block repvgg        # the same with plain RepVGG blocks
    python recipes/qat_yolov6.py --data ~/my_yolo_set --ckpt upstream_yolov6n.pt-state-dict.safetensors
    python recipes/qat_yolov6.py --distill --sensitivity 128 --keep-float 3

Steps: (1) train the FP32 detector on the embedded detection set (digits pasted on 64×64 canvases) or a YOLO-format
folder, or load ``--ckpt`` (a state dict with upstream keys, read with ``weights_only=True``); (2) plain minmax W8A8
PTQ (per-channel and per-tensor weights) as the baseline; (3) QAT with the default
:class:`qat_rep.callbacks.RepQATCallback` — every rep block runs one conv of its fake-quantized equivalent kernel, every
conv (the neck's upsampling transposed convs too) is quantized, and every group of activation quantizers joined by
a Concat/Add or reading one tensor shares one scale (the callback ties them at the first training step, before
calibration: :func:`qat_rep.quant.share_input_scales`); (4) QDQ ONNX files in both layouts (``tensorrt``: checked for
shared-scale violations and Q/DQ on every conv; ``onnxruntime``: run in ONNX Runtime) holding the raw head outputs —
boxes are decoded and NMS'd after the file, in :mod:`qat_rep.detection.boxes`.

Options: ``--distill`` adds YOLOv6's channel-wise distillation (KL of each channel's spatial softmax) from the FP32
model on the three neck outputs during QAT (:class:`qat_rep.callbacks.DistillConfig`, added to the gradient, the
training step untouched). ``--sensitivity N`` ranks every quantized layer by the mAP it costs when quantized alone
on N validation images (:func:`qat_rep.ptq.sensitivity_report` with a ``metric``; the ranking goes into
``results.json`` and ``report.md``), and ``--keep-float K`` keeps the K costliest in floating point during QAT
(``QuantConfig.skip``).

The LightningModule :class:`YOLOv6Detector` is meant to be copied: training on the raw outputs with
:class:`qat_rep.detection.loss.DetectionLoss`, validation mAP@0.5:0.95 and mAP@0.5 from the decoded, NMS'd boxes.
Everything lands in ``--out`` (default ``out/qat_yolov6-<block>``): ``fp32.safetensors`` (the FP32 weights, upstream
keys: ``--ckpt`` takes it back), ``model_trt.onnx``, ``model_ort.onnx``, ``qat_fit/`` (the QAT deploy artifact),
``results.json``, ``report.md`` and ``map.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import recipe_common as common  # recipes/recipe_common.py (python puts this script's folder on sys.path)

import pytorch_lightning as pl
import numpy as np
import onnx
import torch
from torch import Tensor

from qat_rep.detection.boxes import NMSConfig, decode_outputs, postprocess
from qat_rep.detection.data import DetectionSpec, make_detection_loaders
from qat_rep.detection.loss import DetectionLoss
from qat_rep.detection.metrics import coco_map
from qat_rep.export import export_onnx
from qat_rep.export.onnx_export import quantized_node_names
from qat_rep.models import create_model
from qat_rep.quant import QuantConfig, calibrate, prepare, share_input_scales


class YOLOv6Detector(pl.LightningModule):
    """A registry detector (``yolov6_n``/``yolov6_s``) trained with YOLOv6's loss; validation logs COCO mAP.

    Nothing here is about quantization: :class:`~qat_rep.callbacks.RepQATCallback` prepares the model, ties the
    shared scales and calibrates inside the first training steps.
    """

    def __init__(self, model_name: str = "yolov6_n", num_classes: int = 10, block: str = "qarepvggv2",
                 lr: float = 2e-3, weight_decay: float = 5e-4, final_lr_ratio: float = 0.01):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.save_hyperparameters()
        self.model = create_model(model_name, num_classes=num_classes, block=block)
        self.loss = DetectionLoss(num_classes, self.model.strides)
        self._preds: list[dict[str, Tensor]] = []
        self._targets: list[dict[str, Tensor]] = []

    def forward(self, x: Tensor) -> Any:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, targets = batch
        loss, parts = self.loss(self.model(x), targets)
        self.log("train_loss", loss, prog_bar=True)
        self.log_dict({f"train_{k}": v for k, v in parts.items()})
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, targets = batch
        boxes, scores = self.model(x)
        self._preds += [{k: v.cpu() for k, v in d.items()} for d in postprocess(boxes, scores)]
        self._targets += split_targets(targets, len(x))

    def on_validation_epoch_end(self) -> None:
        if self._targets and any(len(t["boxes"]) for t in self._targets):
            m = coco_map(self._preds, self._targets)
            self.log_dict({"val_map": m["map"], "val_map50": m["map_50"]}, prog_bar=True)
        self._preds, self._targets = [], []

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=total, pct_start=0.1,
                                                    final_div_factor=1.0 / hp.final_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def split_targets(targets: Tensor, batch: int) -> list[dict[str, Tensor]]:
    """``(M, 6)`` batch targets → one torchmetrics-style dict per image."""
    out = []
    for i in range(batch):
        t = targets[targets[:, 0] == i].cpu()
        out.append({"boxes": t[:, 2:], "labels": t[:, 1].long()})
    return out


@torch.no_grad()
def evaluate_map(model: torch.nn.Module, loader: Any, nms: NMSConfig | None = None) -> dict[str, float]:
    """COCO mAP of a detector (eval mode: decoded outputs) over ``loader``."""
    was = model.training
    model.eval()
    preds, tgts = [], []
    for x, targets in loader:
        boxes, scores = model(x)
        preds += postprocess(boxes, scores, nms)
        tgts += split_targets(targets, len(x))
    model.train(was)
    return coco_map(preds, tgts)


def evaluate_onnx_map(path: Path, loader: Any, strides: Sequence[int], num_classes: int) -> dict[str, float]:
    """COCO mAP of an ONNX file of the raw outputs, run in ONNX Runtime; decoding and NMS after the file."""
    from qat_rep.export.verify import ort_session

    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    preds, tgts = [], []
    for x, targets in loader:
        raw = [torch.from_numpy(np.asarray(o)) for o in sess.run(None, {name: x.numpy()})]
        boxes, scores = decode_outputs(raw, strides, num_classes)
        preds += postprocess(boxes, scores)
        tgts += split_targets(targets, len(x))
    return coco_map(preds, tgts)


def ptq(model: torch.nn.Module, batches: list[Tensor], config: QuantConfig) -> torch.nn.Module:
    """A calibrated fake-quant copy of ``model`` (shared scales tied before calibration)."""
    q = copy.deepcopy(model).eval()
    prepare(q, config)
    share_input_scales(q, batches[0][:1])
    calibrate(q, batches, config)
    return q


#: the neck outputs (strides 8, 16, 32) that --distill matches channel-wise to the FP32 teacher's
NECK_OUTPUTS = ("neck.Rep_p3", "neck.Rep_n3", "neck.Rep_n4")
STAGE_LABELS = {"fp32": "FP32", "ptq_w8a8_per_channel": "PTQ W8A8 (per-channel W)",
                "ptq_w8a8_per_tensor": "PTQ W8A8 (per-tensor W)", "qat_w8a8": "QAT W8A8 (fake quant)",
                "ort_int8": "ONNX Runtime INT8"}


def map_sensitivity(model: torch.nn.Module, calib: list[Tensor], val: Any, images: int,
                    config: QuantConfig) -> list[Any]:
    """Every quantized layer ranked by the mAP@0.5:0.95 it costs when quantized alone (``config``, the QAT
    config), on the first ``images`` validation images: one mAP evaluation per layer."""
    from qat_rep.ptq import sensitivity_report

    subset, n = [], 0
    for x, targets in val:
        take = min(len(x), images - n)
        subset.append((x[:take], targets[targets[:, 0] < take]))
        n += take
        if n >= images:
            break
    return sensitivity_report(copy.deepcopy(model).eval(), [(x,) for x in calib], config,
                              metric=lambda m: evaluate_map(m, subset)["map"])


def plot_map(results: dict[str, Any], path: Path, title: str) -> Path:
    """A bar chart of mAP@0.5:0.95 and mAP@0.5 per stage, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [k for k in STAGE_LABELS if k in results["map"]]
    fig, ax = plt.subplots(figsize=(7.2, 3.8), dpi=110)
    for i, (key, label) in enumerate((("map", "mAP@0.5:0.95"), ("map_50", "mAP@0.5"))):
        vals = [results["map"][s][key] * 100 for s in stages]
        bars = ax.bar([j + (i - 0.5) * 0.38 for j in range(len(stages))], vals, 0.38, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(stages)), [STAGE_LABELS[s] for s in stages], fontsize=7, rotation=12)
    ax.set_ylabel("mAP (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return common.save_figure(fig, path)


def report_markdown(results: dict[str, Any]) -> str:
    """The report's table: mAP per stage, and the sensitivity ranking when there is one."""
    lines = ["| stage | mAP@0.5:0.95 | mAP@0.5 |", "|---|---:|---:|"]
    lines += [f"| {label} | {results['map'][k]['map'] * 100:.2f} | {results['map'][k]['map_50'] * 100:.2f} |"
              for k, label in STAGE_LABELS.items() if k in results["map"]]
    lines += ["", f"TensorRT-layout file: {len(results['shared_scale_violations'])} shared-scale violation(s); "
              f"convs with Q/DQ {results['trt_convs_with_qdq'][0]}/{results['trt_convs_with_qdq'][1]}."]
    if results.get("keep_float"):
        lines.append(f"Kept in floating point during QAT (costliest by mAP): {', '.join(results['keep_float'])}.")
    if results.get("sensitivity"):
        lines += ["", "| layer (quantized alone) | mAP@0.5:0.95 drop | output MSE |", "|---|---:|---:|"]
        lines += [f"| {r['name']} | {r['map_drop'] * 100:+.2f} | {r['mse']:.3g} |" for r in results["sensitivity"][:15]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="yolov6_n", choices=["yolov6_n", "yolov6_s"])
    p.add_argument("--block", default="qarepvggv2", choices=["repvgg", "qarepvgg", "qarepvggv2"])
    p.add_argument("--data", default="digits", help="'digits' (embedded) or a YOLO-format folder")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--ckpt", default=None, help="FP32 state dict (upstream keys) instead of FP32 training")
    p.add_argument("--epochs", type=int, default=12, help="FP32 epochs")
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--qat-lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="out/qat_yolov6-{block}")
    p.add_argument("--distill", action="store_true",
                   help="channel-wise distillation from the FP32 model on the neck outputs during QAT")
    p.add_argument("--sensitivity", type=int, default=0, metavar="N",
                   help="rank the quantized layers by the mAP each costs alone, on N validation images (0: off)")
    p.add_argument("--keep-float", type=int, default=0, metavar="K",
                   help="keep the K layers that cost most mAP in floating point during QAT (needs --sensitivity)")
    p.add_argument("--fast", action="store_true", help="a tiny run for tests (few images, one short epoch each)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs < 0 or args.qat_epochs < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("--epochs must be >= 0 and --qat-epochs, --batch-size, --threads >= 1")
    if args.sensitivity < 0 or args.keep_float < 0:
        parser.error("--sensitivity and --keep-float must be >= 0")
    if args.keep_float and not args.sensitivity:
        parser.error("--keep-float K needs --sensitivity N (the ranking it keeps the top K of)")
    if args.ckpt and not Path(args.ckpt).is_file():
        parser.error(f"--ckpt {args.ckpt}: no such file")
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    out = Path(args.out.format(block=args.block))
    out.mkdir(parents=True, exist_ok=True)
    spec = DetectionSpec(source=args.data, image_size=args.image_size,
                         **({"num_train": 64, "num_val": 32} if args.fast else {}))
    try:
        train, val, names = make_detection_loaders(spec, batch_size=args.batch_size, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    module = YOLOv6Detector(args.model, len(names), args.block, lr=args.lr)
    times: dict[str, float] = {}
    t0 = time.time()
    trainer_kw = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=str(out))
    if args.ckpt:
        try:
            state = common.read_state_dict(args.ckpt)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        module.model.load_state_dict(state, strict=True)
    elif args.epochs:
        pl.Trainer(max_epochs=args.epochs, limit_train_batches=2 if args.fast else None, **trainer_kw).fit(
            module, train)
    common.write_state_dict(module.model, out / "fp32.safetensors")
    times["fp32"] = time.time() - t0
    results: dict[str, Any] = {"model": args.model, "block": args.block, "seed": args.seed,
                               "data": args.data, "image_size": args.image_size, "args": vars(args), "map": {}}
    results["map"]["fp32"] = evaluate_map(module.model, val)
    calib = [x for x, _ in list(train)[:4]]
    for gran in ("per_channel", "per_tensor"):
        q = ptq(module.model, calib, QuantConfig(w_granularity=gran))
        results["map"][f"ptq_w8a8_{gran}"] = evaluate_map(q, val)
    config = QuantConfig()
    if args.sensitivity:
        t0 = time.time()
        rows = map_sensitivity(module.model, calib, val, args.sensitivity, config)
        times["sensitivity"] = time.time() - t0
        results["sensitivity"] = [{"name": r.name, "skip_name": r.skip_name, "map_drop": r.metric_drop,
                                   "mse": r.mse} for r in rows]
        results["keep_float"] = [r.skip_name for r in rows[:args.keep_float]]
        # the callback prepares the LightningModule: its layer names start with the attribute holding the detector
        config = QuantConfig(skip=tuple(f"model.{n}" for n in results["keep_float"]))
    t0 = time.time()
    from qat_rep.callbacks import DistillConfig, RepQATCallback

    qat = copy.deepcopy(module)
    qat.hparams.lr = args.qat_lr
    distill = {}
    if args.distill:
        distill = dict(teacher=copy.deepcopy(module.model).eval(),
                       distill=DistillConfig(logit_weight=0.0, student="model",
                                             features={f"model.{n}": n for n in NECK_OUTPUTS}))
    cb = RepQATCallback(config, onnx=None, compare_fp32=False, progress=False, export_dir=str(out / "qat_fit"),
                        **distill)
    trainer = pl.Trainer(max_epochs=args.qat_epochs, limit_train_batches=2 if args.fast else None, callbacks=[cb],
                         **trainer_kw)
    trainer.fit(qat, train)
    times["qat"] = time.time() - t0
    if args.distill:  # the last step's channel-wise KL, summed over the three neck outputs
        results["kd_feature"] = float(trainer.callback_metrics["qat/kd_feature"])
    results["map"]["qat_w8a8"] = evaluate_map(qat.model, val)
    export_model = copy.deepcopy(qat.model).eval()
    export_model.export = True
    example = next(iter(val))[0][:1]
    trt = export_onnx(export_model, out / "model_trt.onnx", example, target="tensorrt")
    ort = export_onnx(export_model, out / "model_ort.onnx", example, target="onnxruntime")
    results["shared_scale_violations"] = list(trt.shared_scale_violations)
    ops = {(n.name or n.output[0]): n.op_type for n in onnx.load(str(trt.path)).graph.node}
    convs = {k: v for k, v in quantized_node_names(trt.path).items() if ops[k] in ("Conv", "ConvTranspose")}
    results["trt_convs_with_qdq"] = [sum(v == (True, True) for v in convs.values()), len(convs)]
    results["map"]["ort_int8"] = evaluate_onnx_map(ort.path, val, qat.model.strides, len(names))
    results["seconds"] = {k: round(v, 1) for k, v in times.items()}
    common.atomic_write_json(out / "results.json", results)
    title = f"{args.model} ({args.block} blocks), seed {args.seed}, {args.data}"
    plot_map(results, out / "map.png", title)
    common.write_report(out / "report.md", title, [("mAP per stage", report_markdown(results)),
                                                   ("Seconds", json.dumps(results["seconds"]))])
    print(report_markdown(results))
    return results


if __name__ == "__main__":
    main()
