"""Round schedules of FedRot-LoRA and RoLoRA (0-based rounds, docs/METHOD.md)."""
import pytest

from fedrot_ext import alignment_for_round, rolora_trained_factor


def test_alternating_schedule_table():
    assert [alignment_for_round(t) for t in range(6)] == ["none", "A", "B", "A", "B", "A"]
    assert [alignment_for_round(t, initial="B") for t in range(5)] == ["none", "B", "A", "B", "A"]


@pytest.mark.parametrize("schedule", ["A", "B", "AB", "none"])
def test_fixed_schedules_skip_round_zero_only(schedule):
    assert alignment_for_round(0, schedule) == "none"
    assert [alignment_for_round(t, schedule) for t in (1, 2, 7)] == [schedule] * 3
    assert alignment_for_round(None, schedule) == schedule  # no round index: align every call


def test_rolora_alternates_from_B():
    assert [rolora_trained_factor(t) for t in range(4)] == ["B", "A", "B", "A"]
    assert [rolora_trained_factor(t, initial="A") for t in range(3)] == ["A", "B", "A"]


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda: alignment_for_round(None), r"round: required for schedule='alternate'"),
        (lambda: alignment_for_round(-1), r"round: expected a non-negative int"),
        (lambda: alignment_for_round(True), r"round: expected a non-negative int"),
        (lambda: alignment_for_round(1, "haar"), r"schedule: expected one of"),
        (lambda: alignment_for_round(1, initial="AB"), r"initial: expected 'A' or 'B'"),
        (lambda: rolora_trained_factor(None), r"round: required for RoLoRA"),
        (lambda: rolora_trained_factor(1.0), r"round: expected a non-negative int"),
    ],
)
def test_bad_schedule_arguments(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()
