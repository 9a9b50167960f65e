"""Peak memory of the op: inputs + outputs + O(L·N·r²), never a copy of the client factors.

CPU: the process's high-water mark (RSS) in a fresh subprocess; CUDA: the caching allocator's peak.
"""
import json
import subprocess
import sys
import textwrap

import torch

# Llama-3-8B q,k,v,o at 1/4 width, 8 blocks; (in, out) per layer.
N, R, BLOCKS, HIDDEN, KV = 100, 16, 8, 1024, 256
SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN)] * BLOCKS

CPU_SCRIPT = textwrap.dedent(
    f"""
    import json, resource, sys
    import torch, fedrot_ext
    g = torch.Generator().manual_seed(0)
    N, r, shapes = {N}, {R}, {SHAPES!r}
    A = [torch.randn(N, r, d_in, generator=g) for d_in, _ in shapes]
    B = [torch.randn(N, d_out, r, generator=g) for _, d_out in shapes]
    ref_A = [torch.randn(r, d_in, generator=g) for d_in, _ in shapes]
    ref_B = [torch.randn(d_out, r, generator=g) for _, d_out in shapes]
    fedrot_ext.align_and_aggregate([a[:1] for a in A], [b[:1] for b in B], ref_A=ref_A, ref_B=ref_B, align="AB")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # high-water mark so far
    out = fedrot_ext.align_and_aggregate(A, B, ref_A=ref_A, ref_B=ref_B, align="AB", lam=0.5)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    inputs = sum(t.numel() * t.element_size() for t in A + B)
    outputs = sum(t.numel() * t.element_size() for t in out.A + out.B)
    print(json.dumps(dict(inputs=inputs, outputs=outputs, extra=peak - base)))
    """
)


def measure_cpu():
    result = subprocess.run([sys.executable, "-c", CPU_SCRIPT], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_cuda():
    import fedrot_ext

    g = torch.Generator("cuda").manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g, device="cuda")  # noqa: E731
    A = [randn(N, R, d_in) for d_in, _ in SHAPES]
    B = [randn(N, d_out, R) for _, d_out in SHAPES]
    ref_A = [randn(R, d_in) for d_in, _ in SHAPES]
    ref_B = [randn(d_out, R) for _, d_out in SHAPES]
    fedrot_ext.align_and_aggregate([a[:1] for a in A], [b[:1] for b in B], ref_A=ref_A, ref_B=ref_B, align="AB")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fedrot_ext.align_and_aggregate(A, B, ref_A=ref_A, ref_B=ref_B, align="AB", lam=0.5)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    inputs = sum(t.numel() * t.element_size() for t in A + B)
    outputs = sum(t.numel() * t.element_size() for t in out.A + out.B)
    return dict(inputs=inputs, outputs=outputs, extra=peak - base)


def test_peak_memory_is_outputs_plus_small_workspace(device):
    m = measure_cpu() if device == "cpu" else measure_cuda()
    small = len(SHAPES) * N * R * R * 4 * 3  # rotations + coefficients + covariance, float32
    # The high-water mark may rise by at most outputs + O(L·N·r²) + allocator slack: far below
    # a single copy of the client factors (which is what a stack/cat/upcast would cost).
    budget = m["outputs"] + small + 16 * 2**20
    assert m["extra"] <= budget, m
    assert budget < m["inputs"] / 8, m
    print(m)
