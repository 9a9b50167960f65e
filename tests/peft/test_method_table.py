"""The method table is the one place each method's rules live; the API agrees with itself."""
import inspect

import pytest
import torch

import fedrot_ext
from fedrot_ext import METHOD_TABLE, METHODS, reference


def test_every_method_has_an_entry_and_unknown_methods_are_named():
    assert tuple(METHOD_TABLE) == METHODS
    assert METHODS == ("fedrot", "fedit", "ffa", "rolora", "fedsa", "flexlora", "fedex", "flora")
    with pytest.raises(ValueError, match=r"method: expected one of .*fedrot.*got 'fedavg'"):
        fedrot_ext.aggregate_state_dicts([{"m.lora_A.weight": torch.ones(1, 2), "m.lora_B.weight": torch.ones(2, 1)}],
                                         method="fedavg")


@pytest.mark.parametrize("name,round,frozen,exponents,noised", [
    ("fedrot", 1, None, (0.5, 0.5), "AB"),
    ("fedit", 1, None, (0.5, 0.5), "AB"),
    ("ffa", 1, "A", (0.0, 1.0), "B"),
    ("rolora", 0, "A", (0.0, 1.0), "B"),  # round 0 trains B (peft's zero B gives A no gradient)
    ("rolora", 1, "B", (1.0, 0.0), "A"),
    ("fedsa", 1, None, (1.0, 0.0), "A"),
    ("flexlora", 1, None, (0.5, 0.5), "AB"),
    ("fedex", 1, None, (0.5, 0.5), "AB"),
    ("flora", 1, None, (0.5, 0.5), "A"),
])
def test_table_rules(name, round, frozen, exponents, noised):
    spec = METHOD_TABLE[name]
    assert spec.frozen_factor(round) == frozen
    assert spec.clip_exponents(frozen) == exponents
    e_A, e_B = exponents
    assert e_A + e_B == 1.0  # scaling A by s^e_A and B by s^e_B scales the update B A by s
    assert spec.noised_factors(frozen) == noised
    assert spec.dense == (name in ("fedex", "flora"))
    assert spec.equal_ranks == (name in ("ffa", "rolora", "fedsa"))
    assert spec.factor_error == (name not in ("fedsa", "fedex", "flora"))


def test_rolora_initial_swaps_the_frozen_factor():
    assert METHOD_TABLE["rolora"].frozen_factor(0, "A") == "B"
    with pytest.raises(ValueError, match="round: required for RoLoRA"):
        METHOD_TABLE["rolora"].frozen_factor(None)


def _defaults(fn):
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()}


def test_lam_and_initial_defaults_agree_across_the_api():
    fns = [fedrot_ext.align_and_aggregate, fedrot_ext.procrustes_rotation, fedrot_ext.aggregate_state_dicts,
           fedrot_ext.align_state_dict, reference.align_and_aggregate, reference.procrustes_rotation]
    assert {_defaults(f)["lam"] for f in fns} == {0.5}
    for f in (fedrot_ext.aggregate_state_dicts, fedrot_ext.align_state_dict, fedrot_ext.alignment_for_round,
              fedrot_ext.rolora_trained_factor):
        assert _defaults(f)["initial"] is None, f.__name__


def test_reference_is_keyword_only():
    for f in (fedrot_ext.aggregate_state_dicts, fedrot_ext.align_state_dict):
        assert inspect.signature(f).parameters["reference"].kind is inspect.Parameter.KEYWORD_ONLY, f.__name__
    for f in (fedrot_ext.align_and_aggregate, reference.align_and_aggregate):
        for name in ("ref_A", "ref_B"):
            assert inspect.signature(f).parameters[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_round_omitted_for_alternating_fedrot_is_a_clear_error():
    state = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(4, 2)}
    with pytest.raises(ValueError, match=r"round: required for schedule='alternate'"):
        fedrot_ext.aggregate_state_dicts([state, state], reference=state)
    with pytest.raises(ValueError, match=r"round: required for schedule='alternate'"):
        fedrot_ext.align_state_dict(state, reference=state)
    # A fixed schedule needs no round: every call aligns.
    out = fedrot_ext.aggregate_state_dicts([state, state], reference=state, schedule="A")
    assert torch.equal(out["m.lora_A.weight"], state["m.lora_A.weight"])
