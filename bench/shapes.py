"""Benchmark configurations, realistic inputs, and the byte / FLOP counts of one call.

A config is (model, N clients, rank r, dtype). Models list their LoRA layers as
(out_features, in_features), so A[l] is (N, r, in) and B[l] is (N, out, r).

Inputs imitate one FedRot-LoRA round: a reference (the previous global
factors) and N clients that are each a randomly rotated, noisy copy of it
(A_i = Q_i Ā + noise, B_i = B̄ Q_iᵀ + noise, Q_i Haar-random in SO(r)), so the
alignment has real work to do and nothing is zero. Seeded: same config and
seed give the same tensors.
"""
from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class Model:
    name: str
    layers: Tuple[Tuple[int, int], ...]  # (out_features, in_features) per LoRA layer
    period: int  # the layer pattern repeats every `period` layers (for extrapolating the loop baseline)


def _repeat(block: Sequence[Tuple[int, int]], times: int) -> Tuple[Tuple[int, int], ...]:
    return tuple(block) * times


MODELS: Dict[str, Model] = {
    # RoBERTa-large, LoRA on query and value: 24 blocks x (q, v), 1024 -> 1024.
    "roberta-large-qv": Model("roberta-large-qv", _repeat([(1024, 1024), (1024, 1024)], 24), 2),
    # Llama-3-8B, LoRA on q, k, v, o: 32 blocks; k and v project 4096 -> 1024 (GQA).
    "llama3-8b-qkvo": Model(
        "llama3-8b-qkvo", _repeat([(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096)], 32), 4
    ),
    # Llama-3-8B, LoRA on all seven projections (q, k, v, o, gate, up, down): the end-to-end benchmark.
    "llama3-8b-all": Model(
        "llama3-8b-all",
        _repeat([(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)], 32),
        7,
    ),
    # Tiny model for the smoke benchmark and tests; not part of the sweep.
    "tiny": Model("tiny", _repeat([(256, 256), (128, 256)], 2), 2),
}

SWEEP_MODELS = ("roberta-large-qv", "llama3-8b-qkvo")
SWEEP_CLIENTS = (3, 10, 50, 100)
SWEEP_RANKS = (4, 8, 16, 64)
SWEEP_DTYPES = ("fp32", "bf16")

# A short list for --quick and the default pytest-benchmark run; the headline rows first.
QUICK = (
    "roberta-large-qv_N10_r4_fp32",
    "roberta-large-qv_N10_r16_fp32",
    "roberta-large-qv_N10_r16_bf16",
    "llama3-8b-qkvo_N3_r8_fp32",
)
SMOKE = ("tiny_N3_r4_fp32",)


@dataclass(frozen=True)
class Config:
    model: str
    N: int
    r: int
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.model}_N{self.N}_r{self.r}_{self.dtype}"

    @property
    def layers(self) -> Tuple[Tuple[int, int], ...]:
        return MODELS[self.model].layers

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()


def parse(config_id: str) -> Config:
    """Inverse of Config.id: 'roberta-large-qv_N10_r4_fp32'."""
    model, n, r, dtype = config_id.rsplit("_", 3)
    if model not in MODELS or not n.startswith("N") or not r.startswith("r") or dtype not in DTYPES:
        raise ValueError(f"config: expected MODEL_N<clients>_r<rank>_<dtype>, got {config_id!r}")
    return Config(model, int(n[1:]), int(r[1:]), dtype)


def sweep() -> List[Config]:
    """Every config of the benchmark grid: 2 models x 4 client counts x 4 ranks x 2 dtypes."""
    return [Config(m, n, r, d) for m, d, n, r in itertools.product(SWEEP_MODELS, SWEEP_DTYPES, SWEEP_CLIENTS, SWEEP_RANKS)]


def select(configs: Iterable[Config], patterns: Optional[str]) -> List[Config]:
    """Keep configs whose id matches any comma-separated glob (e.g. 'roberta*_N10_*,*_r64_*')."""
    configs = list(configs)
    if not patterns:
        return configs
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [c for c in configs if any(fnmatch.fnmatchcase(c.id, p) for p in pats)]


# ----------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------

def input_bytes(cfg: Config) -> int:
    """Memory held by one input set: all client factors plus both references."""
    per_client = sum(cfg.r * i + o * cfg.r for o, i in cfg.layers)
    return (cfg.N + 1) * per_client * cfg.itemsize


def bytes_moved(cfg: Config, align: str = "A") -> int:
    """Fewest bytes one call must move: every client factor read once, the
    reference(s) that drive the alignment read once, both outputs written once."""
    s, r, N = cfg.itemsize, cfg.r, cfg.N
    total = 0
    for o, i in cfg.layers:
        total += N * (r * i + o * r)  # client factors
        total += (r * i if align in ("A", "AB") else 0) + (o * r if align in ("B", "AB") else 0)  # refs
        total += r * i + o * r  # outputs
    return total * s


SVD_FLOPS_PER_R3 = 22  # rough cost of a square SVD with both factors (Golub & Van Loan)


def flops(cfg: Config, align: str = "A", lam: float = 0.5) -> int:
    """Useful arithmetic of one call (FMA = 2 flops): per client and layer the
    cross-covariance M (2 r^2 d over the aligned factor(s)), rotating and
    weight-summing both factors (2 r^2 (in + out); w_i folds into R_i), and
    ~22 r^3 per SVD (one, two for 0 < λ < 1, none for align='none' or λ = 0)."""
    r, N = cfg.r, cfg.N
    n_svd = 0 if align == "none" or lam == 0 else (1 if lam == 1 else 2)
    total = 0
    for o, i in cfg.layers:
        d = (i if align in ("A", "AB") else 0) + (o if align in ("B", "AB") else 0)
        total += N * (2 * r * r * d + 2 * r * r * (i + o) + n_svd * SVD_FLOPS_PER_R3 * r**3)
    return total


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------

class Inputs(NamedTuple):
    A: List[torch.Tensor]
    B: List[torch.Tensor]
    ref_A: List[torch.Tensor]
    ref_B: List[torch.Tensor]
    weights: torch.Tensor  # (N,) sample counts, normalised inside the ops

    def kwargs(self) -> dict:
        return {"ref_A": self.ref_A, "ref_B": self.ref_B, "weights": self.weights}


def _haar_so(n_mats: int, r: int, gen: torch.Generator, device) -> torch.Tensor:
    """n_mats Haar-random rotations in SO(r)."""
    Q, Rf = torch.linalg.qr(torch.randn(n_mats, r, r, generator=gen, device=device))
    Q = Q * torch.sign(torch.diagonal(Rf, dim1=-2, dim2=-1)).unsqueeze(-2)
    flip = torch.where(torch.linalg.det(Q) < 0, -1.0, 1.0)
    Q[:, :, 0] *= flip[:, None]
    return Q


def rotated_clients(ref_a: torch.Tensor, ref_b: torch.Tensor, Q: torch.Tensor, gen: torch.Generator,
                    noise_a: float, noise_b: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Clients A_i = Q_i Ā + noise_a·ε (N, r, in) and B_i = B̄ Q_iᵀ + noise_b·ε (N, out, r), ε standard normal."""
    a = torch.matmul(Q, ref_a)
    a += torch.randn(a.shape, generator=gen, device=a.device, dtype=a.dtype) * noise_a
    b = torch.matmul(ref_b, Q.transpose(1, 2))
    b += torch.randn(b.shape, generator=gen, device=b.device, dtype=b.dtype) * noise_b
    return a, b


def make_inputs(cfg: Config, device="cpu", seed: int = 0, noise: float = 0.2) -> Inputs:
    """Clients = randomly rotated noisy copies of a random reference, in cfg's dtype."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    dt, r, N = cfg.torch_dtype, cfg.r, cfg.N
    A, B, ref_A, ref_B = [], [], [], []
    for o, i in cfg.layers:
        ra = torch.randn(r, i, generator=gen, device=device) / i**0.5  # kaiming-like A
        rb = torch.randn(o, r, generator=gen, device=device) * (0.02 / r**0.5)  # B after some rounds
        a, b = rotated_clients(ra, rb, _haar_so(N, r, gen, device), gen, noise / i**0.5, noise * 0.02 / r**0.5)
        A.append(a.to(dt))
        B.append(b.to(dt))
        ref_A.append(ra.to(dt))
        ref_B.append(rb.to(dt))
        del a, b
    weights = torch.randint(500, 5000, (N,), generator=gen, device=device).to(torch.float64).cpu()
    return Inputs(A, B, ref_A, ref_B, weights)


def copies(inputs: Inputs, k: int) -> List[Inputs]:
    """k input sets with the same values in different memory, to rotate through
    when one set fits in the last-level cache (k = 1 returns the set itself)."""
    sets = [inputs]
    for _ in range(k - 1):
        sets.append(
            Inputs(
                [t.clone() for t in inputs.A],
                [t.clone() for t in inputs.B],
                [t.clone() for t in inputs.ref_A],
                [t.clone() for t in inputs.ref_B],
                inputs.weights,
            )
        )
    return sets
