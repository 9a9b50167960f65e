"""The aggregation methods: one table entry per method, read by every layer.

:func:`fedrot_ext.aggregate_state_dicts`, its robustness options (:mod:`fedrot_ext.peft.policy`)
and the Flower strategy (:mod:`fedrot_ext.flower.strategy`) all take a method's rules from
here: which factor the clients keep frozen or personal, what the server outputs, whether
ranks must agree, whether the factor-level aggregation error means anything, how a norm
clip splits over the factors, and which released tensors get noise. Definitions of the
methods: docs/METHOD.md, "Baselines".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .schedule import check_factor, rolora_trained_factor

__all__ = ["Method", "METHOD_TABLE", "METHODS", "get_method"]


@dataclass(frozen=True)
class Method:
    """How one method aggregates peft LoRA factors.

    Attributes:
        name: the ``method=`` string.
        output: "factors" (a weighted factor average, rotated first for fedrot), "refactor"
            (FlexLoRA's truncated SVD of Σ w_i B_i A_i), "residual" (FedIT factors plus the exact
            residual in ``base_deltas``, FedEx-LoRA) or "merge" (Σ w_i B_i A_i in ``base_deltas``
            and B reset to zero, FLoRA).
        frozen: "A" / "B": the factor clients keep frozen, copied (and checked identical);
            "alternate": RoLoRA's per-round choice; "" for none.
        personal: the factor each client keeps for itself, left out of the result ("" for none).
        aligns: rotates clients onto the reference (FedRot-LoRA) before averaging.
        equal_ranks: every client must have the same rank per module.
        factor_error: the factor-level aggregation error ‖Σ w_i B_i A_i − B̄ Ā‖ describes the
            update (not when B is personal or the update goes exactly into the base weight).
        initial: the default ``initial`` factor of the method's round schedule.
    """

    name: str
    output: str = "factors"
    frozen: str = ""
    personal: str = ""
    aligns: bool = False
    equal_ranks: bool = False
    factor_error: bool = True
    initial: str = "A"

    @property
    def dense(self) -> bool:
        """The method writes base-weight updates (``base_deltas``) and needs the LoraConfig."""
        return self.output in ("residual", "merge")

    def frozen_factor(self, round: Optional[int], initial: Optional[str] = None) -> Optional[str]:
        """The factor clients kept frozen in `round` ("A"/"B"), or None.

        Raises:
            ValueError: RoLoRA without a valid round, or a bad ``initial``.
        """
        if self.frozen == "alternate":
            return "A" if rolora_trained_factor(round, initial or self.initial) == "B" else "B"
        return self.frozen or None

    def clip_exponents(self, frozen: Optional[str]) -> Tuple[float, float]:
        """(e_A, e_B): scaling A_i by s_i^e_A and B_i by s_i^e_B makes client i's update s_i ΔW_i.

        The whole scale goes on the one aggregated factor when the other is frozen or personal;
        otherwise √s_i on both (rotations are scale-invariant, so alignment is unaffected).
        """
        fixed = frozen or self.personal
        if fixed == "A":
            return 0.0, 1.0
        if fixed == "B":
            return 1.0, 0.0
        return 0.5, 0.5

    def noised_factors(self, frozen: Optional[str]) -> str:
        """The released factors that are averages of client factors ("A", "B" or "AB"):
        not a frozen copy, not a personal factor, not FLoRA's reset B."""
        dropped = {frozen, self.personal or None, "B" if self.output == "merge" else None}
        return "".join(f for f in "AB" if f not in dropped)


METHOD_TABLE: Dict[str, Method] = {
    m.name: m
    for m in (
        Method("fedrot", aligns=True),
        Method("fedit"),
        Method("ffa", frozen="A", equal_ranks=True),
        Method("rolora", frozen="alternate", equal_ranks=True, initial="B"),
        Method("fedsa", personal="B", equal_ranks=True, factor_error=False),
        Method("flexlora", output="refactor"),
        Method("fedex", output="residual", factor_error=False),
        Method("flora", output="merge", factor_error=False),
    )
}
METHODS = tuple(METHOD_TABLE)


def get_method(method: str) -> Method:
    """The table entry of `method`.

    Raises:
        ValueError: an unknown method (naming the valid ones).
    """
    if method not in METHOD_TABLE:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return METHOD_TABLE[method]


def check_initial(initial: Optional[str]) -> Optional[str]:
    """None (the method's default) or "A"/"B"."""
    return None if initial is None else check_factor("initial", initial)
