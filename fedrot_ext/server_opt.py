"""Server optimizers after aggregation (FedOpt, Reddi et al., ICLR 2021): FedAvgM, FedAdam, FedYogi, FedAdagrad.

The pseudo-gradient of a round is Δ = aggregated − reference, per floating tensor of the adapter;
the optimizer turns it into the step applied to the reference. Formulas (as Flower's strategies):

- ``avgm``:    m ← μ m + Δ (m = Δ in the first step);            x ← x + η m
- ``adam``:    m ← β₁ m + (1−β₁) Δ;  v ← β₂ v + (1−β₂) Δ²;          x ← x + η_t m / (√v + τ),
               η_t = η √(1−β₂ᵗ) / (1−β₁ᵗ) (bias correction, t = number of steps so far)
- ``yogi``:    m as adam;  v ← v − (1−β₂) Δ² sign(v − Δ²);          x ← x + η m / (√v + τ)
- ``adagrad``: m ← Δ (β₁ = 0);  v ← v + Δ²;                          x ← x + η m / (√v + τ)

Moments are kept in float64 whatever the adapter dtype; the new state keeps each tensor's dtype.
Non-floating tensors are copied from the aggregate.

After each method:
- fedrot aligns clients onto the reference, so its aggregate lives in the reference's gauge and
  Δ is a consistent per-coordinate quantity from round to round (the moments stay meaningful).
- fedit / flexlora: factors in an arbitrary gauge; the optimizer still runs, but Δ mixes a change
  of basis with the update (the paper's Table 16 reports FedIT + Adam failing to converge).
- ffa / rolora: the frozen factor equals the reference, so Δ = 0 there and the moments of that
  factor stay zero (no step; adam's m/√v is 0/τ = 0).
- fedsa: the personal lora_B keys are absent from the aggregate; only the keys present in
  ``aggregated_state`` are stepped (the others are not in the result, as for the method itself).
- fedex / flora: the optimizer steps the adapter tensors only; ``base_deltas`` are carried over
  unchanged (they are already the exact dense update, to be folded into the base weights).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

__all__ = ["ServerOptimizer", "SERVER_OPTIMIZERS"]

# Flower's defaults per kind (flwr.serverapp.strategy FedAvgM / FedAdam / FedYogi / FedAdagrad).
SERVER_OPTIMIZERS = {
    "avgm": dict(lr=1.0, momentum=0.0),
    "adam": dict(lr=1e-1, beta_1=0.9, beta_2=0.99, tau=1e-3),
    "yogi": dict(lr=1e-2, beta_1=0.9, beta_2=0.99, tau=1e-3),
    "adagrad": dict(lr=1e-1, tau=1e-3),
}


def _check_nonneg(name: str, value: float, upper: Optional[float] = None) -> float:
    value = float(value)
    if not value >= 0.0 or (upper is not None and not value < upper):
        bound = f"in [0, {upper})" if upper is not None else ">= 0"
        raise ValueError(f"ServerOptimizer: {name} must be a finite number {bound}, got {value}")
    return value


class ServerOptimizer:
    """A server-side optimizer stepping the global adapter with the round's pseudo-gradient.

    Args:
        kind: "avgm", "adam", "yogi" or "adagrad".
        lr: server learning rate η (default: Flower's for the kind).
        momentum: μ for avgm. beta_1, beta_2: moment decays for adam / yogi. tau: adaptivity τ.

    Raises:
        ValueError: unknown kind, an option the kind does not take, or an out-of-range value.
    """

    def __init__(self, kind: str, lr: Optional[float] = None, **options):
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"ServerOptimizer: kind must be one of {sorted(SERVER_OPTIMIZERS)}, got {kind!r}")
        defaults = SERVER_OPTIMIZERS[kind]
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise ValueError(f"ServerOptimizer: kind {kind!r} takes {sorted(set(defaults) - {'lr'})}, got {unknown}")
        hp = dict(defaults, **options)
        if lr is not None:
            hp["lr"] = lr
        self.kind = kind
        self.lr = _check_nonneg("lr", hp["lr"])
        if not self.lr > 0:
            raise ValueError(f"ServerOptimizer: lr must be > 0, got {self.lr}")
        self.momentum = _check_nonneg("momentum", hp.get("momentum", 0.0), 1.0)
        self.beta_1 = _check_nonneg("beta_1", hp.get("beta_1", 0.0), 1.0)
        self.beta_2 = _check_nonneg("beta_2", hp.get("beta_2", 0.0), 1.0)
        self.tau = _check_nonneg("tau", hp.get("tau", 0.0))
        if kind != "avgm" and not self.tau > 0:
            raise ValueError(f"ServerOptimizer: tau must be > 0 for {kind!r}, got {self.tau}")
        self.steps = 0
        self.m: Dict[str, torch.Tensor] = {}
        self.v: Dict[str, torch.Tensor] = {}

    def step(self, reference_state: Mapping[str, torch.Tensor], aggregated_state: Mapping[str, torch.Tensor]):
        """The new global state: the reference moved by the optimizer's step along Δ = aggregated − reference.

        Returns the same type as ``aggregated_state`` when it is an :class:`AggregatedState`
        (``base_deltas`` and ``dropped`` carried over), else a dict; the inputs are not modified.

        Raises:
            ValueError: a floating key of ``aggregated_state`` missing from ``reference_state``, a shape
                mismatch, or non-finite values.
        """
        deltas = {}
        for key, agg in aggregated_state.items():
            if not (isinstance(agg, torch.Tensor) and agg.is_floating_point()):
                continue
            ref = reference_state.get(key)
            if ref is None:
                raise ValueError(f"ServerOptimizer.step: reference_state has no key {key!r} (present in aggregated_state)")
            if tuple(ref.shape) != tuple(agg.shape):
                raise ValueError(
                    f"ServerOptimizer.step: {key!r} has shape {tuple(agg.shape)} in aggregated_state but {tuple(ref.shape)} in reference_state"
                )
            delta = agg.detach().double() - ref.detach().to(agg.device).double()
            if not torch.isfinite(delta).all():
                raise ValueError(f"ServerOptimizer.step: non-finite values in {key!r} (aggregated_state or reference_state)")
            deltas[key] = delta
        self.steps += 1
        new = {}
        for key, agg in aggregated_state.items():
            if key in deltas:
                x = reference_state[key].detach().to(agg.device).double() + self._update(key, deltas[key])
                new[key] = x.to(agg.dtype)
            else:
                new[key] = agg.clone() if isinstance(agg, torch.Tensor) else agg
        if hasattr(aggregated_state, "base_deltas"):
            return type(aggregated_state)(new, base_deltas=aggregated_state.base_deltas, dropped=aggregated_state.dropped)
        return new

    def _update(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        if self.kind == "avgm":
            m = self.m.get(key)
            m = delta.clone() if m is None or self.momentum == 0.0 else self.momentum * m.to(delta.device) + delta
            self.m[key] = m
            return self.lr * m
        zeros = torch.zeros_like(delta)
        m = self.beta_1 * self.m.get(key, zeros).to(delta.device) + (1.0 - self.beta_1) * delta
        v = self.v.get(key, zeros).to(delta.device)
        sq = delta * delta
        if self.kind == "adam":
            v = self.beta_2 * v + (1.0 - self.beta_2) * sq
            lr = self.lr * (1.0 - self.beta_2**self.steps) ** 0.5 / (1.0 - self.beta_1**self.steps)
        elif self.kind == "yogi":
            v = v - (1.0 - self.beta_2) * sq * torch.sign(v - sq)
            lr = self.lr
        else:  # adagrad
            v = v + sq
            lr = self.lr
        self.m[key], self.v[key] = m, v
        return lr * m / (v.sqrt() + self.tau)

    def state_dict(self) -> dict:
        """Hyper-parameters, step count and moments (float64 tensors): ``torch.save``/safetensors-friendly."""
        return {
            "kind": self.kind, "lr": self.lr, "momentum": self.momentum, "beta_1": self.beta_1,
            "beta_2": self.beta_2, "tau": self.tau, "steps": self.steps,
            "m": {k: t.clone() for k, t in self.m.items()}, "v": {k: t.clone() for k, t in self.v.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from :meth:`state_dict` output (the kind must match).

        Raises:
            ValueError: a different kind, or missing entries.
        """
        missing = sorted({"kind", "lr", "momentum", "beta_1", "beta_2", "tau", "steps", "m", "v"} - set(state))
        if missing:
            raise ValueError(f"ServerOptimizer.load_state_dict: state is missing {missing}")
        if state["kind"] != self.kind:
            raise ValueError(f"ServerOptimizer.load_state_dict: state is for kind {state['kind']!r}, this optimizer is {self.kind!r}")
        for name in ("lr", "momentum", "beta_1", "beta_2", "tau"):
            setattr(self, name, float(state[name]))
        self.steps = int(state["steps"])
        self.m = {k: t.detach().clone().double() for k, t in state["m"].items()}
        self.v = {k: t.detach().clone().double() for k, t in state["v"].items()}
