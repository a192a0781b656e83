"""Run an exported ONNX file in ONNX Runtime (CPU) and compare it with the PyTorch fake-quant model.

What :func:`verify_onnx` measures, on every batch of a loader:

* **agreement** — the fraction of samples whose top-1 class is the same in ONNX Runtime and in PyTorch;
* **max |Δlogit|** in absolute terms and in units of the *output quantization step*
  ``max|logit| / (2^(b-1) - 1)`` (``b`` = bits of the model's last quantized layer, the step an INT8 quantizer
  calibrated with ``max`` on these logits would have). ORT runs integer kernels with its own requantization
  rounding, so intermediate activations may land one step apart; this number says how far that moves the output;
* **accuracy** of both runtimes when the loader yields labels.

A sample counts as agreeing only when both runtimes pick the same class *uniquely*: a tie for the top logit (for
instance the constant outputs of a network whose scales collapsed to 0) is a disagreement, not a lucky match.
:attr:`VerifyResult.ok` is false — with one sentence per reason in :attr:`VerifyResult.failures` — when the agreement
is below ``min_agreement``, when the max logit difference exceeds ``max_steps`` output steps, or when the PyTorch
outputs are constant (nothing to compare).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .calls import ModelCall

__all__ = ["VerifyResult", "verify_onnx", "ort_session", "PRECISE_INT8_KEY", "DEFAULT_MIN_AGREEMENT",
           "DEFAULT_MAX_STEPS"]

#: top-1 agreement below this fails the check (one sample in 200)
DEFAULT_MIN_AGREEMENT = 0.995
#: a max logit difference above this many output quantization steps fails the check (ORT's requantization
#: rounding moves outputs by about one step: measured 1.08 on the QAT-B0 recipe)
DEFAULT_MAX_STEPS = 4.0


@dataclass(frozen=True)
class VerifyResult:
    """Agreement of an ONNX file with the PyTorch model it came from (see the module docstring)."""

    samples: int
    agreement: float | None  # top-1 agreement ORT vs PyTorch (None for multi-output models)
    max_abs_diff: float
    output_step: float
    max_diff_steps: float  # max_abs_diff / output_step
    ort_accuracy: float | None
    torch_accuracy: float | None
    ok: bool = True  # False when any of ``failures`` applies
    failures: tuple[str, ...] = ()  # one sentence per failed check

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = list(self.failures)
        return d

    def rows(self) -> list[tuple[str, str]]:
        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{100 * v:.2f}%"

        return [
            ("samples", str(self.samples)),
            ("top-1 agreement ORT vs PyTorch", pct(self.agreement)),
            ("max |logit diff|", f"{self.max_abs_diff:.4g}"),
            ("output quantization step", f"{self.output_step:.4g}"),
            ("max |logit diff| / step", f"{self.max_diff_steps:.3f}"),
            ("ORT accuracy", pct(self.ort_accuracy)),
            ("PyTorch accuracy", pct(self.torch_accuracy)),
            ("check", "passed" if self.ok else "FAILED: " + " ".join(self.failures)),
        ]

    def __str__(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in self.rows())


#: ONNX Runtime session option that makes x86 CPUs without VNNI (AVX2, AVX-512F) use exact U8U8 integer GEMMs
#: instead of ``vpmaddubsw`` U8S8 ones, whose 16-bit pair sums saturate with full-range INT8 weights.
PRECISE_INT8_KEY = "session.x64quantprecision"


def ort_session(path: str | Path, threads: int | None = None, optimized_model_path: str | Path | None = None,
                precise_int8: bool = True):
    """An ONNX Runtime CPU session with all graph optimizations (``threads`` intra-op threads when given).

    ``precise_int8`` (default) sets :data:`PRECISE_INT8_KEY`: on x86 CPUs without VNNI, ONNX Runtime's fast
    U8S8 kernels add pairs of ``u8·s8`` products in saturating 16-bit arithmetic, which overflows with the
    full-range (±127) per-channel weights TensorRT-style QAT produces and moves logits by many quantization steps
    (measured: ``tests/test_export_onnx.py``). CPUs with VNNI (AVX512-VNNI/AVX-VNNI) compute exactly without it
    (measured: 100 % agreement either way), and there it only costs time (1.9–2.4x for INT8 qarepvgg_a0,
    ``benchmarks/deploy_speed.py``). It has no effect on float graphs.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {str(path)!r} does not exist; export it with qat_rep.export_onnx first")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if precise_int8:
        so.add_session_config_entry(PRECISE_INT8_KEY, "1")
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own classes (InvalidProtobuf, Fail, ...) for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{str(path)!r} is not a readable ONNX model ({type(e).__name__}: {first[:200]}); "
                         "re-export it (qat-rep export ART_DIR --out model.onnx)") from None


def _split_batch(batch: Any) -> tuple[Tensor | ModelCall, Tensor | None]:
    if isinstance(batch, ModelCall):
        return batch, None
    if isinstance(batch, (tuple, list)):
        x = batch[0]
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return x, y
    if isinstance(batch, Tensor):
        return batch, None
    raise TypeError(f"loader must yield tensors or (input, label) pairs, got {type(batch).__name__}")


def _output_bits(model: nn.Module) -> int:
    bits = 8
    for m in model.modules():
        q = getattr(m, "_input_quantizer", None)
        if q is not None and getattr(q, "num_bits", None):
            bits = int(q.num_bits)
    return bits


@torch.no_grad()
def verify_onnx(path: str | Path, model: nn.Module, loader: Iterable[Any], max_batches: int | None = None,
                threads: int | None = None, precise_int8: bool = True, *,
                min_agreement: float = DEFAULT_MIN_AGREEMENT, max_steps: float = DEFAULT_MAX_STEPS) -> VerifyResult:
    """Run ``path`` in ONNX Runtime on ``loader`` next to ``model`` (PyTorch, eval mode) and compare them.

    ``loader`` yields input tensors, ``(input, label)`` pairs or recorded calls
    (:class:`~qat_rep.export.calls.ModelCall`, fed as the file's named inputs); ``model`` is the PyTorch fake-quant
    model the file was exported from (QAT form, converted, or a :func:`qat_rep.load_quantized` artifact). The
    result's ``ok`` and ``failures`` apply ``min_agreement`` (top-1, ties count as disagreement) and ``max_steps``
    (max logit difference in output quantization steps); see the module docstring. Raises ``ValueError`` for a file
    that is not a readable ONNX model or whose input shape does not fit the loader's.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)) or not min_agreement >= 0:
        raise ValueError(f"min_agreement must be a fraction >= 0 (e.g. 0.995), got {min_agreement!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, float)) or not max_steps > 0:
        raise ValueError(f"max_steps must be a positive number of output steps, got {max_steps!r}")
    sess = ort_session(path, threads, precise_int8=precise_int8)
    in_names = [i.name for i in sess.get_inputs()]
    in_shape = sess.get_inputs()[0].shape
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n = agree = ort_ok = torch_ok = labelled = 0
    max_diff = max_ref = 0.0
    multi = False
    constant = True  # every PyTorch output row constant so far
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = _split_batch(batch)
            if isinstance(x, ModelCall):
                given = dict(x.tensors(model))
                feeds = {n: (given[n].float() if given[n].is_floating_point() else given[n]).numpy() for n in in_names}
                ref = x.run(model)
            else:
                _check_input_shape(path, in_shape, tuple(x.shape))
                feeds = {in_names[0]: x.detach().cpu().float().numpy()}
                ref = model(x.to(device))
            ort_out = [np.asarray(o) for o in sess.run(None, feeds)]
            ref_list = [r.detach().cpu().float().numpy() for r in (ref if isinstance(ref, (tuple, list)) else [ref])]
            if len(ref_list) != len(ort_out):
                raise ValueError(f"the ONNX file returns {len(ort_out)} output(s) but the model {len(ref_list)}")
            for a, b in zip(ort_out, ref_list):
                if a.shape != b.shape:
                    raise ValueError(f"output shapes differ: ONNX {a.shape} vs PyTorch {b.shape}")
                max_diff = max(max_diff, float(np.abs(a.astype(np.float64) - b).max()))
                max_ref = max(max_ref, float(np.abs(b).max()))
                rows = b.reshape(b.shape[0], -1) if b.ndim > 1 else b.reshape(1, -1)
                constant = constant and bool((rows == rows[:, :1]).all())
            multi = multi or len(ref_list) > 1 or ref_list[0].ndim != 2
            if not multi:
                top_ort, top_pt = ort_out[0].argmax(1), ref_list[0].argmax(1)
                unique = _unique_top(ort_out[0]) & _unique_top(ref_list[0])
                agree += int(((top_ort == top_pt) & unique).sum())
                if y is not None:
                    yy = y.cpu().numpy()
                    ort_ok += int((top_ort == yy).sum())
                    torch_ok += int((top_pt == yy).sum())
                    labelled += len(yy)
            n += ref_list[0].shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("loader yielded no batches; pass a non-empty loader (e.g. the validation loader)")
    step = max_ref / ((1 << (_output_bits(model) - 1)) - 1) if max_ref > 0 else 1.0
    agreement = None if multi else agree / n
    failures = []
    if constant:
        failures.append(f"every PyTorch output is constant across classes/channels (max |output| {max_ref:.3g}): the "
                        "model computes nothing to compare — check its calibration (an amax of 0 quantizes "
                        "everything to 0)")
    if agreement is not None and agreement < min_agreement:
        failures.append(f"top-1 agreement {100 * agreement:.2f}% is below {100 * min_agreement:.2f}% (a tie for the "
                        "top logit counts as disagreement)")
    if max_diff / step > max_steps:
        failures.append(f"the max logit difference is {max_diff / step:.2f} output steps, above the bound of "
                        f"{max_steps:g}")
    return VerifyResult(
        samples=n,
        agreement=agreement,
        max_abs_diff=max_diff,
        output_step=step,
        max_diff_steps=max_diff / step,
        ort_accuracy=(ort_ok / labelled) if labelled and not multi else None,
        torch_accuracy=(torch_ok / labelled) if labelled and not multi else None,
        ok=not failures,
        failures=tuple(failures),
    )


def _unique_top(logits: np.ndarray) -> np.ndarray:
    """Per row: True when the largest value occurs once (the top-1 class is defined)."""
    top = logits.max(axis=1, keepdims=True)
    return (logits == top).sum(axis=1) == 1


def _check_input_shape(path: str | Path, expected: Sequence[Any], got: tuple[int, ...]) -> None:
    """Refuse an input whose static dimensions differ from the ONNX file's (ORT's own error is a C++ trace)."""
    fixed = [(i, d) for i, d in enumerate(expected) if isinstance(d, int)]
    if len(expected) != len(got) or any(got[i] != d for i, d in fixed):
        want = "x".join(str(d) if isinstance(d, int) else "N" for d in expected)
        raise ValueError(f"{str(path)!r} takes inputs of shape {want}, the data gives {'x'.join(map(str, got))}; "
                         "pass the image size the file was exported with (qat-rep verify --image-size), or "
                         "re-export it for this size")
