"""Post-training quantization of a trained (QA)RepVGG by reconstruction: AdaRound, BRECQ and MRECG at low bits.

Run from the repository root::

    python recipes/ptq_mrecg.py --ckpt out/qat_b0/qarepvgg_a0/fp32.ckpt --image-size 16 --bits 4
    python recipes/ptq_mrecg.py --bits 4,2 --iters 1000 --num-samples 1024

MRECG (Ma et al., CVPR 2023) observes that block-wise reconstruction (BRECQ) oscillates where adjacent modules
differ in capacity, and reconstructs the top-``k`` adjacent pairs with the largest capacity difference jointly.
Compared with max calibration, layer-wise AdaRound and block-wise BRECQ (QDrop with ``--qdrop 0.5``). The published
setting is 20 000 iterations per unit on 1 024 images; the CPU default here is ``--iters 300``.
Writes ``report.md``, ``accuracy.png``, ``results.json`` and the MRECG model as QDQ ONNX (checked in ONNX Runtime).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import recipe_ptq
from recipe_ptq import PTQMethod


def _recon(args: argparse.Namespace) -> dict[str, Any]:
    return {"iters": args.iters, "num_samples": args.num_samples, "batch_size": args.recon_batch_size,
            "qdrop": args.qdrop}


METHODS = (
    PTQMethod("minmax", "minmax"),
    PTQMethod("adaround", "adaround", _recon),
    PTQMethod("brecq", "brecq", _recon),
    PTQMethod("mrecg", "mrecg", lambda a: {**_recon(a), "k": a.k}),
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = recipe_ptq.ptq_parser(__doc__.split("\n\n")[0], out="out/ptq_mrecg-{block}", bits="4",
                                   block="qarepvgg")
    parser.add_argument("--iters", type=int, default=300, help="reconstruction steps per unit (published: 20000)")
    parser.add_argument("--num-samples", type=int, default=512, help="calibration images for reconstruction")
    parser.add_argument("--recon-batch-size", type=int, default=32, help="reconstruction batch size")
    parser.add_argument("--qdrop", type=float, default=1.0,
                        help="probability of quantizing an activation during reconstruction (0.5 = QDrop)")
    parser.add_argument("--k", type=int, default=3, help="MRECG: adjacent module pairs reconstructed jointly")
    args = recipe_ptq.parse_ptq_args(parser, argv)
    if args.fast:
        args.iters, args.num_samples, args.recon_batch_size = min(args.iters, 10), min(args.num_samples, 64), 16
    for flag in ("iters", "num_samples", "recon_batch_size", "k"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return recipe_ptq.run_ptq_recipe(
        "ptq_mrecg", "reconstruction PTQ (AdaRound / BRECQ / MRECG)", METHODS, "mrecg", args,
        f"Each method quantizes a copy of the same fused FP32 model (`qat_rep.ptq.quantize_ptq`): {args.iters} "
        f"reconstruction steps per unit, {args.num_samples} calibration images, batch {args.recon_batch_size}, "
        f"qdrop {args.qdrop}, MRECG k={args.k}. First and last layer stay 8-bit below 8 bits.")


if __name__ == "__main__":
    main(sys.argv[1:])
