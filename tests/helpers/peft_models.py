"""Tiny real peft models (random weights, no hub), federated rounds built on them, and state-dict checks."""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from fedrot_ext import parse_lora_keys
from helpers.problems import haar_rotations

State = Dict[str, torch.Tensor]

# Keys of tiny_bert's saved adapter used by the bad-input and robustness tables.
QUERY_0 = "base_model.model.bert.encoder.layer.0.attention.self.query"
KA, KB = f"{QUERY_0}.lora_A.weight", f"{QUERY_0}.lora_B.weight"
HEAD = "base_model.model.classifier.weight"


def bert_lora_config(**overrides) -> LoraConfig:
    """LoRA on query/value and the word embeddings, classifier in modules_to_save, one smaller rank."""
    kw = dict(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "word_embeddings"],
        modules_to_save=["classifier"],
        rank_pattern={"layer.1.attention.self.value": 2},
        task_type="SEQ_CLS",
    )
    kw.update(overrides)
    return LoraConfig(**kw)


def tiny_bert(dtype: torch.dtype = torch.float32, seed: int = 0, **config_overrides):
    """BertForSequenceClassification (hidden 16, 2 layers, 3 labels) with LoRA."""
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3,
    )
    model = get_peft_model(BertForSequenceClassification(cfg), bert_lora_config(**config_overrides))
    return model.to(dtype)


def gpt2_lora_config(**overrides) -> LoraConfig:
    kw = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    kw.update(overrides)
    return LoraConfig(**kw)


def tiny_gpt2(dtype: torch.dtype = torch.float32, seed: int = 0):
    """GPT-2 (hidden 16, 1 layer) with LoRA on its Conv1D layers (fan_in_fan_out)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
    return get_peft_model(GPT2LMHeadModel(cfg), gpt2_lora_config()).to(dtype)


def make_round(model, n_clients: int, seed: int = 0, noise: float = 0.1) -> Tuple[State, List[State]]:
    """A non-zero global adapter and N clients that are randomly rotated, noisy copies of it.

    Returns (reference, clients) in peft's saved key layout and the model's dtype.
    """
    g = torch.Generator().manual_seed(seed)
    template = get_peft_model_state_dict(model)
    randn = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64)  # noqa: E731
    reference = {k: (0.5 * randn(v)).to(v.dtype) for k, v in template.items()}
    modules, others = parse_lora_keys(template)
    clients = []
    for _ in range(n_clients):
        state = {}
        for m in modules:
            a, b = reference[m.key_A].double(), reference[m.key_B].double()
            Q = haar_rotations(1, a.shape[0], g)[0]
            state[m.key_A] = (Q.T @ (a + noise * randn(a))).to(template[m.key_A].dtype)
            state[m.key_B] = ((b + noise * randn(b)) @ Q).to(template[m.key_B].dtype)
        for k in others:
            state[k] = (reference[k].double() + noise * randn(reference[k])).to(template[k].dtype)
        clients.append({k: state[k] for k in template})
    return reference, clients


def stacked(clients: List[State], modules, ref: State = None):
    """The clients' factors of `modules` as align_and_aggregate takes them: A (N, r, in) and B (N, out, r)
    per module, plus the reference's lists when `ref` is given."""
    A = [torch.stack([c[m.key_A] for c in clients]) for m in modules]
    B = [torch.stack([c[m.key_B] for c in clients]) for m in modules]
    if ref is None:
        return A, B
    return A, B, [ref[m.key_A] for m in modules], [ref[m.key_B] for m in modules]


def load_into(model, state: State):
    """Load a saved-layout adapter into the peft model; fail on any unexpected key."""
    result = set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys, result.unexpected_keys
    return model


def live_state(model, state: State) -> State:
    """The live ``model.state_dict()`` (adapter names in keys) after loading `state`."""
    return {k: v.clone() for k, v in load_into(model, state).state_dict().items()}


def lora_layers(model):
    """{module path as in saved keys: peft LoRA layer} of a peft model."""
    return {name: mod for name, mod in model.named_modules() if hasattr(mod, "get_delta_weight") and hasattr(mod, "lora_A")}


def effective_weights(model) -> Dict[str, torch.Tensor]:
    """Per LoRA layer: base weight + peft's own delta (peft applies scaling and layout)."""
    with torch.no_grad():
        return {name: layer.get_base_layer().weight + layer.get_delta_weight("default") for name, layer in lora_layers(model).items()}


def clone_states(states):
    return [{k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in s.items()} for s in states]


def assert_states_equal(before, after):
    for b, a in zip(before, after):
        assert list(b) == list(a)
        for k in b:
            if not isinstance(b[k], torch.Tensor):
                assert b[k] == a[k], k
                continue
            assert b[k].dtype == a[k].dtype and torch.equal(b[k].nan_to_num(), a[k].nan_to_num()), k


def assert_same_state(a, b, rtol: float = 0.0, atol: float = 0.0):
    """Same keys in the same order, same dtypes and shapes, equal values (within rtol/atol when given);
    the ``base_deltas`` of an aggregate too, when either side has them."""
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)
    deltas_a, deltas_b = getattr(a, "base_deltas", None), getattr(b, "base_deltas", None)
    if deltas_a is not None or deltas_b is not None:
        assert_same_state(deltas_a, deltas_b, rtol, atol)


def to_device(state: State, device) -> State:
    return {k: v.to(device) for k, v in state.items()}
