"""QDQ ONNX export and ONNX Runtime verification, through the real core path prepare → calibrate → (QAT) → convert.

The shared model (:func:`qat_digits`) is QARepVGG-A0 on the embedded digits at their native 8×8 resolution, trained
for 60 Adam steps (~90 % validation accuracy), prepared, calibrated and fine-tuned for a few QAT steps. It is built
once per test session and shared with the artifact and CLI tests. A *trained* reference matters: an untrained deep
net amplifies a single one-step rounding difference (PyTorch's fake quant multiplies by 1/scale, ONNX divides by the
scale; float summation orders differ) into a different top-1 class, which says nothing about the exporter.
"""

from __future__ import annotations

import copy
import functools
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qat_rep
from qat_rep.data import DataSpec, load_dataset
from qat_rep.reparam import find_rep_blocks
from qat_rep.export import export_onnx, verify_onnx
from qat_rep.export.atomic import ArtifactWriteError
from qat_rep.export.bench import ort_latency, ort_op_counts
from qat_rep.export.onnx_export import quantized_node_names, shared_scale_violations
from qat_rep.export.verify import ort_session
from qat_rep.quant import QuantConfig, calibrate, convert, prepare
from qat_rep.quant.insert import quant_layers
from qat_rep.quant.backend import TensorQuantizer
from qat_rep.quant.qmath import bounds

SIZE = 8
#: logits of ONNX Runtime vs PyTorch, in output quantization steps: a tie-flipped integer in an early layer spreads
#: (see test_onnx_integers_match_layer_by_layer); measured 0.02 and 0.58-1.21 on two CPUs
MAX_LOGIT_STEPS = 2.0


PRESETS = {"tensorrt": QuantConfig, "onnxruntime": QuantConfig.for_onnxruntime}


def qat_digits(preset: str = "tensorrt") -> dict:
    """QAT-form QARepVGG-A0 on digits 8×8 plus its data, quantized with the ``preset`` config (``tensorrt``: the
    default ``QuantConfig()``; ``onnxruntime``: ``QuantConfig.for_onnxruntime()``). Built once per preset; callers
    must deep-copy before mutating."""
    with torch.enable_grad():  # a first call may come from inside a caller's no_grad block
        return _qat_digits(preset)


@functools.lru_cache(maxsize=None)
def _qat_digits(preset: str) -> dict:
    torch.manual_seed(0)
    train, val, _ = load_dataset(DataSpec(image_size=SIZE))
    xs, ys = train.tensors
    model = qat_rep.create_model("qarepvgg_a0", num_classes=10, small_input=True)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):  # short float training (multi-branch form)
        idx = torch.randint(0, len(ys), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # exact BN statistics (cumulative average) instead of the lagging running average
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
                m.reset_running_stats()
        for i in range(0, 512, 128):
            model(xs[i:i + 128])
    model.eval()
    prepare(model, PRESETS[preset]())
    calibrate(model, [(xs[i:i + 64], ys[i:i + 64]) for i in range(0, 256, 64)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    # A few QAT steps (equivalent-kernel fake quant, STE gradients to every branch), BN statistics frozen.
    for i in range(2):
        loss = torch.nn.functional.cross_entropy(model(xs[i * 64:(i + 1) * 64]), ys[i * 64:(i + 1) * 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    vx, vy = val.tensors
    loader = [(vx[i:i + 128], vy[i:i + 128]) for i in range(0, len(vy), 128)]
    with torch.no_grad():
        acc = float((model(vx).argmax(1) == vy).float().mean())
    return {"model": model, "val": loader, "val_x": vx, "val_y": vy, "acc": acc}


def converted_copy(preset: str = "tensorrt") -> torch.nn.Module:
    m = copy.deepcopy(qat_digits(preset)["model"])
    convert(m)
    return m.eval()


def example() -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE)


@pytest.mark.slow
def test_model_is_a_meaningful_reference():
    # Agreement on a collapsed model (one class everywhere) would prove nothing.
    d = qat_digits()
    assert d["acc"] > 0.8
    preds = d["model"](d["val_x"]).argmax(1)
    assert len(preds.unique()) == 10


@pytest.mark.slow
def test_qdq_around_every_quantized_layer_both_layouts(tmp_path):
    model = converted_copy()
    n_layers = len(quant_layers(model))
    for target in ("onnxruntime", "tensorrt"):
        rep = export_onnx(model, tmp_path / f"{target}.onnx", example(), target=target)
        nodes = quantized_node_names(rep.path)
        assert len(nodes) == n_layers == rep.quantized_layers == 23  # 22 blocks + linear
        assert all(v == (True, True) for v in nodes.values()), nodes
        proto = onnx.load(str(rep.path))
        inits = {i.name: i for i in proto.graph.initializer}
        producer = {o: n for n in proto.graph.node for o in n.output}
        for node in proto.graph.node:
            if node.op_type not in ("Conv", "Gemm"):
                continue
            wdq = producer[node.input[1]]
            scale = numpy_helper.to_array(inits[wdq.input[1]])
            out_ch = numpy_helper.to_array(inits[producer[wdq.input[0]].input[0]]).shape[0] \
                if target == "tensorrt" else numpy_helper.to_array(inits[wdq.input[0]]).shape[0]
            assert scale.shape == (out_ch,)  # per output channel ...
            assert next(a.i for a in wdq.attribute if a.name == "axis") == 0  # ... on axis 0
            if target == "onnxruntime":
                assert inits[wdq.input[0]].data_type == TensorProto.INT8  # weights stored as INT8
            xdq = producer[node.input[0]]
            assert numpy_helper.to_array(inits[xdq.input[1]]).size == 1  # activations per tensor
    assert TensorQuantizer.use_fb_fake_quant is False  # the export switch was restored


@pytest.mark.slow
def test_ort_agreement_on_digits_validation(tmp_path):
    d = qat_digits()
    model = converted_copy()
    rep = export_onnx(model, tmp_path / "m.onnx", example())
    result = verify_onnx(rep.path, model, d["val"])
    assert result.samples == 359
    assert result.agreement >= 0.995
    # The fake-quant model adds the bias on the int32 accumulator grid, as ORT's QLinearConv does, so the two
    # compute the same integers except where PyTorch's float conv lands within rounding of a tie and the next
    # quantizer picks the neighbouring integer; that difference then spreads through the later layers
    # (test_onnx_integers_match_layer_by_layer). Measured on two CPUs: 0.02 and 0.58-1.21 output steps on the logits.
    assert result.agreement == 1.0
    assert result.max_diff_steps <= MAX_LOGIT_STEPS
    assert abs(result.ort_accuracy - result.torch_accuracy) <= 0.005
    assert result.torch_accuracy == pytest.approx(float((model(d["val_x"]).argmax(1) == d["val_y"]).float().mean()))
    # The QAT-form model (before convert) is what a callback verifies against at fit end: in evaluation it runs
    # convert's arithmetic, so the file agrees with the trained model within the same bounds.
    qat = verify_onnx(rep.path, d["model"], d["val"])
    assert qat.agreement == 1.0
    assert qat.max_diff_steps == result.max_diff_steps


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tensorrt", "onnxruntime"])
def test_onnx_integers_match_layer_by_layer(tmp_path, preset):
    # The integers of every quantized activation, PyTorch's converted model vs ONNX Runtime's integer kernels: the
    # input quantizer's exactly; after it, a value differs only where a float accumulation sat within rounding of a
    # tie (measured with the TensorRT preset: 1 element of 1.1 M at the first block, then ≤ 2 steps at ≤ 0.1 % of
    # the elements of each later layer); a wrong scale, zero point or layout would move most of them.
    d = qat_digits(preset)
    model = converted_copy(preset)
    rep = export_onnx(model, tmp_path / "m.onnx", example(), target=preset)
    proto = onnx.load(str(rep.path))
    inits = {i.name: i for i in proto.graph.initializer}
    quant_nodes = {n.name: n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    for node in quant_nodes.values():  # the activation integers as extra graph outputs
        proto.graph.output.append(helper.make_tensor_value_info(node.output[0], inits[node.input[2]].data_type, None))
    onnx.save(proto, str(tmp_path / "ints.onnx"))
    sess = ort_session(tmp_path / "ints.onnx", threads=1)
    x = d["val_x"]
    ort_out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x.numpy()})))
    quantizers = {n: q for n, q in model.named_modules()
                  if isinstance(q, TensorQuantizer) and getattr(q, "qat_rep_role", "") == "input"}
    seen: dict[str, torch.Tensor] = {}
    hooks = [q.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.detach()))
             for n, q in quantizers.items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    compared = 0
    for name, q in quantizers.items():
        key = name.replace(".", "/")
        node = [n for k, n in quant_nodes.items() if k.replace(".", "/").startswith(f"/{key}/")]
        assert len(node) == 1, name
        zero_point = int(numpy_helper.to_array(inits[node[0].input[2]]))
        ort_int = torch.from_numpy(ort_out[node[0].output[0]].astype(np.int64)) - zero_point
        scale = float(q.amax) / bounds(q.num_bits, q.unsigned, q.narrow_range)[1]
        torch_int = torch.round(seen[name].double() / scale).to(torch.int64)
        diff = (torch_int - ort_int.reshape(torch_int.shape)).abs()  # (the pool's Q node sits before the Flatten)
        if compared == 0:
            assert int(diff.max()) == 0, name  # the network input: one rounding, no accumulation before it
        assert int(diff.max()) <= 2, name
        assert int(diff.count_nonzero()) <= 0.005 * diff.numel(), name
        compared += 1
    assert compared >= 23  # the stem's input, every block, the classifier


def _reference_run(path, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime with every graph optimization off: the graph's own arithmetic, no integer kernels."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.slow
def test_onnxruntime_layout_runs_integer_convs_and_is_exact_rewrite(tmp_path):
    from qat_rep.export.onnx_export import _int32_biases

    model = converted_copy()
    ours = export_onnx(model, tmp_path / "ort.onnx", example(), target="onnxruntime").path
    trt = export_onnx(model, tmp_path / "trt.onnx", example(), target="tensorrt").path
    ops = ort_op_counts(ours, threads=1)
    assert ops.get("QLinearConv", 0) >= 21  # every block conv but at most the first runs as an integer kernel
    assert ops.get("QGemm", 0) == 1  # the classifier too: its bias is an INT32 DequantizeLinear
    assert "QLinearConv" not in ort_op_counts(trt, threads=1)
    # Reference (unoptimized) execution: the ORT layout computes exactly what the TensorRT layout computes once its
    # float biases are put on the int32 grid s_x·s_w (TensorRT adds a float bias; ORT and the fake-quant model an
    # int32 one), so the weight folding and the ReLU rewrite are exact.
    trt_int32 = onnx.load(str(trt))
    assert _int32_biases(trt_int32.graph) == 23
    onnx.save(trt_int32, str(tmp_path / "trt_int32.onnx"))
    x = qat_digits()["val_x"][:32].numpy()
    np.testing.assert_allclose(_reference_run(ours, x), _reference_run(tmp_path / "trt_int32.onnx", x), rtol=0,
                               atol=1e-5)


@pytest.mark.slow
def test_int32_biases_are_the_fake_quant_models_integers(tmp_path):
    from qat_rep.quant.backend import int32_bias

    model = converted_copy()
    path = export_onnx(model, tmp_path / "ort.onnx", example(), target="onnxruntime").path
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    biases = [n.input[2] for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(biases) == 23 and all(b in dq for b in biases)
    with torch.no_grad():
        model(torch.from_numpy(qat_digits()["val_x"][:2].numpy()))  # dynamic weight quantizers store their amax
        expected = [int32_bias(layer.bias, layer._input_quantizer, layer._weight_quantizer)
                    for _, layer in quant_layers(model)]
    for b, ref in zip(biases, expected):
        node = dq[b]
        assert inits[node.input[0]].dtype == np.int32
        value = inits[node.input[0]].astype(np.float64) * inits[node.input[1]].astype(np.float64)
        np.testing.assert_allclose(value, ref.double().numpy(), rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_onnxruntime_preset_is_integer_from_conv_to_conv_and_exact(tmp_path):
    d = qat_digits("onnxruntime")
    model = converted_copy("onnxruntime")
    unsigned = {n: q.unsigned for n, q in model.named_modules() if isinstance(q, TensorQuantizer)
                and getattr(q, "qat_rep_role", "") == "input"}
    assert len(unsigned) == 24  # 22 blocks, the global pool, the classifier
    stem_nonneg = bool((d["val_x"] >= 0).all())
    assert unsigned.pop("stage0.rbr_reparam._input_quantizer") is stem_nonneg  # the image: signed if normalized
    assert all(unsigned.values())  # every ReLU output: UINT8
    rep = export_onnx(model, tmp_path / "ort.onnx", example())
    graph = onnx.load(str(rep.path)).graph
    assert "Relu" not in Counter(n.op_type for n in graph.node)  # folded into the UINT8 quantizers
    inits = {i.name: i for i in graph.initializer}
    zps = [inits[n.input[2]].data_type for n in graph.node if n.op_type == "QuantizeLinear"]
    assert zps.count(TensorProto.UINT8) == 23
    ops = ort_op_counts(rep.path, threads=1)
    assert ops.get("QLinearConv") == 22 and ops.get("QGemm") == 1  # every conv and the classifier in integers
    assert ops.get("QLinearGlobalAveragePool") == 1  # the pool too (its quantizer moved before the Flatten)
    assert not {"Conv", "FusedConv", "Relu", "Gemm", "GlobalAveragePool"} & set(ops)
    result = verify_onnx(rep.path, model, d["val"])
    assert result.agreement == 1.0 and result.max_diff_steps <= MAX_LOGIT_STEPS
    assert result.torch_accuracy > 0.8
    with pytest.raises(ValueError, match="UINT8.*target='onnxruntime'"):
        export_onnx(model, tmp_path / "trt.onnx", example(), target="tensorrt")
    assert not (tmp_path / "trt.onnx").exists()


@pytest.mark.slow
def test_fp32_export_matches_fused_float_model(tmp_path):
    torch.manual_seed(1)
    model = qat_rep.create_model("qarepvgg_a0", num_classes=10, small_input=True).eval()
    x = torch.randn(4, 3, 16, 16)
    rep = export_onnx(model, tmp_path / "fp32.onnx", x[:1], quantized=False)
    ops = Counter(n.op_type for n in onnx.load(str(rep.path)).graph.node)
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops and ops["Conv"] == 22
    out = ort_session(rep.path).run(None, {"input": x.numpy()})[0]  # dynamic batch: 4 rows through a 1-row export
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    assert not any(b.fused for _, b in find_rep_blocks(model))  # the caller's model is untouched
    # The FP32 export of a quantized model disables its quantizers in a copy.
    rep = export_onnx(converted_copy(), tmp_path / "fp32q.onnx", example(), quantized=False)
    assert "QuantizeLinear" not in Counter(n.op_type for n in onnx.load(str(rep.path)).graph.node)


@pytest.mark.slow
def test_efficientrep_concat_and_multi_output(tmp_path):
    torch.manual_seed(2)
    model = qat_rep.create_model("efficientrep_n", small_input=True, block="qarepvgg").eval()
    prepare(model, QuantConfig())
    calibrate(model, [torch.randn(2, 3, 32, 32) for _ in range(2)])
    rep = export_onnx(model, tmp_path / "er.onnx", torch.randn(1, 3, 32, 32))
    proto = onnx.load(str(rep.path))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["Concat"] == 1 and ops["Add"] == 0  # fused rep blocks: no residual Add; SimSPPF's Concat
    assert shared_scale_violations(proto) == [] and rep.shared_scale_violations == ()
    concat = next(n for n in proto.graph.node if n.op_type == "Concat")
    users = [n for n in proto.graph.node if concat.output[0] in n.input]
    assert [u.op_type for u in users] == ["QuantizeLinear"]  # one quantizer (one scale) for the whole concat
    assert all(v == (True, True) for v in quantized_node_names(proto).values())
    result = verify_onnx(rep.path, model, [torch.randn(2, 3, 32, 32)])
    assert result.agreement is None and result.samples == 2


def _concat_graph(scale_a: float, scale_b: float) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(s, dtype=np.float32), f"s{i}") for i, s in enumerate((scale_a, scale_b))]
    inits.append(numpy_helper.from_array(np.array(0, dtype=np.int8), "zp"))
    nodes = []
    for i, name in enumerate(("a", "b")):
        nodes.append(helper.make_node("QuantizeLinear", [name, f"s{i}", "zp"], [f"{name}q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}q", f"s{i}", "zp"], [f"{name}dq"]))
    nodes.append(helper.make_node("Concat", ["adq", "bdq"], ["y"], axis=1, name="cat"))
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2]) for n in ("a", "b")]
    graph = helper.make_graph(nodes, "g", vi, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_shared_scale_check_can_fail():
    assert shared_scale_violations(_concat_graph(0.1, 0.2)) == ["cat"]
    assert shared_scale_violations(_concat_graph(0.1, 0.1)) == []


@pytest.mark.slow
def test_export_before_calibration_is_refused(tmp_path):
    model = qat_rep.create_model("qarepvgg_a0", num_classes=10, small_input=True).eval()
    prepare(model, QuantConfig())
    with pytest.raises(ValueError, match="before calibration"):
        export_onnx(model, tmp_path / "m.onnx", example())
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ValueError, match="no quantized layers"):
        export_onnx(qat_rep.create_model("qarepvgg_a0", num_classes=10), tmp_path / "m.onnx", example())


@pytest.mark.slow
def test_export_below_8_bits_is_refused_before_tracing(tmp_path):
    # opset-13 QuantizeLinear holds int8/uint8: a 4-bit model must not be traced into a file of another network
    # (torch's exporter fails deep in tracing with "ONNX allows only (0, 127), (0, 255) and (-128, 127)")
    model = qat_rep.create_model("qarepvgg_a0", num_classes=10, small_input=True).eval()
    prepare(model, QuantConfig(w_bits=4, a_bits=6))
    calibrate(model, [torch.randn(4, 3, SIZE, SIZE)])
    with pytest.raises(ValueError, match=r"quantizer\(s\) with 4/6 bits .* carry 8-bit integers only"):
        export_onnx(model, tmp_path / "m.onnx", example())
    assert list(tmp_path.iterdir()) == []
    export_onnx(model, tmp_path / "fp32.onnx", example(), quantized=False)  # the float export still works


@pytest.mark.slow
def test_bad_example_input_and_options(tmp_path):
    model = converted_copy()
    with pytest.raises(ValueError, match="4-D"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(3, SIZE, SIZE))
    with pytest.raises(ValueError, match="1 channels .* expects 3"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 1, SIZE, SIZE))
    with pytest.raises(TypeError, match="float tensor"):
        export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 3, SIZE, SIZE, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        export_onnx(model, tmp_path / "m.onnx", np.zeros((1, 3, SIZE, SIZE), np.float32))
    with pytest.raises(ValueError, match="unknown target 'tflite'"):
        export_onnx(model, tmp_path / "m.onnx", example(), target="tflite")
    with pytest.raises(ValueError, match="opset must be an integer >= 13"):
        export_onnx(model, tmp_path / "m.onnx", example(), opset=11)
    with pytest.raises(ValueError, match="output_names has 2"):
        export_onnx(model, tmp_path / "m.onnx", example(), output_names=("a", "b"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_unwritable_destination(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(ArtifactWriteError, match="cannot be created|not a directory"):
        export_onnx(converted_copy(), blocker / "m.onnx", example())
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(ArtifactWriteError, match="a directory of that name exists"):
        export_onnx(converted_copy(), tmp_path / "d.onnx", example())


@pytest.mark.slow
def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    model = converted_copy()
    real_export = torch.onnx.export

    def crash(mod, args, f, **kw):
        real_export(mod, args, f, **kw)  # a complete file under the temporary name ...
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise KeyboardInterrupt  # ... then the process is interrupted

    monkeypatch.setattr(torch.onnx, "export", crash)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(model, tmp_path / "m.onnx", example())
    assert list(tmp_path.iterdir()) == []
    assert TensorQuantizer.use_fb_fake_quant is False
    monkeypatch.setattr(torch.onnx, "export", real_export)
    # An existing good file survives a failed re-export untouched.
    export_onnx(model, tmp_path / "m.onnx", example())
    before = (tmp_path / "m.onnx").read_bytes()
    monkeypatch.setattr(torch.onnx, "export", crash)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(model, tmp_path / "m.onnx", example())
    assert (tmp_path / "m.onnx").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.slow
def test_verify_errors(tmp_path):
    model = converted_copy()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        verify_onnx(tmp_path / "missing.onnx", model, qat_digits()["val"])
    rep = export_onnx(model, tmp_path / "m.onnx", example())
    with pytest.raises(ValueError, match="no batches"):
        verify_onnx(rep.path, model, [])
    with pytest.raises(TypeError, match="loader must yield"):
        verify_onnx(rep.path, model, ["not a tensor"])
    with pytest.raises(ValueError, match="max_batches"):
        verify_onnx(rep.path, model, qat_digits()["val"], max_batches=0)


@pytest.mark.slow
def test_ort_latency_interleaved(tmp_path):
    model = converted_copy()
    files = {"fp32": export_onnx(model, tmp_path / "a.onnx", example(), quantized=False).path,
             "int8": export_onnx(model, tmp_path / "b.onnx", example()).path}
    res = ort_latency(files, (3, SIZE, SIZE), batch_sizes=(1, 2), threads=1, warmup=1, repeats=3)
    assert [(r.label, r.batch) for r in res] == [("fp32", 1), ("int8", 1), ("fp32", 2), ("int8", 2)]
    assert all(r.median_ms > 0 and r.p10_ms <= r.median_ms <= r.p90_ms for r in res)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        ort_latency(files, (1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="files is empty"):
        ort_latency({}, (3, SIZE, SIZE))
