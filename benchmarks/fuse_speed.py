"""Multi-branch vs fused FP32 latency in PyTorch: repvgg_a0 and qarepvgg_a0, 224×224, batch 1 and 16.

Ratios (fused / multi-branch) come from the same run, interleaved, so machine load affects both sides alike.
Run: ``python benchmarks/fuse_speed.py [--threads 2] [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import copy

import torch

import qat_rep
from common import markdown_table, median_time, write_results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per configuration (median reported)")
    p.add_argument("--size", type=int, default=224, help="input resolution (default 224)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, records = [], []
    for name in ("repvgg_a0", "qarepvgg_a0"):
        model = qat_rep.create_model(name).eval()
        fused = copy.deepcopy(model)
        qat_rep.reparameterize(fused)
        for batch in (1, 16):
            x = torch.randn(batch, 3, args.size, args.size)
            reps = max(3, args.repeats // (4 if batch > 1 else 1))
            with torch.inference_mode():
                t_multi = median_time(lambda: model(x), repeats=reps)
                t_fused = median_time(lambda: fused(x), repeats=reps)
            ratio = t_fused / t_multi
            records.append(dict(model=name, batch=batch, multi_branch_ms=t_multi * 1e3, fused_ms=t_fused * 1e3,
                                ratio=ratio))
            rows.append([name, batch, f"{t_multi * 1e3:.1f}", f"{t_fused * 1e3:.1f}", f"{ratio:.2f}"])
    table = markdown_table(["model", "batch", "multi-branch ms", "fused ms", "fused / multi-branch"], rows)
    print(table)
    write_results("fuse_speed", {"threads": args.threads, "size": args.size, "results": records}, table)
    return {"results": records}


if __name__ == "__main__":
    main()
