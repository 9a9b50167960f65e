"""Bad input to the state-dict API: a clear exception naming the key; nothing passed in is modified.
(Bad stacked tensors to the op itself: tests/op/test_op_bad_input.py.)"""
import pytest
import torch

import fedrot_ext
from helpers.peft_models import HEAD, KA, KB, QUERY_0, assert_states_equal, clone_states, make_round, tiny_bert
from helpers.problems import poisoned


def _drop(key, which):
    def edit(ref, clients):
        for c in which(clients):
            del c[key]
    return edit


def _set(target, key, make):
    def edit(ref, clients):
        state = ref if target == "ref" else clients[target]
        state[key] = make(state[key])
    return edit


def _nan(t):
    return poisoned(t, position=3)


CASES = {
    "unmatched_A": (_drop(KB, lambda cs: cs), {}, ValueError,
                    rf"client_states\[0\]: key '{KA}' has no matching lora_B key \(expected '{KB}'\)"),
    "client_missing_module": (lambda r, cs: [cs[1].pop(KA), cs[1].pop(KB)], {}, ValueError,
                              rf"client_states\[1\]: missing key '{KA}' that client_states\[0\] has"),
    "client_extra_key": (lambda r, cs: cs[2].update({"extra.weight": torch.zeros(2)}), {}, ValueError,
                         r"client_states\[2\]: unexpected key 'extra.weight'"),
    "in_features_disagree": (_set(1, KA, lambda t: torch.zeros(4, 17)), {}, ValueError,
                             rf"client_states\[1\]\['{KA}'\]: expected in_features 16"),
    "rank_disagrees_with_A": (_set(2, KB, lambda t: torch.zeros(16, 3)), {}, ValueError,
                              rf"client_states\[2\]\['{KB}'\]: expected shape \(16, 4\)"),
    "factor_not_2d": (_set(0, KA, lambda t: t[None]), {}, ValueError,
                      rf"client_states\[0\]\['{KA}'\]: expected a 2-D LoRA factor"),
    "dtype_disagrees": (_set(1, KA, lambda t: t.to(torch.bfloat16)), {}, TypeError,
                        rf"client_states\[1\]\['{KA}'\]: expected dtype torch.float32"),
    "head_shape_disagrees": (_set(2, HEAD, lambda t: torch.zeros(4, 16)), {}, ValueError,
                             rf"client_states\[2\]\['{HEAD}'\]: expected shape \(3, 16\)"),
    "not_a_tensor": (_set(1, HEAD, lambda t: t.tolist()), {}, TypeError,
                     rf"client_states\[1\]\['{HEAD}'\]: expected a torch.Tensor"),
    "nan_in_factor": (_set(2, KA, _nan), {}, ValueError,
                      rf"client_states\[2\]\['{KA}'\]: expected finite values, found NaN or Inf"),
    "inf_in_head": (_set(1, HEAD, lambda t: t.clone().fill_(float("inf"))), {}, ValueError,
                    rf"client_states\[1\]\['{HEAD}'\]: expected finite values"),
    "reference_missing_key": (lambda r, cs: r.pop(KA), {}, ValueError, rf"reference: missing key '{KA}'"),
    "reference_wrong_shape": (_set("ref", KA, lambda t: torch.zeros(4, 15)), {}, ValueError,
                              rf"reference\['{KA}'\]: expected shape \(r, 16\)"),
    "reference_nan": (_set("ref", KA, _nan), {}, ValueError, rf"reference\['{KA}'\]: expected finite values"),
    "bad_key_layout": (lambda r, cs: [c.update({f"{QUERY_0}.lora_A.x.y.weight": torch.zeros(1)}) for c in cs], {},
                       ValueError, rf"client_states\[0\]: '{QUERY_0}.lora_A.x.y.weight': unrecognised LoRA key layout"),
    "unknown_method": (None, {"method": "fedprox"}, ValueError, r"method: expected one of \('fedrot'"),
    "weights_wrong_length": (None, {"weights": [1.0, 2.0]}, ValueError, r"weights: expected shape \(3,\)"),
    "round_missing": (None, {"round": None}, ValueError, r"round: required for schedule='alternate'"),
    "reference_missing": (None, {"reference": None}, ValueError, r"reference: required to align on A in round 1"),
    "bad_schedule": (None, {"schedule": "random"}, ValueError, r"schedule: expected one of"),
    "bad_lam": (None, {"lam": 1.5}, ValueError, r"lam: expected a value in \[0, 1\]"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_the_key_and_modifies_nothing(case):
    edit, kwargs, exc, pattern = CASES[case]
    ref, clients = make_round(tiny_bert(), 3, seed=0)
    if edit is not None:
        edit(ref, clients)
    before = clone_states(clients + [ref])
    args = dict(reference=ref, round=1)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        fedrot_ext.aggregate_state_dicts(clients, **args)
    assert_states_equal(before, clients + [ref])


def test_client_list_itself():
    ref, clients = make_round(tiny_bert(), 2, seed=1)
    with pytest.raises(ValueError, match="client_states: expected at least one client"):
        fedrot_ext.aggregate_state_dicts([], method="fedit")
    with pytest.raises(TypeError, match="client_states: expected a list of state dicts"):
        fedrot_ext.aggregate_state_dicts(clients[0], method="fedit")
    with pytest.raises(ValueError, match=r"client_states\[0\]: no LoRA factor keys found"):
        fedrot_ext.aggregate_state_dicts([{HEAD: clients[0][HEAD]}], method="fedit")


def test_align_state_dict_names_client_state_and_reference():
    ref, clients = make_round(tiny_bert(), 1, seed=2)
    before = clone_states(clients + [ref])
    del ref[KB]
    with pytest.raises(ValueError, match=rf"reference: missing key '{KB}'"):
        fedrot_ext.align_state_dict(clients[0], reference=ref, round=2)  # round 2 aligns on B
    bad = dict(clients[0])
    bad[KA] = _nan(bad[KA])
    with pytest.raises(ValueError, match=rf"client_state\['{KA}'\]: expected finite values"):
        fedrot_ext.align_state_dict(bad, reference=before[1], round=1)
    assert_states_equal(before[:1], clients)
