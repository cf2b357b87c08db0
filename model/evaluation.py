"""Evaluating checkpoints on labelled posts, as `trainerctl evaluate` reports it.

The figures are the trainer's validation figures (model.metrics.summarise: accuracy,
macro-F1, per-class precision and recall, the confusion matrix) plus per-class F1 and
support. Frames come in two kinds: the voter's (title and the tail of the body, or
several windows) and the trainer's validation frames (the same fixed random windows
every epoch), so a checkpoint's stored validation figures can be checked exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trainerd.model.metrics import summarise
from trainerd.model.voter import Scores, Voter
from trainerd.producers.corpus import Corpus
from trainerd.producers.errors import CheckpointError, InputError

# Probabilities are clipped here before the log, so a confident miss costs a finite loss.
MIN_PROB = 1e-30


def figures(
    true: np.ndarray, scores: Scores, label_names: Sequence[str]
) -> dict[str, Any]:
    """Loss, accuracy, macro-F1, per-class precision/recall/F1/support, the matrix."""
    true = np.asarray(true, dtype=np.int64)
    n = len(label_names)
    index = true * n + scores.predicted.astype(np.int64)
    matrix = np.bincount(index, minlength=n * n).reshape(n, n)
    picked = scores.probs[np.arange(true.size), true].astype(np.float64)
    loss_sum = float(-np.log(np.maximum(picked, MIN_PROB)).sum())
    out = summarise(matrix, loss_sum, label_names=list(label_names))
    precision, recall = np.array(out["precision"]), np.array(out["recall"])
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(n), where=both > 0)
    out["f1"] = [round(float(x), 6) for x in f1]
    out["support"] = matrix.sum(axis=1).tolist()
    return out


def label_ids(
    labels: Sequence[str], label_names: Sequence[str], where: str
) -> np.ndarray:
    """Maps label names to the checkpoints' ids; InputError naming an unknown one."""
    ids = {name: i for i, name in enumerate(label_names)}
    out = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        found = ids.get(label)
        if found is None:
            raise InputError(
                f"{where}: post {i + 1} has label {label!r}, which the checkpoints do "
                f"not know (they know {len(label_names)}: {', '.join(label_names[:6])}"
                f"{', ...' if len(label_names) > 6 else ''})"
            )
        out[i] = found
    return out


def corpus_split(corpus: Corpus, split: str) -> np.ndarray:
    """Post ids of a corpus split: val, train or all."""
    if split == "val":
        return np.asarray(corpus.val_ids, dtype=np.int64)
    if split == "train":
        return np.asarray(corpus.train_ids, dtype=np.int64)
    return np.arange(corpus.n_posts, dtype=np.int64)


def corpus_labels(corpus: Corpus, ids: np.ndarray, voter: Voter) -> np.ndarray:
    """The posts' labels as the checkpoints number them; refuses a foreign alphabet."""
    if corpus.alphabet != voter.alphabet:
        raise CheckpointError(
            f"corpus {corpus.path} was encoded with another alphabet than the "
            f"checkpoints'; import it again with the checkpoints' alphabet"
        )
    names = corpus.label_names
    stored = np.asarray(corpus.labels[ids], dtype=np.int64)
    return label_ids([names[i] for i in stored], voter.label_names, str(corpus.path))


def trainer_frames(
    corpus: Corpus, config: dict[str, Any], *, length: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """The trainer's validation frames of a corpus: (codes, post ids, batch size).

    Built by the validation plan and make_batch exactly as the producers build them,
    from the job config stored in the checkpoint (seed, batch size, frame length).
    """
    from trainerd.producers.config import DataConfig
    from trainerd.producers.plans import make_batch, val_plan
    from trainerd.producers.sampling import Sampler

    data = DataConfig.model_validate({**config.get("data", {}), "length": length})
    seed = int(config.get("train", {}).get("seed", 0))
    plan = val_plan(corpus, data, run_id="evaluate", seed=seed, epoch=0, seq=0)
    sampler = Sampler(corpus, data.length, data.batch_size)
    codes = np.zeros((len(plan.ids), data.length), dtype=np.uint8)
    batch = np.zeros((data.batch_size, data.length), dtype=np.uint8)
    row = 0
    for b in range(plan.n_batches):
        rows = make_batch(sampler, plan, b, batch)
        codes[row : row + rows] = batch[:rows]
        row += rows
    assert row == len(plan.ids)
    return codes, np.asarray(plan.ids, dtype=np.int64), data.batch_size


def trainer_frame_probs(voter: Voter, corpus: Corpus) -> np.ndarray:
    """(members, val posts, classes): each checkpoint on its trainer's validation frames.

    Each checkpoint reads the frames its own run validated on (its seed, batch size and
    frame length), in batches of the run's size, so its figures reproduce the run's.
    """
    n = len(corpus.val_ids)
    out = np.empty((len(voter.members), n, len(voter.label_names)), np.float32)
    for i, member in enumerate(voter.members):
        if not isinstance(member.config, dict):
            raise CheckpointError(f"checkpoint {member.path}: holds no job config")
        codes, ids, batch_size = trainer_frames(
            corpus, member.config, length=member.length
        )
        assert np.array_equal(ids, corpus.val_ids)
        out[i] = voter.frame_probs(member, codes, batch_size=batch_size)
    return out
