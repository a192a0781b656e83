"""Post-training quantization of a trained RepVGG with CFWS (coarse & fine weight splitting + improved KL).

Run from the repository root::

    python recipes/ptq_cfws.py --ckpt out/qat_b0/repvgg_a0/fp32.ckpt --image-size 16  # PTQ of a trained checkpoint
    python recipes/ptq_cfws.py                                                        # trains the FP32 model first

CFWS (Yang et al., arXiv 2312.10588) targets exactly what breaks plain INT8 PTQ of RepVGG: the fused kernel's
centre tap carries the identity and 1×1 branches, so one per-channel scale is set by the centre and wipes out the
8 outer taps. The kernel is split into a coarse centre part (exact in INT8) and a fine remainder with its own
scale, and activation ranges use the "improved KL" calibrator. Compared here with plain max calibration
(``minmax``), TensorRT-style ``entropy`` calibration and CFWS's two halves alone (split only, improved KL only).
Writes ``report.md``, ``accuracy.png``, ``results.json`` and the CFWS model as QDQ ONNX (checked in ONNX Runtime).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import recipe_ptq
from recipe_ptq import PTQMethod

METHODS = (
    PTQMethod("minmax", "minmax"),
    PTQMethod("entropy", "entropy", calibrator="entropy"),
    PTQMethod("cfws-split-only", "cfws", lambda a: {"split": True, "improved_kl": False}),
    PTQMethod("cfws-kl-only", "cfws", lambda a: {"split": False, "improved_kl": True}),
    PTQMethod("cfws", "cfws", lambda a: {"split": True, "improved_kl": True}),
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = recipe_ptq.ptq_parser(__doc__.split("\n\n")[0], out="out/ptq_cfws-{block}", bits="8,6",
                                   block="repvgg")
    args = recipe_ptq.parse_ptq_args(parser, argv)
    return recipe_ptq.run_ptq_recipe(
        "ptq_cfws", "CFWS vs plain PTQ", METHODS, "cfws", args,
        "Each method quantizes a copy of the same fused FP32 model (`qat_rep.ptq.quantize_ptq`), per-channel "
        "symmetric weights, per-tensor activations, first/last layer 8-bit below 8 bits. `cfws-split-only` keeps "
        "the max calibrator for activations; `cfws-kl-only` uses improved KL without splitting kernels.")


if __name__ == "__main__":
    main(sys.argv[1:])
