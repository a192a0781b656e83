"""Training-step time of equivalent-kernel QAT against FP32 multi-branch training and per-branch fake quant.

Modes, all on ``qarepvgg_a0`` (one training step = forward + backward + SGD step):

* ``fp32``        — the float multi-branch model (the baseline, ratio 1.0);
* ``eqk_qat``     — qat-rep's equivalent-kernel QAT (``prepare`` + ``calibrate``): one conv per block;
* ``branch_fq``   — what a generic tool does: a fake quantizer on every conv, including each branch conv
  (stock pytorch-quantization ``QuantConv2d``/``QuantLinear``, its own fake-quant functions);
* ``branch_fq_fused`` — the same per-branch insertion with qat-rep's fused fake-quant kernels (a lower bound
  for any per-branch tool);
* ``eqk_float``   — the equivalent-kernel path with its quantizers disabled: what assembling the kernel from the
  branches costs by itself;
* ``fused_fp32``  — the re-parameterized plain network (one conv per block, post-BN folded, no quantization): the
  floor for any one-conv-per-block training step;
* ``fused_bn_fp32`` — the same with QARepVGG's post-sum BN kept as a training BatchNorm (batch statistics), as
  equivalent-kernel QAT keeps it: the floor for ``eqk_qat`` on QARep blocks.

Modes are interleaved step by step (round robin) so that load on the shared machine hits them alike; the table
shows medians and ratios to ``fp32`` from the same run. Single intra-op thread by default (``--threads``).

    python benchmarks/qat_speed.py            # writes benchmarks/results/qat_speed.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qat_rep import create_model, reparameterize  # noqa: E402
from qat_rep.quant import QuantConfig, calibrate, prepare  # noqa: E402
from qat_rep.quant.backend import (  # noqa: E402
    PQQuantConv2d,
    PQQuantLinear,
    QuantConv2d,
    QuantLinear,
    TensorQuantizer,
    make_quantizer,
)
from qat_rep.export.atomic import write_text_atomic as _atomic_write  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _replace_all(model: nn.Module, make) -> nn.Module:
    for name, m in list(model.named_modules()):
        for cname, child in list(m.named_children()):
            if type(child) in (nn.Conv2d, nn.Linear):
                setattr(m, cname, make(child))
    return model


def branch_fq_stock(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Every conv/linear (branch convs included) → stock pytorch-quantization modules, max-calibrated."""
    def make(layer):
        if isinstance(layer, nn.Conv2d):
            q = PQQuantConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, layer.groups, layer.bias is not None)
        else:
            q = PQQuantLinear(layer.in_features, layer.out_features, layer.bias is not None)
        q.weight, q.bias = layer.weight, layer.bias
        return q
    _replace_all(model, make)
    quantizers = [m for n, m in model.named_modules() if n.endswith("_quantizer")]
    with torch.no_grad():
        for q in quantizers:
            q.disable_quant(), q.enable_calib()
        model.eval()
        model(x)
        for q in quantizers:
            q.load_calib_amax()
            q.disable_calib(), q.enable_quant()
    return model.train()


def branch_fq_fused(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Every conv/linear → qat-rep's QuantConv2d/QuantLinear (fused fake-quant kernels), max-calibrated."""
    def make(layer):
        shape = (layer.weight.shape[0],) + (1,) * (layer.weight.dim() - 1)
        iq = make_quantizer(8)
        wq = make_quantizer(8, axis=0, amax_shape=shape, dynamic=True)
        return (QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear).from_float(layer, iq, wq)
    _replace_all(model, make)
    with torch.no_grad():
        acts = {}
        hooks = [m.register_forward_pre_hook(lambda mod, a: acts.__setitem__(mod, a[0].abs().amax()))
                 for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
        for m in model.modules():
            if isinstance(m, (QuantConv2d, QuantLinear)):
                m._input_quantizer.disable()
        model.eval()
        model(x)
        for h in hooks:
            h.remove()
        for m, a in acts.items():
            m._input_quantizer.set_amax(a)
            m._input_quantizer.enable()
    return model.train()


def build(mode: str, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("qarepvgg_a0", num_classes=10, small_input=x.shape[-1] <= 64)
    if mode in ("eqk_qat", "eqk_float"):
        prepare(model, QuantConfig())
        calibrate(model, [x])
        if mode == "eqk_float":
            for m in model.modules():
                if isinstance(m, TensorQuantizer):
                    m.disable()
    elif mode == "fused_fp32":
        reparameterize(model)
    elif mode == "fused_bn_fp32":
        reparameterize(model, fold_post_bn=False)
    elif mode == "branch_fq":
        branch_fq_stock(model, x)
    elif mode == "branch_fq_fused":
        branch_fq_fused(model, x)
    return model.train()


def run(sizes: list[tuple[int, int]], steps: int, warmup: int, modes: list[str]) -> list[dict]:
    rows = []
    for size, batch in sizes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, size, size, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        models = {m: build(m, x) for m in modes}
        opts = {m: torch.optim.SGD(models[m].parameters(), lr=1e-4, momentum=0.9) for m in modes}
        times: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(warmup + steps):
            for m in modes:
                t0 = time.perf_counter()
                loss = nn.functional.cross_entropy(models[m](x), y)
                opts[m].zero_grad(set_to_none=True)
                loss.backward()
                opts[m].step()
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[m].append(dt)
        base = statistics.median(times["fp32"])
        for m in modes:
            med = statistics.median(times[m])
            rows.append({"size": size, "batch": batch, "mode": m, "median_s": med, "min_s": min(times[m]),
                         "ratio_to_fp32": med / base, "steps": steps})
    return rows




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="32x32,224x8", help="comma list of <image size>x<batch>")
    ap.add_argument("--modes", default="fp32,eqk_qat,branch_fq,branch_fq_fused,eqk_float,fused_fp32,fused_bn_fp32")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    if "fp32" not in modes:
        ap.error("--modes must include fp32 (the baseline)")
    rows = run(sizes, args.steps, args.warmup, modes)
    console = Console()
    table = Table(title="qarepvgg_a0 training step (median over interleaved steps)")
    for c in ("input", "mode", "median s/step", "ratio to fp32"):
        table.add_column(c, justify="right" if c != "mode" else "left")
    md = ["| input | mode | median s/step | ratio to fp32 |", "|---|---|---|---|"]
    for r in rows:
        cells = (f"{r['size']}x{r['size']} b{r['batch']}", r["mode"], f"{r['median_s']:.4f}",
                 f"{r['ratio_to_fp32']:.2f}")
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(table)
    ok = all(r["ratio_to_fp32"] <= 0.8 for r in rows if r["mode"] == "eqk_qat")
    console.print(f"target eqk_qat/fp32 <= 0.8 at every size: {'met' if ok else 'NOT met'}")
    meta = {"torch": torch.__version__, "threads": args.threads, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "steps": args.steps, "warmup": args.warmup,
            "load_avg": os.getloadavg(), "target_eqk_qat_le_0_8": ok}
    os.makedirs(args.out, exist_ok=True)
    _atomic_write(os.path.join(args.out, "qat_speed.json"), json.dumps({"meta": meta, "rows": rows}, indent=2))
    _atomic_write(os.path.join(args.out, "qat_speed.md"),
                  "Command: `python benchmarks/qat_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n\n" + "\n".join(md) + "\n\n"
                  + f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}; "
                  + f"target eqk_qat/fp32 <= 0.8: {'met' if ok else 'NOT met'}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
