"""Registry models: fused == train form, official keys load strictly, checkpoint forms are converted or refused."""

import copy

import pytest
import reference_impl as ref
import torch
from helpers import randomize_bn

import qat_rep
from qat_rep import check_equivalence, create_model, list_models, load_state_dict_any_form, reparameterize
from qat_rep.blocks import QARepVGGBlock, QARepVGGBlockV2, RepVGGBlock

CLASSIFIERS = list_models("*repvgg_*")
BACKBONES = list_models("efficientrep_*")


def test_registry_names():
    variants = ["a0", "a1", "a2", "b0", "b1", "b1g2", "b1g4", "b2", "b2g4", "b3"]
    assert set(CLASSIFIERS) == {f"{b}_{v}" for b in ("repvgg", "qarepvgg") for v in variants}
    assert BACKBONES == ["efficientrep_m", "efficientrep_n", "efficientrep_s"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_classifier_fuses_exactly(name):
    # float64: with randomized BN statistics the deep variants reach outputs of ~1e5, where float32 summation order
    # alone moves the relative error around 1e-5; in float64 any fusion error stands far above rounding
    torch.manual_seed(0)
    model = randomize_bn(create_model(name, num_classes=10)).double().eval()
    fused = copy.deepcopy(model)
    report = reparameterize(fused)
    depth = 1 + sum(model.cfg.depths)
    assert len(report) == depth and not report.already_fused
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    res = check_equivalence(model, fused, x)
    assert res.rel_error <= 1e-10, res
    assert len(reparameterize(fused)) == 0  # fusing twice is a no-op
    assert torch.equal(fused(x), fused(x))


@pytest.mark.slow
def test_group_layers_and_widths():
    m = create_model("repvgg_b1g4", num_classes=10)
    groups = [m.stage0.groups] + [b.groups for s in (m.stage1, m.stage2, m.stage3, m.stage4) for b in s]
    assert groups == [1 if (i % 2 or i == 0 or i > 26) else 4 for i in range(len(groups))]
    a0 = create_model("repvgg_a0", num_classes=7)
    assert [a0.stage0.out_channels] + [s[-1].out_channels for s in (a0.stage1, a0.stage2, a0.stage3, a0.stage4)] == \
        [48, 48, 96, 192, 1280]
    assert a0.linear.out_features == 7 and a0.stage0.stride == 2
    assert create_model("repvgg_a0", small_input=True).stage0.stride == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("block", ["repvgg", "qarepvgg", "qarepvggv2"])
def test_efficientrep_fuses_exactly(name, block):
    torch.manual_seed(0)
    model = randomize_bn(create_model(name, block=block)).eval()
    fused = copy.deepcopy(model)
    assert len(reparameterize(fused)) > 0
    x = torch.randn(1, 3, 64, 64)
    feats = model(x)
    assert [f.shape[1] for f in feats] == list(model.out_channels)
    assert [f.shape[-1] for f in feats] == [8, 4, 2]
    res = check_equivalence(model, fused, x)
    assert res.rel_error <= 1e-5, res


def test_efficientrep_yolov6_names():
    keys = create_model("efficientrep_n", block="qarepvgg").state_dict()
    for k in ["stem.rbr_dense.conv.weight", "ERBlock_2.0.rbr_1x1.weight", "ERBlock_2.1.conv1.bn.running_mean",
              "ERBlock_3.1.block.0.rbr_dense.bn.weight", "ERBlock_5.2.cv1.conv.weight", "ERBlock_5.2.cv2.bn.bias"]:
        assert k in keys, k
    ch = create_model("efficientrep_s").out_channels
    assert ch == (128, 256, 512)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["a0", "b1g2"])
@pytest.mark.parametrize("block", ["repvgg", "qarepvgg"])
@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
def test_official_keys_load_strictly_and_match_reference(variant, block, deploy):
    sd = ref.random_state_dict(variant, block, deploy, num_classes=10, seed=1)
    model = create_model(f"{block}_{variant}", num_classes=10, small_input=True, deploy=deploy).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = ref.forward(sd, variant, block, x)
    got = model(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("block", ["repvgg", "qarepvgg"])
def test_train_checkpoint_into_fused_model_is_converted(block):
    sd = ref.random_state_dict("a0", block, deploy=False, num_classes=10, seed=3)
    x = torch.randn(2, 3, 32, 32)
    expected = ref.forward(sd, "a0", block, x)
    for fold in (False, True):
        model = create_model(f"{block}_a0", num_classes=10, small_input=True).eval()
        reparameterize(model, fold_post_bn=fold)
        with pytest.raises(RuntimeError):
            model.load_state_dict(sd, strict=True)
        load_state_dict_any_form(model, sd)
        assert (model(x) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_fused_checkpoint_into_train_model_is_refused():
    sd = ref.random_state_dict("a0", "repvgg", deploy=True, num_classes=10)
    model = create_model("repvgg_a0", num_classes=10, small_input=True)
    with pytest.raises(ValueError, match="fused .deploy. form but the model is in train form.*reparameterize"):
        load_state_dict_any_form(model, sd)


@pytest.mark.slow
def test_post_bn_checkpoint_into_folded_model():
    sd = ref.random_state_dict("a0", "qarepvgg", deploy=True, num_classes=10, seed=4)
    x = torch.randn(2, 3, 32, 32)
    expected = ref.forward(sd, "a0", "qarepvgg", x)
    model = create_model("qarepvgg_a0", num_classes=10, small_input=True, deploy=True, post_bn=False).eval()
    load_state_dict_any_form(model, sd)
    assert (model(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
    keep = create_model("qarepvgg_a0", num_classes=10, small_input=True).eval()
    reparameterize(keep, fold_post_bn=False)
    with pytest.raises(ValueError, match="post-BN folded but the model keeps it"):
        load_state_dict_any_form(keep, model.state_dict())


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'repvgg_a9'\. Did you mean .*Valid names: .*qarepvgg_a0"):
        create_model("repvgg_a9")


def test_reparameterize_foreign_conventions():
    class Foreign(torch.nn.Module):  # a YOLOv6/RepVGG-style block from another code base
        def __init__(self):
            super().__init__()
            self.calls = 0
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

        def switch_to_deploy(self):
            self.calls += 1

    class TimmStyle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def reparameterize(self):
            self.calls += 1

    net = torch.nn.Sequential(RepVGGBlock(2, 2), Foreign(), TimmStyle(), QARepVGGBlock(2, 2), QARepVGGBlockV2(2, 2))
    report = reparameterize(net)
    assert [(b.name, b.action) for b in report.fused] == [
        ("0", "fused"), ("1", "switch_to_deploy()"), ("2", "reparameterize()"), ("3", "fused+post-bn"),
        ("4", "fused+post-bn")]
    assert net[1].calls == 1 and net[2].calls == 1
    assert "re-parameterized 5 block(s)" in str(report)


@pytest.mark.slow
def test_check_equivalence_detects_difference():
    a = create_model("repvgg_a0", num_classes=3, small_input=True)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.linear.bias.add_(1.0)
    assert not check_equivalence(a, b, torch.randn(1, 3, 16, 16))
    assert a.training  # modes are restored


def test_public_api():
    for name in qat_rep.__all__:
        assert hasattr(qat_rep, name), name
