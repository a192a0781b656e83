"""Find and fuse re-parameterizable blocks in any model; check equivalence; load either checkpoint form.

:func:`reparameterize` understands this package's blocks and the two public conventions for foreign ones:
``switch_to_deploy()`` (RepVGG, YOLOv6) and ``reparameterize()`` (timm, MobileOne).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .blocks import RepBlock


@dataclass(frozen=True)
class FusedBlock:
    name: str
    kind: str
    action: str  # "fused", "fused+post-bn", "post-bn", "switch_to_deploy()", "reparameterize()"


@dataclass
class ReparamReport:
    """What :func:`reparameterize` did, block by block."""

    fused: list[FusedBlock] = field(default_factory=list)
    already_fused: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.fused)

    def __str__(self) -> str:
        lines = [f"re-parameterized {len(self.fused)} block(s); {len(self.already_fused)} already fused"]
        lines += [f"  {b.name or '<root>'}: {b.kind} ({b.action})" for b in self.fused]
        return "\n".join(lines)


def find_rep_blocks(model: nn.Module) -> list[tuple[str, RepBlock]]:
    """This package's rep blocks in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RepBlock)]


def reparameterize(model: nn.Module, fold_post_bn: bool = True) -> ReparamReport:
    """Fuse, in place, every re-parameterizable block of ``model``; calling it twice is a no-op.

    ``fold_post_bn=True`` also folds QARepVGG's post-sum BN into the fused conv (the deployable form);
    ``False`` keeps it, as YOLOv6's ``switch_to_deploy`` does for QAT.
    """
    report = ReparamReport()
    skip_prefixes: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, RepBlock):
            was_fused = module.fused
            module.switch_to_deploy()
            folded = module.fold_post_bn() if fold_post_bn else False
            if was_fused and not folded:
                report.already_fused.append(name)
            else:
                action = "post-bn" if was_fused else ("fused+post-bn" if folded else "fused")
                report.fused.append(FusedBlock(name, type(module).__name__, action))
            skip_prefixes.append(name + "." if name else "")
        elif module is model and _has_nested(model):
            continue  # a whole model with its own method: fuse its blocks one by one instead
        else:
            for method in ("switch_to_deploy", "reparameterize"):
                fn = getattr(module, method, None)
                if callable(fn):
                    fn()
                    report.fused.append(FusedBlock(name, type(module).__name__, f"{method}()"))
                    skip_prefixes.append(name + "." if name else "")
                    break
    return report


def _has_nested(model: nn.Module) -> bool:
    return any(
        m is not model and (isinstance(m, RepBlock) or callable(getattr(m, "switch_to_deploy", None))
                            or callable(getattr(m, "reparameterize", None)))
        for m in model.modules()
    )


@dataclass(frozen=True)
class EquivalenceResult:
    max_abs_diff: float
    max_abs_ref: float
    rel_error: float  # max |Δ| / max |reference|
    ok: bool

    def __bool__(self) -> bool:
        return self.ok


def flatten_outputs(out: Any) -> list[Tensor]:
    """The tensors of a model output (a tensor, or mappings and sequences of them), in order."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flatten_outputs(v)]
    raise TypeError(f"cannot compare model outputs of type {type(out).__name__}")


@torch.no_grad()
def check_equivalence(reference: nn.Module, candidate: nn.Module, *inputs: Any, rtol: float = 1e-5,
                      **kwargs: Any) -> EquivalenceResult:
    """Run both models in eval mode on the same inputs; relative error is ``max|Δ| / max|reference output|``.

    Both models are put in eval mode and restored to their previous mode afterwards.
    """
    modes = (reference.training, candidate.training)
    reference.eval()
    candidate.eval()
    try:
        ref = flatten_outputs(reference(*inputs, **kwargs))
        got = flatten_outputs(candidate(*inputs, **kwargs))
    finally:
        reference.train(modes[0])
        candidate.train(modes[1])
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got)):
        raise ValueError("the two models return outputs of different structure or shape")
    diff = max(float((a.double() - b.double()).abs().max()) for a, b in zip(ref, got))
    scale = max(float(a.double().abs().max()) for a in ref)
    rel = diff / scale if scale > 0 else diff
    return EquivalenceResult(diff, scale, rel, rel <= rtol)


_FUSED_KEY = re.compile(r"^(?:(.*)\.)?rbr_reparam\.weight$")


def convert_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Convert ``state_dict`` to the form (train or deploy, post-BN kept or folded) of ``model``'s rep blocks.

    A train-form checkpoint for a fused model is fused block by block; a fused checkpoint for a train-form model
    cannot be split back into branches and is refused with a clear error (fuse the model first:
    ``qat_rep.reparameterize(model, fold_post_bn=...)``).
    """
    out = dict(state_dict)
    for name, block in find_rep_blocks(model):
        prefix = f"{name}." if name else ""
        ckpt_fused = f"{prefix}rbr_reparam.weight" in state_dict
        ckpt_post_bn = f"{prefix}bn.weight" in state_dict
        model_post_bn = getattr(block, "bn", None) is not None
        if block.fused and not ckpt_fused:
            tmp = block.train_form()
            sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            tmp.load_state_dict(sub, strict=True)
            tmp.eval()
            tmp.switch_to_deploy()
            if not model_post_bn:
                tmp.fold_post_bn()
            for k in sub:
                out.pop(prefix + k)
            out.update({prefix + k: v for k, v in tmp.state_dict().items()})
        elif not block.fused and ckpt_fused:
            raise ValueError(
                f"checkpoint holds block {name!r} in fused (deploy) form but the model is in train form; a fused "
                "kernel cannot be split back into branches. Fuse the model first: "
                "qat_rep.reparameterize(model, fold_post_bn=False), then load."
            )
        elif block.fused and ckpt_fused and ckpt_post_bn and not model_post_bn:
            tmp = copy.deepcopy(block)
            tmp.bn = nn.BatchNorm2d(block.out_channels)
            sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            tmp.load_state_dict(sub, strict=True)
            tmp.fold_post_bn()
            for k in sub:
                out.pop(prefix + k)
            out.update({prefix + k: v for k, v in tmp.state_dict().items()})
        elif block.fused and ckpt_fused and model_post_bn and not ckpt_post_bn:
            raise ValueError(
                f"checkpoint holds block {name!r} with its post-BN folded but the model keeps it; load into a model "
                "fused with qat_rep.reparameterize(model, fold_post_bn=True)"
            )
    return out


def load_state_dict_any_form(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True):
    """``model.load_state_dict`` after :func:`convert_state_dict`: loads train-form weights into a fused model."""
    return model.load_state_dict(convert_state_dict(model, state_dict), strict=strict)
