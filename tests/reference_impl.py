"""An independent, functional implementation of the RepVGG / QARepVGG equations over official state-dict keys.

It shares no code with ``qat_rep``: structure comes from the paper's tables (written out here again), weights are
read by their official key names, and each block is computed branch by branch with ``F.conv2d``/``F.batch_norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WIDTH_BASE = (64, 128, 256, 512)
SPECS = {  # name: (depths, width multipliers, groups on layers 2, 4, ..., 26)
    "a0": ((2, 4, 14, 1), (0.75, 0.75, 0.75, 2.5), 1),
    "b1g2": ((4, 6, 16, 1), (2, 2, 2, 4), 2),
}


def layout(variant: str, small_input: bool = True):
    """Yield (prefix, cin, cout, stride, groups) for every block, in order."""
    depths, mults, g = SPECS[variant]
    cin = min(64, int(64 * mults[0]))
    yield "stage0", 3, cin, 1 if small_input else 2, 1
    layer = 1
    for s, (depth, m, base) in enumerate(zip(depths, mults, WIDTH_BASE), start=1):
        cout = int(base * m)
        for i in range(depth):
            groups = g if (layer % 2 == 0 and 2 <= layer <= 26) else 1
            yield f"stage{s}.{i}", cin, cout, 2 if i == 0 else 1, groups
            cin = cout
            layer += 1


def _bn_keys(p, n, gen):
    return {
        f"{p}.weight": torch.randn(n, generator=gen), f"{p}.bias": torch.randn(n, generator=gen) * 0.3,
        f"{p}.running_mean": torch.randn(n, generator=gen) * 0.3,
        f"{p}.running_var": 0.2 + torch.rand(n, generator=gen),
        f"{p}.num_batches_tracked": torch.tensor(7),
    }


def random_state_dict(variant: str, block: str, deploy: bool, num_classes: int, seed: int = 0) -> dict:
    """Random weights under the official key names (RepVGG repo / YOLOv6)."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    cout = 0
    for p, cin, cout, stride, groups in layout(variant):
        fan = (cin // groups) * 9
        if deploy:
            sd[f"{p}.rbr_reparam.weight"] = torch.randn(cout, cin // groups, 3, 3, generator=gen) / fan**0.5
            sd[f"{p}.rbr_reparam.bias"] = torch.randn(cout, generator=gen) * 0.1
            if block == "qarepvgg":
                sd.update(_bn_keys(f"{p}.bn", cout, gen))
            continue
        sd[f"{p}.rbr_dense.conv.weight"] = torch.randn(cout, cin // groups, 3, 3, generator=gen) / fan**0.5
        sd.update(_bn_keys(f"{p}.rbr_dense.bn", cout, gen))
        if block == "repvgg":
            sd[f"{p}.rbr_1x1.conv.weight"] = torch.randn(cout, cin // groups, 1, 1, generator=gen) / (cin // groups) ** 0.5
            sd.update(_bn_keys(f"{p}.rbr_1x1.bn", cout, gen))
            if cin == cout and stride == 1:
                sd.update(_bn_keys(f"{p}.rbr_identity", cin, gen))
        else:
            sd[f"{p}.rbr_1x1.weight"] = torch.randn(cout, cin // groups, 1, 1, generator=gen) / (cin // groups) ** 0.5
            sd.update(_bn_keys(f"{p}.bn", cout, gen))
    sd["linear.weight"] = torch.randn(num_classes, cout, generator=gen) / cout**0.5
    sd["linear.bias"] = torch.randn(num_classes, generator=gen) * 0.1
    return sd


def _bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        training=False, eps=1e-5)


@torch.no_grad()
def forward(sd: dict, variant: str, block: str, x: torch.Tensor) -> torch.Tensor:
    """The network's logits, computed from the paper's equations."""
    for p, cin, cout, stride, groups in layout(variant):
        if f"{p}.rbr_reparam.weight" in sd:
            y = F.conv2d(x, sd[f"{p}.rbr_reparam.weight"], sd[f"{p}.rbr_reparam.bias"], stride, 1, 1, groups)
        else:
            y = _bn(F.conv2d(x, sd[f"{p}.rbr_dense.conv.weight"], None, stride, 1, 1, groups), sd, f"{p}.rbr_dense.bn")
            if block == "repvgg":
                y = y + _bn(F.conv2d(x, sd[f"{p}.rbr_1x1.conv.weight"], None, stride, 0, 1, groups), sd, f"{p}.rbr_1x1.bn")
                if cin == cout and stride == 1:
                    y = y + _bn(x, sd, f"{p}.rbr_identity")
            else:
                y = y + F.conv2d(x, sd[f"{p}.rbr_1x1.weight"], None, stride, 0, 1, groups)
                if cin == cout and stride == 1:
                    y = y + x
        if block == "qarepvgg" and f"{p}.bn.weight" in sd:
            y = _bn(y, sd, f"{p}.bn")
        x = F.relu(y)
    x = x.mean(dim=(2, 3))
    return F.linear(x, sd["linear.weight"], sd["linear.bias"])
