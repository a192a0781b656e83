"""QDQ ONNX export of a quantized (or plain) re-parameterized network.

The PyTorch model is exported with the TorchScript-based exporter (``dynamo=False``, explicit: the dynamo exporter
does not know pytorch-quantization's ops) inside :func:`qat_rep.quant.backend.onnx_export_mode`, which turns every
fake quantizer into an ONNX ``QuantizeLinear``/``DequantizeLinear`` pair (symmetric, zero point 0; weights per output
channel on axis 0, a ``ConvTranspose``'s on axis 1; activations per tensor). The network is exported in its fused
form: each rep block is one conv.

Two graph layouts carry the same numbers:

* ``target="tensorrt"`` — the graph as pytorch-quantization emits it: Q/DQ on the float weights and on the input of
  every quantized conv/linear, ``Conv → Relu → Q``. This is the layout TensorRT's explicit-quantization docs ask for.
* ``target="onnxruntime"`` (default) — the same quantization, rewritten so ONNX Runtime's CPU graph optimizer can
  fuse each ``DQ → Conv → Q`` into one integer ``QLinearConv``: weights stored as INT8 initializers (the weight Q is
  applied offline, round-half-even like ``QuantizeLinear``), and every ``Relu → Q(s, 0)`` becomes
  ``Q(s, 0) → DQ → Relu → Q(s, 0)``. That rewrite is exact because ReLU commutes with a symmetric quantizer
  (``Q(relu(y)) = max(Q(y), 0)`` when the zero point is 0); without it ORT finds ``Conv → Relu`` where it needs
  ``Conv → Q`` and runs every conv in float (measured in ``benchmarks/deploy_speed.py``). A UINT8 quantizer
  (``QuantConfig.unsigned_activations``) clamps at 0 itself, so ``Relu → Q_u8(s, 0)`` becomes ``Q_u8(s, 0)``: no
  float op is left between two integer convs. Biases are stored as INT32 on the accumulator grid ``s_x · s_w``
  behind a DequantizeLinear — the integers the fake-quant model adds (:func:`qat_rep.quant.backend.int32_bias`)
  and the form ORT needs to run the classifier ``DQ → Gemm`` as an integer ``QGemm``. A conv whose output is not
  quantized (the last conv before a global pool, unless ``QuantConfig.quantize_pools``) runs in float in ORT.
  ``Flatten → Q`` becomes ``Q → Flatten`` (exact: a per-tensor quantizer is elementwise), so ORT sees
  ``DQ → GlobalAveragePool → Q`` and runs the pool as ``QLinearGlobalAveragePool``.

Shared scales: TensorRT re-quantizes the inputs of an ``Add``/``Concat`` whose inputs carry different scales.
:func:`shared_scale_violations` lists such nodes; the fused RepVGG/QARepVGG chains contain no ``Add`` at all, and
EfficientRep's only ``Concat`` (SimSPPF) concatenates un-quantized tensors followed by a single quantizer, so the
exported graphs have none (tested).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .atomic import atomic_file
from .calls import ModelCall

__all__ = [
    "ExportReport",
    "export_onnx",
    "quantized_node_names",
    "shared_scale_violations",
    "TARGETS",
]

log = logging.getLogger(__name__)

TARGETS = ("onnxruntime", "tensorrt")
_QUANT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote."""

    path: Path
    quantized: bool
    target: str
    opset: int
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    quantized_layers: int  # conv/linear layers of the PyTorch model that carry quantizers
    op_counts: dict[str, int] = field(default_factory=dict)
    shared_scale_violations: tuple[str, ...] = ()

    def __str__(self) -> str:
        ops = ", ".join(f"{k}={v}" for k, v in sorted(self.op_counts.items()))
        kind = f"INT8 QDQ ({self.target})" if self.quantized else "FP32"
        return f"{self.path}: {kind}, opset {self.opset}, input {self.input_shape}; {ops}"


# ------------------------------------------------------------------------------------------------ model side
def _tensor_quantizer_cls() -> type:
    from ..quant.backend import TensorQuantizer  # the only pytorch-quantization import path

    return TensorQuantizer


def _quant_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own an input and a weight quantizer (quantized convs/linears and rep blocks' ``rep_quant``)."""
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "_input_quantizer") and hasattr(m, "_weight_quantizer")]


def _first_conv_in_channels(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and m.weight.dim() == 4:  # QuantConv2d is a _ConvNd, not a Conv2d
            return m.in_channels
    return None


def _uncalibrated(model: nn.Module) -> list[str]:
    tq = _tensor_quantizer_cls()
    bad = []
    for name, m in model.named_modules():
        if isinstance(m, tq) and not m._disabled and not m.dynamic and not m.is_calibrated:
            bad.append(name)
    return bad


def _not_8bit(model: nn.Module) -> list[tuple[str, int]]:
    """Active quantizers whose bit width is not 8 (opset-13 QuantizeLinear holds int8/uint8 only)."""
    tq = _tensor_quantizer_cls()
    return [(name, int(m.num_bits)) for name, m in model.named_modules()
            if isinstance(m, tq) and not m._disabled and int(m.num_bits) != 8]


def _fuse_for_export(model: nn.Module, quantized: bool) -> nn.Module:
    """A deep copy of ``model`` in deployable fused form (quantizers disabled when ``quantized=False``)."""
    from ..reparam import reparameterize

    m = copy.deepcopy(model).cpu().eval()
    has_quant = bool(_quant_modules(m))
    if has_quant:
        from ..quant import convert

        convert(m)  # idempotent: a converted model passes through; folds post-BNs and conv+BN pairs otherwise
    else:
        reparameterize(m, fold_post_bn=True)
    if not quantized:
        tq = _tensor_quantizer_cls()
        for q in m.modules():
            if isinstance(q, tq):
                q.disable()
    return m


def _check_example(model: nn.Module, example_input: Tensor) -> None:
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a torch.Tensor of shape (N, C, H, W), got {type(example_input).__name__}")
    if example_input.dim() != 4:
        raise ValueError(
            f"example_input must be 4-D (N, C, H, W), got shape {tuple(example_input.shape)}; e.g. "
            "torch.randn(1, 3, 32, 32)"
        )
    if not example_input.is_floating_point():
        raise TypeError(f"example_input must be a float tensor, got dtype {example_input.dtype}")
    channels = _first_conv_in_channels(model)
    if channels is not None and example_input.shape[1] != channels:
        raise ValueError(
            f"example_input has {example_input.shape[1]} channels (shape {tuple(example_input.shape)}) but the "
            f"model's first conv expects {channels}; pass a tensor of shape (N, {channels}, H, W)"
        )


# ------------------------------------------------------------------------------------------------ graph side
def _as_model(model_or_path) -> "onnx.ModelProto":  # noqa: F821
    import onnx

    if isinstance(model_or_path, (str, Path)):
        return onnx.load(str(model_or_path))
    return model_or_path


def _constants_to_initializers(graph) -> None:
    from onnx import numpy_helper

    keep = []
    names = {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            if node.output[0] not in names:
                arr = numpy_helper.to_array(node.attribute[0].t)
                graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
                names.add(node.output[0])
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def _fold_weight_quantizers(graph) -> int:
    """Replace ``QuantizeLinear(float initializer)`` by an INT8 initializer (what ORT's own quantizer writes)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    keep, folded = [], 0
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in inits and all(i in inits for i in node.input[1:3]):
            w = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            zp = numpy_helper.to_array(inits[node.input[2]])
            axis = _attr(node, "axis", 1)
            shape = [1] * w.ndim
            if scale.ndim == 1 and w.ndim > 0:
                shape[axis % w.ndim] = -1
            info = np.iinfo(zp.dtype)
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.rint(w / scale.reshape(shape)) + zp.astype(np.float32).reshape(shape)
            q = np.nan_to_num(q, nan=0.0, posinf=info.max, neginf=info.min)
            q = np.clip(q, info.min, info.max).astype(zp.dtype)
            graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
            folded += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return folded


def _zero_point(graph, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for i in graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    return None


def _int_zero(graph, name: str) -> bool:
    zp = _zero_point(graph, name)
    return zp is not None and bool((zp == 0).all())


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _relu_through_quantizers(graph) -> int:
    """``Relu → Q(s, 0)`` ⇒ ``Q(s, 0) → DQ → Relu → Q(s, 0)``: exact, and lets ORT fuse the preceding conv."""
    from onnx import helper

    producer = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    added, dropped, count = [], [], 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        relu = producer.get(node.input[0])
        if relu is None or relu.op_type != "Relu" or relu.output[0] in outputs:
            continue
        if len(consumers.get(relu.output[0], [])) != 1 or not _int_zero(graph, node.input[2]):
            continue
        pre = relu.input[0]
        if _zero_point(graph, node.input[2]).dtype == np.uint8:  # Q_u8(relu(y)) = Q_u8(y): drop the Relu
            node.input[0] = pre
            dropped.append(relu)
            count += 1
            continue
        if producer.get(pre) is None or producer[pre].op_type not in _QUANT_OPS:
            continue
        q_name, dq_name = f"{pre}__q", f"{pre}__dq"
        added.append(helper.make_node("QuantizeLinear", [pre, node.input[1], node.input[2]], [q_name],
                                      name=f"{relu.name or pre}/pre_quant"))
        added.append(helper.make_node("DequantizeLinear", [q_name, node.input[1], node.input[2]], [dq_name],
                                      name=f"{relu.name or pre}/pre_dequant"))
        relu.input[0] = dq_name
        count += 1
    for relu in dropped:
        graph.node.remove(relu)
    graph.node.extend(added)
    _toposort(graph)
    return count


def _quantize_before_flatten(graph) -> int:
    """``DQ → GlobalAveragePool → Flatten → Q`` (per tensor) ⇒ ``DQ → GlobalAveragePool → Q → Flatten``.

    The same integers (a per-tensor quantizer is elementwise), and ORT then fuses ``DQ → GlobalAveragePool → Q``
    into ``QLinearGlobalAveragePool``. Only with a quantized pool input: otherwise ORT's own Q/DQ propagation
    keeps the classifier from fusing into ``QGemm`` (measured).
    """
    from onnx import numpy_helper

    producer = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    inits = {i.name: i for i in graph.initializer}
    count = 0
    for q in list(graph.node):
        if q.op_type != "QuantizeLinear" or q.input[1] not in inits:
            continue
        flat = producer.get(q.input[0])
        if flat is None or flat.op_type != "Flatten" or flat.output[0] in outputs:
            continue
        pool = producer.get(flat.input[0])
        if pool is None or pool.op_type != "GlobalAveragePool" or \
                getattr(producer.get(pool.input[0]), "op_type", None) != "DequantizeLinear":
            continue
        if len(consumers.get(flat.output[0], [])) != 1 or numpy_helper.to_array(inits[q.input[1]]).size != 1:
            continue
        source, flat_out, q_out = flat.input[0], flat.output[0], q.output[0]
        q.input[0], q.output[0] = source, flat_out  # Q now reads the pool's output ...
        flat.input[0], flat.output[0] = flat_out, q_out  # ... and Flatten reshapes the integers
        count += 1
    if count:
        _toposort(graph)
    return count


def _int32_biases(graph) -> int:
    """The float bias of ``DQ(x), DQ(W) → Conv/ConvTranspose/Gemm`` ⇒ ``DQ(round(b / (s_x·s_w)) as INT32, s_x·s_w,
    0)``."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    added, count = [], 0
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if any(d is None or d.op_type != "DequantizeLinear" or d.input[1] not in inits for d in (dq_x, dq_w)):
            continue
        if len(consumers.get(node.input[2], [])) != 1:
            continue
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
        s_x = numpy_helper.to_array(inits[dq_x.input[1]]).astype(np.float32)
        s_w = numpy_helper.to_array(inits[dq_w.input[1]]).astype(np.float32)
        if s_x.size != 1 or bias.ndim != 1 or s_w.size not in (1, bias.size):
            continue
        if s_w.size > 1:  # per output channel: Conv's axis 0, ConvTranspose's 1 (group 1), Gemm's 0 (transB=1) or 1
            w_dims = len(inits[dq_w.input[0]].dims) if dq_w.input[0] in inits else 2
            if node.op_type == "ConvTranspose":
                if _attr(node, "group", 1) != 1:
                    continue
                out_axis = 1
            else:
                out_axis = 0 if node.op_type == "Conv" or _attr(node, "transB", 0) else 1
            if _attr(dq_w, "axis", 1) % max(w_dims, 1) != out_axis:
                continue
        scale = (s_x.reshape(()) * s_w.reshape(-1)).astype(np.float32)
        scale = np.broadcast_to(scale, bias.shape).copy()
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint(bias / np.where(scale > 0, scale, 1.0))
        q = np.clip(q, np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
        base = node.input[2]
        names = (f"{base}__int32", f"{base}__int32_scale", f"{base}__int32_zero", f"{base}__int32_dq")
        graph.initializer.extend([numpy_helper.from_array(q, names[0]), numpy_helper.from_array(scale, names[1]),
                                  numpy_helper.from_array(np.zeros(bias.shape, np.int32), names[2])])
        added.append(helper.make_node("DequantizeLinear", list(names[:3]), [names[3]], name=f"{base}/int32_bias",
                                      axis=0))
        node.input[2] = names[3]
        count += 1
    graph.node.extend(added)
    _toposort(graph)
    return count


def _toposort(graph) -> None:
    available = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {""}
    pending, order = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                order.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError("internal error: the rewritten ONNX graph has a cycle or a dangling input")
        pending = rest
    del graph.node[:]
    graph.node.extend(order)


def _drop_unused_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def quantized_node_names(model_or_path) -> dict[str, tuple[bool, bool]]:
    """For every Conv/Gemm/MatMul node: ``(input comes from DequantizeLinear, weight comes from DequantizeLinear)``.

    A fully quantized graph has ``(True, True)`` for every quantized layer of the PyTorch model.
    """
    graph = _as_model(model_or_path).graph
    producer = {o: n for n in graph.node for o in n.output}

    def from_dq(name: str) -> bool:
        p = producer.get(name)
        return p is not None and p.op_type == "DequantizeLinear"

    return {
        (n.name or n.output[0]): (from_dq(n.input[0]), len(n.input) > 1 and from_dq(n.input[1]))
        for n in graph.node if n.op_type in _QUANT_OPS
    }


_SCALE_LINK_OPS = ("Concat", "Add", "Sum", "Relu", "MaxPool")


def _scale_conflicts(graph, producer: dict, inits: dict) -> list[str]:
    """Activation quantizers that must agree but do not: ``QuantizeLinear`` nodes of one tensor, or of tensors
    joined by Concat/Add/Sum (through Relu, MaxPool and Q→DQ pairs), with different scales. Named by the joining
    nodes of the group (or the Q nodes when nothing joins them)."""
    parent: dict[str, str] = {}

    def find(t: str) -> str:
        while parent.setdefault(t, t) != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    for node in graph.node:
        if node.op_type in _SCALE_LINK_OPS:
            for i in (node.input if node.op_type in ("Concat", "Add", "Sum") else node.input[:1]):
                if i and i not in inits:
                    union(i, node.output[0])
        elif node.op_type == "DequantizeLinear":
            q = producer.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                union(q.input[0], node.output[0])
    scales: dict[str, list[tuple[str, np.ndarray]]] = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits and node.input[1] in inits:
            s = np.asarray(inits[node.input[1]], dtype=np.float64).ravel()
            scales.setdefault(find(node.input[0]), []).append((node.name or node.output[0], s))
    bad = []
    for root, qs in scales.items():
        if any(s.shape != qs[0][1].shape or not np.array_equal(s, qs[0][1]) for _, s in qs):
            joins = [n.name or n.output[0] for n in graph.node
                     if n.op_type in ("Concat", "Add", "Sum") and find(n.output[0]) == root]
            bad += joins or [name for name, _ in qs]
    return bad


def shared_scale_violations(model_or_path) -> list[str]:
    """Where TensorRT would re-quantize: nodes whose quantized inputs carry different scales.

    Two cases, in graph order: an ``Add``/``Concat``/``Sum`` whose dequantized inputs use scales that differ in
    value (inputs that do not come from a ``DequantizeLinear`` are float and impose no scale); and activation
    ``QuantizeLinear`` nodes that must agree — on one tensor, or on tensors joined by a Concat/Add/Sum (through
    Relu, MaxPool and Q/DQ pairs, which keep a per-tensor scale) — but differ (named by the joining nodes, or by
    the Q nodes when they quantize one tensor). :func:`qat_rep.quant.share_input_scales` prevents both.
    """
    from onnx import numpy_helper

    graph = _as_model(model_or_path).graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    bad = []
    for node in graph.node:
        if node.op_type not in ("Add", "Concat", "Sum"):
            continue
        scales = []
        for i in node.input:
            p = producer.get(i)
            if p is not None and p.op_type == "DequantizeLinear" and p.input[1] in inits:
                scales.append(np.asarray(inits[p.input[1]], dtype=np.float64).ravel())
        if len(scales) > 1 and any(s.shape != scales[0].shape or not np.array_equal(s, scales[0]) for s in scales):
            bad.append(node.name or node.output[0])
    bad += [n for n in _scale_conflicts(graph, producer, inits) if n not in bad]
    return bad


# ------------------------------------------------------------------------------------------------ export
def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: Tensor | ModelCall,
    opset: int = 13,
    dynamic_batch: bool = True,
    quantized: bool = True,
    target: str = "onnxruntime",
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] | None = None,
) -> ExportReport:
    """Export ``model`` in fused form to ``path`` (atomically) and return what was written.

    ``quantized=True`` needs a model prepared and calibrated with :mod:`qat_rep.quant` (QAT form or converted; the
    model itself is not modified — a copy is converted) and writes a QDQ graph; ``quantized=False`` writes the fused
    FP32 network (quantizers disabled, or a plain float model re-parameterized). ``target`` picks the QDQ layout
    (see the module docstring). ``example_input`` fixes the input shape; with ``dynamic_batch`` the batch axis is
    symbolic. A :class:`~qat_rep.export.calls.ModelCall` (a recorded ``model(*args, **kwargs)``) traces that call:
    each of its tensors becomes a graph input named after ``forward``'s parameter (``input_names`` is ignored).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    if not isinstance(opset, int) or opset < 13:
        raise ValueError(f"opset must be an integer >= 13 (per-channel QuantizeLinear needs 13), got {opset!r}")
    call = example_input if isinstance(example_input, ModelCall) else None
    if call is None:
        _check_example(model, example_input)
    has_quant = bool(_quant_modules(model))
    if quantized:
        if not has_quant:
            raise ValueError(
                "model has no quantized layers: run qat_rep.quant.prepare(model, config) and "
                "qat_rep.quant.calibrate(model, batches) first, or pass quantized=False for an FP32 export"
            )
        missing = _uncalibrated(model)
        if missing:
            shown = ", ".join(missing[:4]) + (" …" if len(missing) > 4 else "")
            raise ValueError(
                f"cannot export before calibration: {len(missing)} quantizer(s) have no amax ({shown}); run "
                "qat_rep.quant.calibrate(model, batches) (or load a calibrated checkpoint) first"
            )
        from ..quant import check_calibrated

        check_calibrated(model)  # an amax of 0 would write QuantizeLinear scale 0: ORT then outputs zeros
        narrow = _not_8bit(model)
        if narrow:
            bits = sorted({b for _, b in narrow})
            raise ValueError(
                f"cannot export {len(narrow)} quantizer(s) with {'/'.join(map(str, bits))} bits (e.g. {narrow[0][0]}) "
                "to ONNX: QuantizeLinear/DequantizeLinear (opset 13) carry 8-bit integers only, so the file would run "
                "a different network. Export a W8A8 model; a lower bit width stays simulated — keep it with "
                "qat_rep.save_quantized, which stores any width"
            )
    if quantized and target == "tensorrt":
        unsigned = [n for n, q in model.named_modules() if isinstance(q, _tensor_quantizer_cls())
                    and not q._disabled and q.unsigned]
        if unsigned:
            raise ValueError(
                f"{len(unsigned)} activation quantizer(s) use the unsigned range (e.g. {unsigned[0]}): the model was "
                "prepared with QuantConfig(unsigned_activations=True), an ONNX Runtime setting — TensorRT has no "
                "UINT8 activations. Export with target='onnxruntime', or prepare and train with "
                "unsigned_activations=False for TensorRT"
            )
    work = _fuse_for_export(model, quantized)
    if call is None:
        examples: tuple[Tensor, ...] = (example_input.detach().to(dtype=torch.float32, device="cpu"),)
        batch_axes = {n: {0: "batch"} for n in input_names}
    else:
        named = call.tensors(work)
        input_names = [n for n, _ in named]
        examples = tuple(t.detach().cpu().float() if t.is_floating_point() else t.detach().cpu() for _, t in named)
        batch_axes = call.dynamic_axes(work)
        work = call.replay_module(work)
    example = examples[0]
    with torch.no_grad():
        try:
            out = work(*examples)  # also refreshes the stored amax of dynamic (weight) quantizers
        except (RuntimeError, TypeError) as e:
            raise ValueError(
                f"the model cannot run on example_input of shape {tuple(example.shape)}: {e}"
            ) from e
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    if output_names is None:
        output_names = ("output",) if n_out == 1 else tuple(f"output{i}" for i in range(n_out))
    if len(output_names) != n_out:
        raise ValueError(f"output_names has {len(output_names)} name(s) but the model returns {n_out} output(s)")
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {**batch_axes, **{n: {0: "batch"} for n in output_names}}

    from ..quant.backend import onnx_export_mode
    import onnx

    path = Path(path)
    with atomic_file(path) as tmp:
        with onnx_export_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                work, examples, str(tmp), opset_version=opset, dynamo=False, do_constant_folding=True,
                input_names=list(input_names), output_names=list(output_names), dynamic_axes=dynamic_axes,
            )
        proto = onnx.load(str(tmp))
        _constants_to_initializers(proto.graph)
        if quantized and target == "onnxruntime":
            _fold_weight_quantizers(proto.graph)
            _relu_through_quantizers(proto.graph)
            _int32_biases(proto.graph)
            _quantize_before_flatten(proto.graph)
        _drop_unused_initializers(proto.graph)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    violations = tuple(shared_scale_violations(proto))
    if violations:
        log.warning("ONNX export %s: Add/Concat inputs with different scales (TensorRT re-quantizes): %s",
                    path, ", ".join(violations))
    report = ExportReport(
        path=path, quantized=quantized, target=target, opset=opset, input_shape=tuple(example.shape),
        dynamic_batch=dynamic_batch, quantized_layers=len(_quant_modules(work)) if quantized else 0,
        op_counts=dict(Counter(n.op_type for n in proto.graph.node)), shared_scale_violations=violations,
    )
    log.info("%s", report)
    return report
