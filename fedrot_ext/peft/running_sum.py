"""A running sum of tensors in one accumulate-dtype tensor, optionally Kahan-compensated; the rank of a
LoRA factor's sum grows by zero-padding."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .._stacking import pad_rank


class RunningSum:
    """Σ of the terms added, in one accumulate-dtype tensor; with Kahan, plus the running
    compensation (the low-order bits the last additions lost)."""

    def __init__(self, like: torch.Tensor, kahan: bool):
        self.total = torch.zeros_like(like)
        self.comp = torch.zeros_like(like) if kahan else None

    def add(self, term: torch.Tensor, rank_dim: Optional[int] = None) -> None:
        """Add a fresh term (it is consumed: modified in place); a LoRA factor's rank (`rank_dim`)
        is zero-padded on whichever side is smaller."""
        if rank_dim is not None and term.shape[rank_dim] != self.total.shape[rank_dim]:
            self.grow(term.shape[rank_dim], rank_dim)
            term = pad_rank(term, self.total.shape[rank_dim], rank_dim)
        if self.comp is None:
            self.total.add_(term)
            return
        term.sub_(self.comp)                                # y = x - c
        new = self.total + term                             # t = s + y
        self.comp.copy_(new).sub_(self.total).sub_(term)    # c = (t - s) - y
        self.total = new

    def grow(self, size: int, dim: int, scale: float = 1.0) -> None:
        """Zero-pad the rank to `size` and multiply by `scale` (the sums move to a larger rank's LoRA scaling)."""
        if size > self.total.shape[dim]:
            self.total = pad_rank(self.total, size, dim)
            self.comp = None if self.comp is None else pad_rank(self.comp, size, dim)
        self.scale(scale)

    def scale(self, factor: float) -> None:
        if factor != 1.0:
            self.total.mul_(factor)
            if self.comp is not None:
                self.comp.mul_(factor)

    def value(self) -> torch.Tensor:
        """The best estimate of the sum: the total less the compensation still owed (a fresh tensor)."""
        return self.total.clone() if self.comp is None else self.total - self.comp

    def state(self) -> Dict[str, torch.Tensor]:
        return {"total": self.total.clone()} | ({} if self.comp is None else {"comp": self.comp.clone()})

    @classmethod
    def from_state(cls, state: Dict[str, torch.Tensor], kahan: bool) -> "RunningSum":
        out = cls.__new__(cls)
        out.total = state["total"].clone()
        out.comp = (state["comp"].clone() if "comp" in state else torch.zeros_like(out.total)) if kahan else None
        return out
