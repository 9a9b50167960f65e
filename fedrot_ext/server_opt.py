"""Server optimizers after aggregation (FedOpt, Reddi et al., ICLR 2021): FedAvgM, FedAdam, FedYogi, FedAdagrad.

The pseudo-gradient of a round is Δ = aggregated − reference, per floating tensor of the adapter;
the optimizer turns it into the step applied to the reference. Formulas (as Flower's strategies):

- ``avgm``:    m ← μ m + Δ (m = Δ in the first step);            x ← x + η m
- ``adam``:    m ← β₁ m + (1−β₁) Δ;  v ← β₂ v + (1−β₂) Δ²;          x ← x + η_t m / (√v + τ),
               η_t = η √(1−β₂ᵗ) / (1−β₁ᵗ) (bias correction, t = number of steps so far)
- ``yogi``:    m as adam;  v ← v − (1−β₂) Δ² sign(v − Δ²);          x ← x + η m / (√v + τ)
- ``adagrad``: m ← Δ (β₁ = 0);  v ← v + Δ²;                          x ← x + η m / (√v + τ)

Moments are kept in float64 whatever the adapter dtype; the new state keeps each tensor's dtype.
For a global in a narrower dtype than float64 the optimizer also keeps the unrounded result of its
last step (a float64 master copy), and steps from it while the reference it is given is that copy
rounded: a bfloat16 global otherwise loses every step smaller than half an ulp.
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

import copy
import math
import numbers
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


def _check_nonneg(name: str, value, upper: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"ServerOptimizer: {name} must be a finite number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0.0 or (upper is not None and not value < upper):
        bound = f"in [0, {upper})" if upper is not None else ">= 0"
        raise ValueError(f"ServerOptimizer: {name} must be a finite number {bound}, got {value}")
    return value


def _hyperparameters(kind: str, hp: Mapping) -> Dict[str, float]:
    """The validated hyper-parameters of `kind`: one rule for the constructor and for a loaded state."""
    out = {
        "lr": _check_nonneg("lr", hp["lr"]),
        "momentum": _check_nonneg("momentum", hp.get("momentum", 0.0), 1.0),
        "beta_1": _check_nonneg("beta_1", hp.get("beta_1", 0.0), 1.0),
        "beta_2": _check_nonneg("beta_2", hp.get("beta_2", 0.0), 1.0),
        "tau": _check_nonneg("tau", hp.get("tau", 0.0)),
    }
    if not out["lr"] > 0:
        raise ValueError(f"ServerOptimizer: lr must be > 0, got {out['lr']}")
    if kind != "avgm" and not out["tau"] > 0:
        raise ValueError(f"ServerOptimizer: tau must be > 0 for {kind!r}, got {out['tau']}")
    return out


def _tensor_table(state: Mapping, name: str, nonneg: bool = False) -> Dict[str, torch.Tensor]:
    """A loaded {key: tensor} entry, checked and copied to float64."""
    table = state.get(name, {})
    if not isinstance(table, Mapping):
        raise ValueError(f"ServerOptimizer.load_state_dict: state[{name!r}] must be a mapping of keys to tensors, got {type(table).__name__}")
    out = {}
    for key, t in table.items():
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            raise ValueError(f"ServerOptimizer.load_state_dict: state[{name!r}][{key!r}] must be a floating tensor, got {type(t).__name__}")
        t = t.detach().to(torch.float64, copy=True)
        if not torch.isfinite(t).all() or (nonneg and bool((t < 0).any())):
            want = "finite values >= 0" if nonneg else "finite values"
            raise ValueError(f"ServerOptimizer.load_state_dict: state[{name!r}][{key!r}] must hold {want}")
        out[key] = t
    return out


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
        for name, value in _hyperparameters(kind, hp).items():
            setattr(self, name, value)
        self.steps = 0
        self.m: Dict[str, torch.Tensor] = {}
        self.v: Dict[str, torch.Tensor] = {}
        self.master: Dict[str, torch.Tensor] = {}

    def step(self, reference_state: Mapping[str, torch.Tensor], aggregated_state: Mapping[str, torch.Tensor]):
        """The new global state: the reference moved by the optimizer's step along Δ = aggregated − reference.

        The step is taken in float64 from the optimizer's master copy of the global (the unrounded
        result of its last step) while ``reference_state`` equals that copy rounded to its dtype,
        so steps below half an ulp of a bfloat16 or float16 global still add up; from
        ``reference_state`` itself otherwise.

        Returns the same type as ``aggregated_state`` when it is an :class:`AggregatedState` or a
        subclass (its attributes carried over), else a dict; the inputs are not modified.

        Raises:
            ValueError: a floating key of ``aggregated_state`` missing from ``reference_state``, a shape
                mismatch (also against the moments of earlier steps: a changed rank), or non-finite
                values. Nothing of the optimizer's state changes then.
        """
        deltas, starts = {}, {}
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
            moment = self.m.get(key)
            if moment is not None and tuple(moment.shape) != tuple(agg.shape):
                raise ValueError(
                    f"ServerOptimizer.step: {key!r} has shape {tuple(agg.shape)} but the optimizer's moments from earlier steps "
                    f"have shape {tuple(moment.shape)} (did the rank change? use a new ServerOptimizer)"
                )
            ref = ref.detach().to(agg.device)
            delta = agg.detach().double() - ref.double()
            if not torch.isfinite(delta).all():
                raise ValueError(f"ServerOptimizer.step: non-finite values in {key!r} (aggregated_state or reference_state)")
            deltas[key], starts[key] = delta, self._start(key, ref)
        self.steps += 1
        new = {}
        for key, agg in aggregated_state.items():
            if key in deltas:
                x = starts[key] + self._update(key, deltas[key])
                if agg.dtype != torch.float64:
                    self.master[key] = x
                new[key] = x.to(agg.dtype)
            else:
                new[key] = agg.clone() if isinstance(agg, torch.Tensor) else agg
        if isinstance(aggregated_state, dict) and type(aggregated_state) is not dict:
            out = copy.copy(aggregated_state)  # its class and attributes (base_deltas, dropped, ...)
            out.clear()
            out.update(new)
            return out
        return new

    def _start(self, key: str, ref: torch.Tensor) -> torch.Tensor:
        """The float64 point the step starts from: the master copy while `ref` is it rounded, else `ref`."""
        master = self.master.get(key)
        if master is not None and master.shape == ref.shape:
            master = master.to(ref.device)
            if torch.equal(master.to(ref.dtype), ref):
                return master
        return ref.double()

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
        """Hyper-parameters, step count, moments and master copies (float64 tensors): ``torch.save``/safetensors-friendly."""
        return {
            "kind": self.kind, "lr": self.lr, "momentum": self.momentum, "beta_1": self.beta_1,
            "beta_2": self.beta_2, "tau": self.tau, "steps": self.steps,
            "m": {k: t.clone() for k, t in self.m.items()}, "v": {k: t.clone() for k, t in self.v.items()},
            "master": {k: t.clone() for k, t in self.master.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from :meth:`state_dict` output (the kind must match).

        Every entry is checked as the constructor checks its options before any is taken, so a
        refused state leaves the optimizer as it was. ``master`` may be absent (no master copy).

        Raises:
            ValueError: a different kind, missing entries, an out-of-range hyper-parameter, a step count
                that is not an int >= 0, or moments that are not finite floating tensors (v >= 0, the same
                keys and shapes as m).
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"ServerOptimizer.load_state_dict: state must be a mapping (from state_dict()), got {type(state).__name__}")
        missing = sorted({"kind", "lr", "momentum", "beta_1", "beta_2", "tau", "steps", "m", "v"} - set(state))
        if missing:
            raise ValueError(f"ServerOptimizer.load_state_dict: state is missing {missing}")
        if state["kind"] != self.kind:
            raise ValueError(f"ServerOptimizer.load_state_dict: state is for kind {state['kind']!r}, this optimizer is {self.kind!r}")
        hp = _hyperparameters(self.kind, state)
        steps = state["steps"]
        if isinstance(steps, torch.Tensor) and steps.numel() == 1 and not steps.is_floating_point():
            steps = steps.item()
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"ServerOptimizer.load_state_dict: steps must be an int >= 0, got {steps!r}")
        m, v, master = _tensor_table(state, "m"), _tensor_table(state, "v", nonneg=True), _tensor_table(state, "master")
        if self.kind != "avgm":
            shapes = lambda table: {k: tuple(t.shape) for k, t in table.items()}  # noqa: E731
            if shapes(m) != shapes(v):
                raise ValueError("ServerOptimizer.load_state_dict: state['m'] and state['v'] must hold the same keys and shapes")
        if (m or v) and steps == 0:
            raise ValueError("ServerOptimizer.load_state_dict: moments without a step (steps = 0)")
        for name, value in hp.items():
            setattr(self, name, value)
        self.steps, self.m, self.v, self.master = int(steps), m, v, master
