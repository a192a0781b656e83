"""Structurally re-parameterizable blocks: RepVGG, QARepVGG and QARepVGG-V2.

Each block exists in two forms with the official state-dict keys:

* train form — parallel branches (``rbr_dense``, ``rbr_1x1``, ``rbr_identity``, and for V2 a parameter-free 3×3
  average pool); QARep blocks add a post-sum BatchNorm ``bn``;
* deploy form — one 3×3 conv ``rbr_reparam`` (QARep blocks keep ``bn`` until it is folded, as YOLOv6 does for QAT).

The fused state lives in one attribute (``rbr_reparam is not None``), ``switch_to_deploy()`` is idempotent and
:meth:`RepBlock.equivalent_kernel_bias` is a pure, differentiable function of the branch parameters, which is the
hook quantization-aware training builds on (the fake-quantized equivalent kernel runs as one conv).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fuse import add_centre, avgpool_kernel, fuse_bn_module, identity_centre


class ConvBN(nn.Sequential):
    """Conv (no bias) followed by BatchNorm; keys ``conv.weight`` and ``bn.*`` as in the official repositories."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, groups: int):
        super().__init__()
        self.add_module(
            "conv",
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
        )
        self.add_module("bn", nn.BatchNorm2d(out_channels))


class SEBlock(nn.Module):
    """Squeeze-and-excitation as in the RepVGG repository (``down``/``up`` 1×1 convs with bias)."""

    def __init__(self, channels: int, internal: int):
        super().__init__()
        self.down = nn.Conv2d(channels, internal, 1, bias=True)
        self.up = nn.Conv2d(internal, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.up(F.relu(self.down(s))))
        return x * s


class RepBlock(nn.Module):
    """Base of every re-parameterizable block in this package.

    Subclasses implement :meth:`branches` (the multi-branch sum), :meth:`_branch_kernel_bias` (its equivalent
    kernel) and may override :meth:`post_bn` (a BatchNorm after the sum; none by default). What follows the sum is
    ``post(y) = activation(post_bn(y))``. ``rep_quant`` is an optional submodule installed by :mod:`qat_rep.quant`;
    when set (and the block is not fused) the block runs ``activation(rep_quant(self, x))`` — one conv of the
    fake-quantized equivalent kernel instead of the branches; ``rep_quant`` applies :meth:`post_bn` itself, or folds
    it into that conv (evaluation: the deployed arithmetic).
    """

    has_post_bn: bool = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        use_se: bool = False,
    ):
        super().__init__()
        if kernel_size != 3 or padding != 1:
            raise ValueError(
                f"{type(self).__name__} is defined for a 3x3 kernel with padding 1 (got kernel_size={kernel_size}, "
                f"padding={padding}); use kernel_size=3, padding=1"
            )
        if dilation != 1 or padding_mode != "zeros":
            raise ValueError(
                f"{type(self).__name__} supports dilation=1 and padding_mode='zeros' only "
                f"(got dilation={dilation}, padding_mode={padding_mode!r})"
            )
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.groups = groups
        self.use_se = use_se
        self.init_args: dict[str, Any] = dict(
            in_channels=in_channels, out_channels=out_channels, stride=stride, groups=groups, use_se=use_se
        )
        self.nonlinearity = nn.ReLU()
        self.se = SEBlock(out_channels, max(1, out_channels // 16)) if use_se else nn.Identity()
        self.rbr_reparam: nn.Conv2d | None = None
        self.rep_quant: nn.Module | None = None
        if deploy:
            self.rbr_reparam = self._make_reparam_conv()

    # ----------------------------------------------------------------------------------------------- structure
    @property
    def fused(self) -> bool:
        """True once the block runs as a single conv (``rbr_reparam``)."""
        return self.rbr_reparam is not None

    @property
    def has_identity(self) -> bool:
        return self.in_channels == self.out_channels and self.stride == 1

    def _make_reparam_conv(self) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels, self.out_channels, 3, self.stride, 1, groups=self.groups, bias=True
        )

    def extra_repr(self) -> str:
        form = "fused" if self.fused else ("qat" if self.rep_quant is not None else "multi-branch")
        return (
            f"{self.in_channels}->{self.out_channels}, stride={self.stride}, groups={self.groups}, "
            f"se={self.use_se}, form={form}"
        )

    # ----------------------------------------------------------------------------------------------- forward
    def conv(self, x: Tensor, kernel: Tensor, bias: Tensor | None) -> Tensor:
        """Run ``x`` through a 3×3 conv with this block's stride, padding and groups."""
        return F.conv2d(x, kernel, bias, self.stride, 1, 1, self.groups)

    def branches(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def post_bn(self, y: Tensor) -> Tensor:
        """The BatchNorm after the branch sum (QARep blocks); the identity for blocks without one."""
        return y

    def activation(self, y: Tensor) -> Tensor:
        """What follows the (post-BN) sum: SE, then ReLU."""
        return self.nonlinearity(self.se(y))

    def post(self, y: Tensor) -> Tensor:
        """Everything after the branch sum (or the fused conv): ``activation(post_bn(y))``."""
        return self.activation(self.post_bn(y))

    def forward(self, x: Tensor) -> Tensor:
        if self.rbr_reparam is not None:
            return self.post(self.rbr_reparam(x))
        if self.rep_quant is not None:
            return self.activation(self.rep_quant(self, x))
        return self.post(self.branches(x))

    # ----------------------------------------------------------------------------------------------- fusion
    def _branch_kernel_bias(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The 3×3 kernel and bias of one conv equal to the branch sum (eval-mode BN statistics).

        Differentiable with respect to every branch parameter. For QARep blocks the post-sum BN is *not* included:
        it stays a real BN through QAT and is folded by :meth:`fold_post_bn`.
        """
        if self.rbr_reparam is not None:
            bias = self.rbr_reparam.bias
            if bias is None:
                bias = torch.zeros(self.out_channels, dtype=self.rbr_reparam.weight.dtype,
                                   device=self.rbr_reparam.weight.device)
            return self.rbr_reparam.weight, bias
        return self._branch_kernel_bias()

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """Official RepVGG/YOLOv6 name of :meth:`equivalent_kernel_bias`."""
        return self.equivalent_kernel_bias()

    def _drop_branches(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Replace the branches by one conv ``rbr_reparam``, in place. A second call is a no-op.

        QARep blocks keep their post-sum ``bn`` (YOLOv6's behaviour, needed for QAT); call :meth:`fold_post_bn`
        (or :func:`qat_rep.reparameterize` with ``fold_post_bn=True``) to fold it as well.
        """
        if self.rbr_reparam is not None:
            return
        kernel, bias = self._branch_kernel_bias()
        conv = self._make_reparam_conv().to(device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel.detach())
        conv.bias.copy_(bias.detach())
        self._drop_branches()
        self.rbr_reparam = conv

    def reparameterize(self) -> None:
        """timm/MobileOne name of :meth:`switch_to_deploy`."""
        self.switch_to_deploy()

    # ----------------------------------------------------------------------------------------------- collapse
    @torch.no_grad()
    def collapse_to_dense_(self) -> list[nn.Parameter]:
        """Collapse the branches into the dense branch's own parameters, in place; returns the rewritten parameters.

        Progressive re-parameterization *during training*: unlike :meth:`switch_to_deploy`, no module or parameter
        is created or removed (an optimizer and a DDP wrapper built before stay valid). The equivalent kernel is
        written into ``rbr_dense.conv.weight`` (minus the parameter-free branches' constant kernel), its bias into
        ``rbr_dense.bn.bias``; the dense BN becomes the identity map (``mean 0``, ``var + eps == 1``, ``γ = 1``) and
        every other parametric branch contributes exactly zero. Afterwards :meth:`collapsed_kernel_bias` — the dense
        weight and bias, read directly — equals :meth:`equivalent_kernel_bias` bit for bit, and a trainer updates
        one conv per block. The caller resets the optimizer state of the returned parameters (their values changed
        meaning). Refused on a fused block.
        """
        if self.rbr_reparam is not None:
            raise ValueError(f"{type(self).__name__} is already fused (rbr_reparam); there are no branches to collapse")
        kernel, bias = self._branch_kernel_bias()
        const = self._constant_kernel(kernel)
        if const is not None:
            kernel = kernel - const
        dense = self.rbr_dense
        dense.conv.weight.copy_(kernel)
        _make_identity_bn_(dense.bn, bias)
        self._zero_other_branches_()
        return [p for n, p in self.named_parameters() if n.startswith("rbr_")]

    def collapsed_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The equivalent kernel and bias of a block collapsed by :meth:`collapse_to_dense_`, read from the dense
        branch (plus the constant kernel of parameter-free branches) — one conv's worth of parameters."""
        return self.rbr_dense.conv.weight, self.rbr_dense.bn.bias

    def _constant_kernel(self, like: Tensor) -> Tensor | None:
        """The kernel of the parameter-free branches (QARep identity, V2 average pool), or ``None``."""
        return None

    def _zero_other_branches_(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def fold_post_bn(self) -> bool:
        """Fold the post-sum BN into ``rbr_reparam`` (fusing first if needed). Returns whether anything changed."""
        return False

    def train_form(self) -> "RepBlock":
        """A new, unfused block of the same type and configuration (fresh parameters)."""
        return type(self)(**self.init_args)


class RepVGGBlock(RepBlock):
    """RepVGG block (Ding et al., CVPR 2021): ``relu(se(bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x)))``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, groups: int = 1, padding_mode: str = "zeros",
                 deploy: bool = False, use_se: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                         deploy, use_se)
        if deploy:
            self.rbr_identity = self.rbr_dense = self.rbr_1x1 = None
            return
        self.rbr_identity = nn.BatchNorm2d(in_channels) if self.has_identity else None
        self.rbr_dense = ConvBN(in_channels, out_channels, 3, stride, 1, groups)
        self.rbr_1x1 = ConvBN(in_channels, out_channels, 1, stride, 0, groups)

    def branches(self, x: Tensor) -> Tensor:
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            y = y + self.rbr_identity(x)
        return y

    def _branch_kernel_bias(self) -> tuple[Tensor, Tensor]:
        # the 1×1 and identity branches only touch the centre tap: sum them there, then add once into the fresh
        # 3×3 fold (add_centre) — this runs at every QAT step
        kernel, b3 = fuse_bn_module(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        centre, b1 = fuse_bn_module(self.rbr_1x1.conv.weight, self.rbr_1x1.bn)
        bias = b3 + b1
        if self.rbr_identity is not None:
            eye = identity_centre(self.in_channels, self.groups, dtype=kernel.dtype, device=kernel.device)
            kid, bid = fuse_bn_module(eye[:, :, None, None], self.rbr_identity)
            centre, bias = centre + kid, bias + bid
        return add_centre(kernel, centre), bias

    def _drop_branches(self) -> None:
        self.rbr_dense = self.rbr_1x1 = self.rbr_identity = None

    def _zero_other_branches_(self) -> None:
        self.rbr_1x1.conv.weight.zero_()
        for bn in (self.rbr_1x1.bn, self.rbr_identity):
            if bn is not None:
                bn.weight.zero_()
                bn.bias.zero_()


class QARepVGGBlock(RepBlock):
    """QARepVGG block, the paper's final design (Chu et al., AAAI 2024), with YOLOv6's key names.

    ``relu(se(bn(bn3(conv3x3(x)) + conv1x1(x) + x)))``: BN only on the 3×3 branch, a plain 1×1 conv, an identity
    without BN, and a BatchNorm ``bn`` after the sum. (YOLOv6 has no SE here; ours, when enabled, follows the post-BN
    so that the post-BN can still be folded into the conv.)
    """

    has_post_bn = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, groups: int = 1, padding_mode: str = "zeros",
                 deploy: bool = False, use_se: bool = False, post_bn: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                         deploy, use_se)
        self.bn = nn.BatchNorm2d(out_channels) if (post_bn or not deploy) else None
        if deploy:
            self.rbr_identity = self.rbr_dense = self.rbr_1x1 = None
            return
        self.rbr_dense = ConvBN(in_channels, out_channels, 3, stride, 1, groups)
        self.rbr_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, 0, groups=groups, bias=False)
        self.rbr_identity = nn.Identity() if self.has_identity else None

    def branches(self, x: Tensor) -> Tensor:
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            y = y + x
        return y

    def post_bn(self, y: Tensor) -> Tensor:
        return y if self.bn is None else self.bn(y)

    def _branch_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernel, bias = fuse_bn_module(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        centre = self.rbr_1x1.weight
        if self.rbr_identity is not None:
            centre = centre + identity_centre(self.in_channels, self.groups, dtype=kernel.dtype,
                                              device=kernel.device)[:, :, None, None]
        return add_centre(kernel, centre), bias

    def _drop_branches(self) -> None:
        self.rbr_dense = self.rbr_1x1 = self.rbr_identity = None

    def _constant_kernel(self, like: Tensor) -> Tensor | None:
        if self.rbr_identity is None:
            return None
        eye = identity_centre(self.in_channels, self.groups, dtype=like.dtype, device=like.device)
        return add_centre(torch.zeros_like(like), eye)

    def _zero_other_branches_(self) -> None:
        self.rbr_1x1.weight.zero_()

    def collapsed_kernel_bias(self) -> tuple[Tensor, Tensor]:
        # the same float operations as _branch_kernel_bias on a collapsed block (W·1, + (0 + I) on the centre)
        kernel, bias = self.rbr_dense.conv.weight, self.rbr_dense.bn.bias
        if self.rbr_identity is not None:
            eye = identity_centre(self.in_channels, self.groups, dtype=kernel.dtype, device=kernel.device)
            kernel = add_centre(kernel.clone(), eye)
        return kernel, bias

    @torch.no_grad()
    def fold_post_bn(self) -> bool:
        if self.bn is None:
            return False
        self.switch_to_deploy()
        kernel, bias = fuse_bn_module(self.rbr_reparam.weight, self.bn, self.rbr_reparam.bias)
        self.rbr_reparam.weight.copy_(kernel)
        self.rbr_reparam.bias.copy_(bias)
        self.bn = None
        return True


class QARepVGGBlockV2(QARepVGGBlock):
    """YOLOv6's ``QARepVGGBlockV2``: :class:`QARepVGGBlock` plus a 3×3 average-pool branch (identity-shaped blocks).

    ``AvgPool2d(3, 1, 1)`` counts the zero padding, so it is exactly a conv with 1/9 on the group diagonal.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.rbr_dense is not None and self.has_identity:
            self.rbr_avg: nn.Module | None = nn.AvgPool2d(3, stride=1, padding=1)
        else:
            self.rbr_avg = None

    def branches(self, x: Tensor) -> Tensor:
        y = super().branches(x)
        if self.rbr_avg is not None:
            y = y + self.rbr_avg(x)
        return y

    def _branch_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernel, bias = super()._branch_kernel_bias()
        if self.rbr_avg is not None:
            kernel = kernel + avgpool_kernel(self.in_channels, self.groups, dtype=kernel.dtype, device=kernel.device)
        return kernel, bias

    def _drop_branches(self) -> None:
        super()._drop_branches()
        self.rbr_avg = None

    def _constant_kernel(self, like: Tensor) -> Tensor | None:
        const = super()._constant_kernel(like)
        if self.rbr_avg is not None:
            const = const + avgpool_kernel(self.in_channels, self.groups, dtype=like.dtype, device=like.device)
        return const

    def collapsed_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernel, bias = super().collapsed_kernel_bias()
        if self.rbr_avg is not None:
            kernel = kernel + avgpool_kernel(self.in_channels, self.groups, dtype=kernel.dtype, device=kernel.device)
        return kernel, bias


def _make_identity_bn_(bn: nn.BatchNorm2d, bias: Tensor) -> None:
    """Turn an eval-mode BN into ``y = x + bias`` exactly: ``mean 0``, ``γ 1``, ``β = bias`` and a running variance
    with ``var + eps == 1`` in the BN's dtype (so the fold ``γ / sqrt(var + eps)`` is exactly 1)."""
    one = torch.ones((), dtype=bn.running_var.dtype, device=bn.running_var.device)
    var = one - bn.eps
    for _ in range(8):  # at most a few ulps away
        total = var + bn.eps
        if total == one:
            break
        var = torch.nextafter(var, var + (one - total))
    else:  # pragma: no cover - eps so small that 1 - eps rounds to 1 and 1 + eps too
        raise ValueError(f"no running variance v with v + eps == 1 for eps={bn.eps}")
    bn.running_mean.zero_()
    bn.running_var.fill_(float(var))
    bn.weight.fill_(1.0)
    bn.bias.copy_(bias)


BLOCK_TYPES: dict[str, Callable[..., RepBlock]] = {
    "repvgg": RepVGGBlock,
    "qarepvgg": QARepVGGBlock,
    "qarepvggv2": QARepVGGBlockV2,
}


def get_block_type(name: str | type[RepBlock]) -> Callable[..., RepBlock]:
    """Resolve a block type by name (``repvgg``, ``qarepvgg``, ``qarepvggv2``) or pass a class through."""
    if isinstance(name, type) and issubclass(name, RepBlock):
        return name
    try:
        return BLOCK_TYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown block type {name!r}; valid: {', '.join(BLOCK_TYPES)}") from None
