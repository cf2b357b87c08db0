"""Batches made in the trainer's own process, without producers or rings.

The same `make_batch` the producers run fills one reused buffer here, so these
batches equal the pipeline's bit for bit. Tests use them as the reference, the
benchmark uses them to measure the step without the pipeline, and a job may run
this way where shared memory is not available.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from trainerd.producers.config import DataConfig
from trainerd.producers.corpus import Corpus
from trainerd.producers.plans import Plan, make_batch
from trainerd.producers.sampling import Sampler


@dataclass
class LocalBatch:
    """A batch with the fields of producers.pipeline.Batch; release does nothing."""

    plan: Plan
    index: int
    rows: int
    wire: str
    data: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def release(self) -> None:
        """Nothing to hand back: the buffer is reused for the next batch."""


def local_stream(
    corpus: Corpus, data: DataConfig, plans: Iterable[Plan]
) -> Iterator[LocalBatch]:
    """Yields every batch of each plan in order, like Pipeline.stream.

    Each batch's arrays are overwritten by the next one, as a ring slot would be.
    """
    sampler = Sampler(corpus, data.length, data.batch_size)
    size, length, width = data.batch_size, data.length, corpus.alphabet.size
    codes = np.zeros((size, length), dtype=np.uint8)
    onehot = np.zeros((size, length, width), dtype=np.uint8)
    labels = np.zeros(size, dtype=np.int64)
    ids = np.zeros(size, dtype=np.int64)
    for plan in plans:
        for b in range(plan.start_batch, plan.n_batches):
            if data.wire == "codes":
                rows = make_batch(
                    sampler, plan, b, codes, labels_out=labels, ids_out=ids
                )
                out = codes
            else:
                rows = make_batch(
                    sampler, plan, b, codes, onehot, labels_out=labels, ids_out=ids
                )
                out = onehot
            yield LocalBatch(
                plan, b, rows, data.wire, out[:rows], labels[:rows], ids[:rows]
            )
