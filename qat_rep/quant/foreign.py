"""Re-parameterizable blocks that are not this package's: quantized through their fused form.

A block from another code base that only follows the public convention — a ``switch_to_deploy()`` (RepVGG,
YOLOv6) or ``reparameterize()`` (timm, MobileOne) method — exposes no equivalent kernel to fake-quantize during
training. Quantizing its branch convs one by one would train a network that differs from the deployed one (the
branches are summed before any quantizer in the fused conv), so :func:`fuse_foreign_blocks` fuses such blocks
before quantizers are inserted: they train as one conv, exactly the conv that is exported. Blocks of this package
(:class:`qat_rep.blocks.RepBlock`, equivalent-kernel QAT) and modules that contain one are left alone.
"""

from __future__ import annotations

from torch import nn

from ..blocks import RepBlock
from ..reparam import reparameterize

__all__ = ["foreign_blocks", "fuse_foreign_blocks"]

_METHODS = ("switch_to_deploy", "reparameterize")


def foreign_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost submodules of ``model`` (not ``model`` itself) with a public fuse method and no ``RepBlock``."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(f"{n}.") for n, _ in found) or isinstance(m, RepBlock):
            continue
        if any(callable(getattr(m, meth, None)) for meth in _METHODS) and \
                not any(isinstance(sub, RepBlock) for sub in m.modules()):
            found.append((name, m))
    return found


def fuse_foreign_blocks(model: nn.Module) -> list[str]:
    """Fuse every :func:`foreign_blocks` block in place (its own method); returns their names."""
    names = []
    for name, block in foreign_blocks(model):
        reparameterize(block, fold_post_bn=True)
        names.append(name)
    return names
