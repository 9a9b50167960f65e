"""Round schedules: which factor drives FedRot-LoRA's rotation, which factor RoLoRA trains.

Rounds are 0-based, as in the authors' code (docs/METHOD.md, "Schedule").
"""
from __future__ import annotations

from typing import Optional

SCHEDULES = ("alternate", "A", "B", "AB", "none")
FACTORS = ("A", "B")


def _check_round(round: Optional[int], required: bool, why: str) -> Optional[int]:
    if round is None:
        if required:
            raise ValueError(f"round: required {why}, got None")
        return None
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round: expected a non-negative int (0-based round index), got {round!r}")
    return round


def check_factor(name: str, factor: str) -> str:
    if factor not in FACTORS:
        raise ValueError(f"{name}: expected 'A' or 'B', got {factor!r}")
    return factor


def alignment_for_round(round: Optional[int], schedule: str = "alternate", initial: Optional[str] = None) -> str:
    """The alignment mode of FedRot-LoRA in a round.

    Round 0 is never aligned (plain FedIT): the clients all start from the same global
    factors, and peft's zero-initialised B gives no reference to align on.
    ``"alternate"`` (the paper's best): with ``initial="A"`` odd rounds align on A and even
    rounds ≥ 2 on B; ``initial="B"`` swaps the parity. ``"A"``, ``"B"``, ``"AB"`` (joint)
    and ``"none"`` use that mode in every round from 1 on.

    Args:
        round: 0-based round index; may be None for a fixed schedule (then every call aligns).
        schedule: one of :data:`SCHEDULES`.
        initial: "A" or "B", the factor of round 1 under ``"alternate"``; None means "A".

    Returns:
        "none", "A", "B" or "AB": the ``align`` argument of :func:`fedrot_ext.align_and_aggregate`.

    Raises:
        ValueError: unknown schedule or initial factor; missing or negative round.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    initial = check_factor("initial", "A" if initial is None else initial)
    round = _check_round(round, schedule == "alternate", "for schedule='alternate' (odd/even rounds pick the factor)")
    if round == 0:
        return "none"
    if schedule != "alternate":
        return schedule
    other = "B" if initial == "A" else "A"
    return initial if round % 2 == 1 else other


def rolora_trained_factor(round: int, initial: Optional[str] = None) -> str:
    """The factor RoLoRA clients train in a round (the other one stays frozen).

    RoLoRA alternates: ``initial`` in even rounds (0, 2, ...), the other factor in odd
    rounds. The default starts with B because peft initialises B to zero, which gives A
    no gradient in a round where only A trains.

    Args:
        round: 0-based round index.
        initial: "A" or "B", the factor trained in round 0; None means "B".

    Returns:
        "A" or "B".

    Raises:
        ValueError: missing or negative round, or an initial factor other than "A"/"B".
    """
    initial = check_factor("initial", "B" if initial is None else initial)
    round = _check_round(round, True, "for RoLoRA (the round decides which factor was trained)")
    other = "B" if initial == "A" else "A"
    return initial if round % 2 == 0 else other
