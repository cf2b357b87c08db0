"""Frames and the one-hot form: hand-computed values, and the vectorised Sampler
against the one-post reference for many random posts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainerd.producers.corpus import Corpus, CorpusWriter
from trainerd.producers.encoding import Alphabet
from trainerd.producers.sampling import Sampler, Window, frame_codes, one_hot_table

NL = 69  # the newline's code in the default alphabet
ALPHABET = Alphabet()


def enc(text: str) -> np.ndarray:
    return ALPHABET.encode(text)


def make_corpus(path: Path, posts: list[tuple[str, str]]) -> Corpus:
    """A store of the given (title, body) posts, all in training, two labels."""
    writer = CorpusWriter(path)
    for i, (title, body) in enumerate(posts):
        writer.add(enc(title), enc(body), i % 2)
    writer.finish(
        train_ids=np.arange(len(posts)),
        val_ids=np.arange(0),
        meta={"alphabet": ALPHABET.to_dict(), "label_names": ["c0", "c1"]},
    )
    return Corpus.open(path)


def test_hand_computed_tail_frame() -> None:
    frame = frame_codes(enc("ab"), enc("cdef"), 6, newline=NL)
    assert frame.tolist() == [1, 2, NL, 4, 5, 6]


def test_hand_computed_frame_padded_on_the_right() -> None:
    frame = frame_codes(enc("ab"), enc("cd"), 8, newline=NL)
    assert frame.tolist() == [1, 2, NL, 3, 4, 0, 0, 0]


def test_window_start_picks_the_body_slice() -> None:
    frame = frame_codes(enc("ab"), enc("cdef"), 6, newline=NL, start=0)
    assert frame.tolist() == [1, 2, NL, 3, 4, 5]


def test_title_longer_than_frame_is_cut_without_newline() -> None:
    frame = frame_codes(enc("abcdefgh"), enc("xyz"), 5, newline=NL)
    assert frame.tolist() == [1, 2, 3, 4, 5]


def test_title_filling_all_but_one_column_keeps_the_newline() -> None:
    frame = frame_codes(enc("abcd"), enc("xyz"), 5, newline=NL)
    assert frame.tolist() == [1, 2, 3, 4, NL]


def test_empty_title_and_empty_body() -> None:
    assert frame_codes(enc(""), enc("ab"), 4, newline=NL).tolist() == [NL, 1, 2, 0]
    assert frame_codes(enc("ab"), enc(""), 4, newline=NL).tolist() == [1, 2, NL, 0]


def test_one_hot_table_row_zero_is_all_zero() -> None:
    table = one_hot_table(ALPHABET)
    assert table.shape == (70, 69)
    assert table.dtype == np.uint8
    assert not table[0].any()
    assert (table[1:] == np.eye(69, dtype=np.uint8)).all()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    posts = [("ab", "cdefghij"), ("", "xyz"), ("abcdefghijkl", "mn"), ("q", "")]
    return make_corpus(tmp_path_factory.mktemp("small") / "c", posts)


def test_sampler_tail_hand_computed(small: Corpus) -> None:
    sampler = Sampler(small, 8, 6)
    out = np.full((6, 8), 77, dtype=np.uint8)
    sampler.codes_into(np.array([0, 1, 2, 3]), out, window=Window.TAIL)
    assert out.tolist() == [
        [1, 2, NL, 6, 7, 8, 9, 10],  # the voter takes the body's exact tail
        [NL, 24, 25, 26, 0, 0, 0, 0],
        [1, 2, 3, 4, 5, 6, 7, 8],  # title cut to the frame
        [17, NL, 0, 0, 0, 0, 0, 0],
        [0] * 8,  # rows past the posts are zeroed
        [0] * 8,
    ]


def test_sampler_accepts_plain_tail_string(small: Corpus) -> None:
    sampler = Sampler(small, 8, 1)
    out = np.zeros((1, 8), dtype=np.uint8)
    sampler.codes_into(np.array([0]), out, window="tail")
    assert out[0].tolist() == [1, 2, NL, 6, 7, 8, 9, 10]


def test_uniform_window_keeps_title_and_covers_every_start(small: Corpus) -> None:
    sampler = Sampler(small, 6, 64)
    out = np.zeros((64, 6), dtype=np.uint8)
    sampler.codes_into(
        np.zeros(64, dtype=np.int64),
        out,
        window=Window.UNIFORM,
        rng=np.random.default_rng(1),
    )
    assert (out[:, :3] == [1, 2, NL]).all()
    starts = {int(row[3]) - 3 for row in out}  # body "cdefghij": c is code 3
    assert starts == {0, 1, 2, 3, 4, 5}
    for row in out:
        s = int(row[3]) - 3
        assert row[3:].tolist() == [3 + s, 4 + s, 5 + s]


def random_posts(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    letters = np.array(list("abcdefghij k\n,é€"))
    posts = []
    for _ in range(n):
        kind = rng.integers(0, 6)
        t = 0 if kind == 0 else int(rng.integers(0, 200 if kind == 1 else 20))
        b = 0 if kind == 2 else int(rng.integers(0, 400))
        posts.append(("".join(rng.choice(letters, t)), "".join(rng.choice(letters, b))))
    return posts


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    posts = random_posts(np.random.default_rng(7), 300)
    return make_corpus(tmp_path_factory.mktemp("varied") / "c", posts)


@pytest.mark.parametrize("length", [1, 16, 64, 128])
def test_sampler_tail_equals_reference(varied: Corpus, length: int) -> None:
    batch = 32
    sampler = Sampler(varied, length, batch)
    out = np.zeros((batch, length), dtype=np.uint8)
    for first in range(0, varied.n_posts, batch):
        ids = np.arange(first, min(first + batch, varied.n_posts))
        sampler.codes_into(ids, out, window=Window.TAIL)
        for row, post in enumerate(ids):
            title, body = varied.post_codes(int(post))
            expected = frame_codes(title, body, length, newline=NL)
            assert out[row].tolist() == expected.tolist()


@pytest.mark.parametrize("length", [1, 16, 64, 128])
def test_sampler_uniform_equals_reference(varied: Corpus, length: int) -> None:
    ids = np.random.default_rng(3).permutation(varied.n_posts)[:100]
    sampler = Sampler(varied, length, 100)
    out = np.zeros((100, length), dtype=np.uint8)
    sampler.codes_into(ids, out, window=Window.UNIFORM, rng=np.random.default_rng(5))

    # The window starts are one draw of integers(0, body_len - width + 1).
    t = np.minimum(varied.title_len[ids], length)
    body_len = varied.offsets[ids + 1] - varied.offsets[ids] - varied.title_len[ids]
    width = np.minimum(body_len, np.clip(length - t - 1, 0, None))
    starts = np.random.default_rng(5).integers(0, body_len - width + 1)
    for row, post in enumerate(ids):
        title, body = varied.post_codes(int(post))
        expected = frame_codes(title, body, length, newline=NL, start=int(starts[row]))
        assert out[row].tolist() == expected.tolist()
        n = int(t[row])
        assert out[row, :n].tolist() == title[:n].tolist()  # title preserved


def test_one_hot_agrees_with_codes(varied: Corpus) -> None:
    length, batch = 64, 50
    sampler = Sampler(varied, length, batch)
    codes = np.zeros((batch, length), dtype=np.uint8)
    sampler.codes_into(
        np.arange(batch), codes, window=Window.UNIFORM, rng=np.random.default_rng(0)
    )
    onehot = np.full((batch, length, ALPHABET.size), 9, dtype=np.uint8)
    sampler.one_hot_into(codes, onehot)
    assert set(np.unique(onehot).tolist()) <= {0, 1}
    assert (onehot.sum(axis=2) == (codes > 0)).all()
    decoded = np.where(onehot.any(axis=2), onehot.argmax(axis=2) + 1, 0)
    assert (decoded == codes).all()
