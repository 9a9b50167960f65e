"""Small CUDA workload for compute-sanitizer (memcheck, racecheck): every align
mode, λ path, rank bucket and dtype of the fused op once, checked against the
float64 reference so a wrong result also fails.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/sanitize_op.py
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import fedrot_ext
from fedrot_ext import reference

TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float64: 1e-9}


def main(device: str = "cuda") -> int:
    if device == "cuda" and not torch.cuda.is_available():
        print("sanitize_op: no CUDA device", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    # Odd sizes on purpose: tails of every chunk / vector width; ranks across buckets; r > 64 hits the fallback.
    layers = [(37, 61, 3), (64, 64, 4), (130, 33, 8), (96, 200, 16), (50, 70, 31), (129, 65, 64), (40, 48, 65)]
    N = 5
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for align, lam in (("A", 0.5), ("B", 1.0), ("AB", 0.5), ("none", 0.5), ("A", 0.0)):
            A = [torch.randn(N, r, i, generator=g).to(dtype) for o, i, r in layers]
            B = [torch.randn(N, o, r, generator=g).to(dtype) for o, i, r in layers]
            rA = [torch.randn(r, i, generator=g).to(dtype) for o, i, r in layers]
            rB = [torch.randn(o, r, generator=g).to(dtype) for o, i, r in layers]
            w = torch.rand(N, generator=g, dtype=torch.float64) + 0.1
            kw = dict(weights=w, align=align, lam=lam, return_rotations=True)
            out = fedrot_ext.align_and_aggregate(
                [t.to(device) for t in A], [t.to(device) for t in B],
                ref_A=[t.to(device) for t in rA], ref_B=[t.to(device) for t in rB], **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            ref = reference.align_and_aggregate(A, B, ref_A=rA, ref_B=rB, **kw)
            for got, want in zip(out.A + out.B, ref.A + ref.B):
                err = float((got.cpu().double() - want).norm() / want.norm())
                worst = max(worst, err / TOL[dtype])
                if not err < TOL[dtype]:
                    print(f"sanitize_op: {dtype} align={align} lam={lam}: rel err {err:.2e} > {TOL[dtype]:.0e}")
                    return 1
    print(f"sanitize_op: ok (worst error {worst:.2f} of tolerance)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))  # optional argument: the device (default cuda; cpu to try it here)
