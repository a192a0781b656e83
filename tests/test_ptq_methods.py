"""PTQ methods as config objects: validation when built, the string form, a method of one's own."""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch

from helpers import calib_batches, tiny_rep_net
from qat_rep.ptq import (AdaRoundConfig, BRECQConfig, CFWSConfig, EntropyConfig, MinMaxConfig, MRECGConfig, MSEConfig,
                         PercentileConfig, PTQMethodConfig, quantize_ptq, register_ptq_method)
from qat_rep.ptq.api import METHODS, PTQContext
from qat_rep.ptq.reconstruct import ReconConfig
from qat_rep.quant import QuantConfig, backend

pytestmark = pytest.mark.usefixtures("one_thread")

BUILTIN = (MinMaxConfig, PercentileConfig, EntropyConfig, MSEConfig, CFWSConfig, AdaRoundConfig, BRECQConfig,
           MRECGConfig)


@dataclass(frozen=True)
class HalfMaxConfig(PTQMethodConfig):
    """A method of one's own: every activation threshold at ``fraction`` of the maximum."""

    name: ClassVar[str] = "halfmax"
    fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")


@register_ptq_method(HalfMaxConfig)
def _halfmax(ctx: PTQContext, method: HalfMaxConfig) -> None:
    ctx.calibrate_activations("max")
    for sim in ctx.sims.values():
        sim.set_act_amax(float(sim.act_amax) * method.fraction)


def test_a_user_registered_method_runs_through_quantize_ptq() -> None:
    _, ref = quantize_ptq(tiny_rep_net(), calib_batches(), QuantConfig(), MinMaxConfig())
    q, rep = quantize_ptq(tiny_rep_net(), calib_batches(), QuantConfig(), HalfMaxConfig(fraction=0.5))
    assert rep.method == "halfmax" and rep.options == {"fraction": 0.5}
    assert set(rep.layers.values()) == {"conv", "linear"}
    for name, amax in rep.act_amax.items():
        assert amax == pytest.approx(0.5 * ref.act_amax[name], rel=1e-6)
        mod = q.get_submodule(name)
        assert isinstance(mod, (backend.QuantConv2d, backend.QuantLinear))
        assert float(mod._input_quantizer.amax) == pytest.approx(amax, rel=1e-6)
    # the registered name is the method's string form, options as keywords, validated by the config
    _, by_name = quantize_ptq(tiny_rep_net(), calib_batches(), QuantConfig(), method="halfmax", fraction=0.25)
    assert by_name.act_amax == pytest.approx({n: 0.25 * a for n, a in ref.act_amax.items()}, rel=1e-6)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        quantize_ptq(tiny_rep_net(), calib_batches(), method="halfmax", fraction=2.0)
    with pytest.raises(TypeError, match=r"method 'halfmax' got unknown option\(s\) \['k'\]; valid: fraction"):
        quantize_ptq(tiny_rep_net(), calib_batches(), method="halfmax", k=2)


def _same_result(a: tuple[torch.nn.Module, Any], b: tuple[torch.nn.Module, Any]) -> None:
    (qa, ra), (qb, rb) = a, b
    sa, sb = qa.state_dict(), qb.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    da, db = ra.to_dict(), rb.to_dict()
    for d in (da, db):
        d.pop("seconds")
        for u in d["units"]:
            u.pop("seconds")
    assert json.dumps(da, sort_keys=True) == json.dumps(db, sort_keys=True)  # NaN (not measured) equals NaN


@pytest.mark.slow
@pytest.mark.parametrize("config, name, options", [
    (MSEConfig(), "mse", {}),
    (CFWSConfig(improved_kl=False), "cfws", {"improved_kl": False}),
    (AdaRoundConfig(iters=4, batch_size=16, num_samples=32, weight_init="max"), "adaround",
     {"iters": 4, "batch_size": 16, "num_samples": 32, "weight_init": "max"}),
])
def test_the_string_form_builds_the_same_config(config: PTQMethodConfig, name: str, options: dict) -> None:
    cfg = QuantConfig(w_bits=4, a_bits=4)
    _same_result(quantize_ptq(tiny_rep_net(), calib_batches(), cfg, config),
                 quantize_ptq(tiny_rep_net(), calib_batches(), cfg, method=name, **options))


def test_builtin_names_and_defaults() -> None:
    assert tuple(c.name for c in BUILTIN) == METHODS
    assert inspect.signature(quantize_ptq).parameters["method"].default == MinMaxConfig()
    for cls in BUILTIN:
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    # reconstruction configs are ReconConfigs with their method's settings beside
    assert isinstance(AdaRoundConfig(), ReconConfig) and AdaRoundConfig(iters=200).effective_lr == pytest.approx(0.1)
    assert AdaRoundConfig().to_dict()["weight_init"] == "mse"


@pytest.mark.parametrize("build, error, match", [
    (lambda: CFWSConfig(split="yes"), TypeError, "split must be True or False"),
    (lambda: AdaRoundConfig(iters=0), ValueError, "iters must be a positive integer"),
    (lambda: AdaRoundConfig(num_samples=0), ValueError, "num_samples must be a positive integer"),
    (lambda: AdaRoundConfig(weight_init="lsq"), ValueError, "weight_init must be 'max' or 'mse'"),
    (lambda: BRECQConfig(act_calibrator="kl"), ValueError, "unknown calibration method 'kl'"),
    (lambda: BRECQConfig(blocks="stage1"), TypeError, "blocks must be a list of module names"),
    (lambda: MRECGConfig(k=-1), ValueError, "k .* must be a non-negative integer"),
    (lambda: MRECGConfig(capacity="x"), ValueError, "capacity must be 'data_free' or 'data_dependent'"),
    (lambda: MRECGConfig(stride_penalty=0), ValueError, "stride_penalty must be a positive number"),
    (lambda: MRECGConfig(qdrop=0.0), ValueError, r"qdrop must be in \(0, 1\]"),
])
def test_configs_validate_when_built(build: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build()


def test_configs_are_frozen_and_hashable() -> None:
    cfg = BRECQConfig(blocks=["0", "1"], iters=10)
    assert cfg.blocks == ("0", "1") and hash(cfg) == hash(BRECQConfig(blocks=("0", "1"), iters=10))
    assert MRECGConfig(beta=[10, 2]).beta == (10.0, 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.iters = 5  # type: ignore[misc]


def test_registration_and_dispatch_refuse_what_they_cannot_run() -> None:
    @dataclass(frozen=True)
    class Clash(PTQMethodConfig):
        name: ClassVar[str] = "minmax"

    @dataclass(frozen=True)
    class Unregistered(MinMaxConfig):
        name: ClassVar[str] = "unregistered"

    with pytest.raises(TypeError, match="takes PTQMethodConfig dataclasses"):
        register_ptq_method(QuantConfig)
    with pytest.raises(ValueError, match="name must be a non-empty name no other PTQ method has"):
        register_ptq_method(Clash)
    with pytest.raises(TypeError, match="no PTQ handler is registered for Unregistered"):
        quantize_ptq(tiny_rep_net(), calib_batches(), QuantConfig(), Unregistered())
    with pytest.raises(TypeError, match=r"options \['k'\] given beside a MRECGConfig"):
        quantize_ptq(tiny_rep_net(), calib_batches(), QuantConfig(), MRECGConfig(), k=2)
    with pytest.raises(ValueError, match="unknown PTQ method 3"):
        quantize_ptq(tiny_rep_net(), calib_batches(), QuantConfig(), 3)  # type: ignore[arg-type]


def test_quantize_ptq_is_a_short_pipeline() -> None:
    # the methods live in their handlers (qat_rep.ptq.methods); the entry point only sets up and finishes
    assert len(inspect.getsource(quantize_ptq).splitlines()) <= 40


def test_one_vocabulary_max_with_the_literature_alias_and_did_you_mean_errors() -> None:
    from qat_rep.ptq.methods import method_config

    assert MinMaxConfig.name == "max" and method_config("minmax", {}) == method_config("max", {}) == MinMaxConfig()
    with pytest.raises(ValueError, match=r"unknown PTQ method 'maxx' \(did you mean 'max'\?\)"):
        method_config("maxx", {})
    with pytest.raises(ValueError, match=r"did you mean 'entropy'\?"):
        QuantConfig(calibrator="entropi")
    with pytest.raises(ValueError, match=r"one of max, percentile, entropy, mse; got 'zzz'$"):
        QuantConfig(calibrator="zzz")  # nothing close: no suggestion, the valid names
