"""Sampling posts to frames, and the one-hot form of a batch.

A frame of `length` codes is the whole title (cut only when the title alone is longer
than the frame), the newline, then a window of the body, padded with zeros on the
right. Training and validation draw the window's start uniformly; the voter takes the
end of the body. Frames are copied as slices of the corpus (a loop over the posts of
a batch, never over characters) into caller-provided buffers.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from trainerd.producers.corpus import Corpus
from trainerd.producers.encoding import Alphabet


class Window(str, Enum):
    """Where the body window of a frame starts."""

    UNIFORM = "uniform"
    TAIL = "tail"


def frame_codes(
    title: np.ndarray,
    body: np.ndarray,
    length: int,
    *,
    newline: int,
    start: int | None = None,
) -> np.ndarray:
    """The frame of one post, for reference and the voter; `start=None` takes the tail.

    Args:
        title: the title's codes.
        body: the body's codes.
        length: frame length in characters.
        newline: the code of the newline between title and body (0 if none).
        start: first body character of the window; None for the end of the body.
    """
    frame = np.zeros(length, dtype=np.uint8)
    t = min(title.size, length)
    frame[:t] = title[:t]
    if t >= length:
        return frame
    frame[t] = newline
    width = min(body.size, length - t - 1)
    if start is None:
        start = body.size - width
    frame[t + 1 : t + 1 + width] = body[start : start + width]
    return frame


class Sampler:
    """Writes frames of corpus posts into caller-provided arrays, allocation-free.

    Args:
        corpus: the opened store.
        length: frame length.
        batch_size: the most rows one call writes.
    """

    def __init__(self, corpus: Corpus, length: int, batch_size: int) -> None:
        self.corpus = corpus
        self.length = length
        self.batch_size = batch_size
        alphabet = corpus.alphabet
        self.newline = alphabet.code_of("\n")
        # Plain ndarray views: slicing a memmap object costs more than the copy.
        self._codes = np.asarray(corpus.codes)
        self._offsets = np.asarray(corpus.offsets)
        self._title_len = np.asarray(corpus.title_len)
        self.one_hot_table = one_hot_table(alphabet)

    def codes_into(
        self,
        post_ids: np.ndarray,
        out: np.ndarray,
        *,
        window: Window,
        rng: np.random.Generator | None = None,
    ) -> None:
        """Writes the frames of `post_ids` into out[:rows] (uint8, (batch, length)).

        Rows past len(post_ids) are zeroed. `rng` is required for Window.UNIFORM.
        """
        rows, length = len(post_ids), self.length
        ids = np.asarray(post_ids, dtype=np.int64)
        base = self._offsets[ids]
        title_len = self._title_len[ids].astype(np.int64)
        body_len = self._offsets[ids + 1] - base - title_len
        t = np.minimum(title_len, length)
        width = np.clip(length - t - 1, 0, None)
        np.minimum(body_len, width, out=width)
        if window == Window.TAIL:  # a plain "tail" string counts too
            start = body_len - width
        else:
            start = rng.integers(0, body_len - width + 1)
        body_start = base + title_len + start

        # Three slice copies a row: a loop over posts, never over characters.
        codes, newline = self._codes, self.newline
        spans = zip(
            base.tolist(), t.tolist(), body_start.tolist(), width.tolist(), strict=True
        )
        for row, (b, tl, bs, w) in zip(out[:rows], spans, strict=True):
            row[:tl] = codes[b : b + tl]
            if tl < length:
                row[tl] = newline
                row[tl + 1 : tl + 1 + w] = codes[bs : bs + w]
                row[tl + 1 + w :] = 0
        out[rows:] = 0

    def one_hot_into(self, codes: np.ndarray, out: np.ndarray) -> None:
        """Expands (rows, length) codes into out (rows, length, V) uint8."""
        np.take(self.one_hot_table, codes, axis=0, out=out, mode="clip")


def one_hot_table(alphabet: Alphabet) -> np.ndarray:
    """(V + 1, V) uint8: row 0 all zeros, row c has a 1 in column c - 1."""
    table = np.zeros((alphabet.size + 1, alphabet.size), dtype=np.uint8)
    table[1:] = np.eye(alphabet.size, dtype=np.uint8)
    return table
