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
from bench.accuracy import expected, rel_err
from bench.shapes import rotated_clients

TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float64: 1e-9}


def _problem(layers, N, dtype, g):
    """Clients = reference rotated by moderate random rotations (angles well below π, where the
    soft step polar((1-λ) I + λ R*) is discontinuous and any two correct codes may differ) + noise."""
    A, B, rA, rB = [], [], [], []
    for o, i, r in layers:
        ra, rb = torch.randn(r, i, generator=g, dtype=torch.float64), torch.randn(o, r, generator=g, dtype=torch.float64)
        S = torch.randn(N, r, r, generator=g, dtype=torch.float64) * (0.3 / r**0.5)
        a, b = rotated_clients(ra, rb, torch.linalg.matrix_exp(S - S.transpose(1, 2)), g, 0.1, 0.1)
        A.append(a.to(dtype))
        B.append(b.to(dtype))
        rA.append(ra.to(dtype))
        rB.append(rb.to(dtype))
    return A, B, rA, rB


def main(device: str = "cuda") -> int:
    if device == "cuda" and not torch.cuda.is_available():
        print("sanitize_op: no CUDA device", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    # Odd sizes on purpose: tails of every chunk / vector width; ranks across buckets; r > 64 hits the fallback.
    # out, in >= r: M = A_i Āᵀ (or B_iᵀ B̄) has full rank r, else its polar factor is not unique.
    layers = [(37, 61, 3), (64, 64, 4), (130, 33, 8), (96, 200, 16), (50, 70, 31), (129, 65, 64), (67, 81, 65)]
    N = 5
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for align, lam in (("A", 0.5), ("B", 1.0), ("AB", 0.5), ("none", 0.5), ("A", 0.0)):
            A, B, rA, rB = _problem(layers, N, dtype, g)
            w = torch.rand(N, generator=g, dtype=torch.float64) + 0.1
            kw = dict(weights=w, align=align, lam=lam, return_rotations=True)
            out = fedrot_ext.align_and_aggregate(
                [t.to(device) for t in A], [t.to(device) for t in B],
                ref_A=[t.to(device) for t in rA], ref_B=[t.to(device) for t in rB], **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            err = rel_err(out, expected(A, B, ref_A=rA, ref_B=rB, **kw))
            worst = max(worst, err / TOL[dtype])
            if not err < TOL[dtype]:
                print(f"sanitize_op: {dtype} align={align} lam={lam}: rel err {err:.2e} > {TOL[dtype]:.0e}")
                return 1
    print(f"sanitize_op: ok (worst error {worst:.2f} of tolerance)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))  # optional argument: the device (default cuda; cpu to try it here)
