"""Shared pieces of the trainer's tests: a tiny learnable corpus and a tiny job."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainerd.daemon.config import JobConfig, parse_config
from trainerd.producers.corpus import CorpusWriter
from trainerd.producers.encoding import Alphabet

WORDS = (
    ("engine wheel brake road", "car"),
    ("orbit rocket launch moon", "space"),
    ("goal match team score", "sport"),
)


def tiny_corpus(
    out: Path, *, n_train: int = 60, n_val: int = 24, seed: int = 0
) -> Path:
    """Posts whose body repeats one topic's words amid noise; 3 classes."""
    rng = np.random.default_rng(seed)
    alphabet = Alphabet()
    writer = CorpusWriter(out)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    for _ in range(n_train + n_val):
        label = int(rng.integers(len(WORDS)))
        words = WORDS[label][0].split()
        body = []
        for _ in range(int(rng.integers(4, 30))):
            if rng.random() < 0.4:
                body.append(str(rng.choice(words)))
            else:
                body.append("".join(rng.choice(letters, size=int(rng.integers(2, 7)))))
        title = f"post {int(rng.integers(1000))}"
        writer.add(alphabet.encode(title), alphabet.encode(" ".join(body)), label)
    ids = np.arange(n_train + n_val)
    writer.finish(
        train_ids=ids[:n_train],
        val_ids=ids[n_train:],
        meta={
            "alphabet": alphabet.to_dict(),
            "label_names": [name for _, name in WORDS],
            "source_fingerprint": f"tiny-{seed}-{n_train}-{n_val}",
        },
    )
    return out


def tiny_job(corpus: Path, **overrides: dict) -> JobConfig:
    """A job small enough to train in a second on one CPU thread."""
    data = {
        "name": "tiny",
        "corpus": str(corpus),
        "data": {"length": 64, "batch_size": 8, "producers": 2, "ring_slots": 2},
        "model": {"preset": "default", "features": 16, "hidden": 16},
        "train": {
            "epochs": 2,
            "seed": 3,
            "optimizer": "sgd",
            "lr": 0.05,
            "device": "cpu",
            "threads": 1,
        },
        "checkpoint": {"every_steps": 0, "every_minutes": 0, "keep_best": 2},
        "metrics": {"flush_s": 0.2, "log_every_steps": 5},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            data[section] = {**data.get(section, {}), **values}
        else:
            data[section] = values
    return parse_config(data)
