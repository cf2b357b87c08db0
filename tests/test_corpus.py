"""The corpus store: round trip, atomic writes, damage detection, O(1) opening."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from trainerd.producers.corpus import ARRAYS, FORMAT_VERSION, META, Corpus, CorpusWriter
from trainerd.producers.encoding import Alphabet
from trainerd.producers.errors import CorpusError
from trainerd.producers.importer import build_corpus

POSTS = [
    ("First title", "Body one.", "sport"),
    ("", "no title here", "news"),
    ("Kůň", "", "sport"),
    ("fourth", "line\nbreak", "arts"),
]


def build(path: Path, *, seed: int = 0, force: bool = False) -> Corpus:
    records = [(t, b, lab, f"post {i}") for i, (t, b, lab) in enumerate(POSTS)]
    build_corpus(records, path, val_fraction=0.25, seed=seed, force=force)
    return Corpus.open(path)


def test_round_trip(tmp_path: Path) -> None:
    corpus = build(tmp_path / "c")
    alphabet = Alphabet()
    assert corpus.n_posts == 4
    assert corpus.label_names == ["arts", "news", "sport"]
    assert corpus.labels.tolist() == [2, 1, 2, 0]
    for i, (title, body, _) in enumerate(POSTS):
        t, b = corpus.post_codes(i)
        assert t.tolist() == alphabet.encode(title).tolist()
        assert b.tolist() == alphabet.encode(body).tolist()
    assert corpus.codes[-1] == 0  # the padding sentinel
    assert corpus.offsets.tolist() == [0, 20, 33, 36, 52]
    assert corpus.title_len.tolist() == [11, 0, 3, 6]
    assert sorted([*corpus.train_ids.tolist(), *corpus.val_ids.tolist()]) == [
        0,
        1,
        2,
        3,
    ]
    assert corpus.val_ids.size == 1
    assert corpus.alphabet == alphabet
    assert corpus.meta["format_version"] == FORMAT_VERSION
    assert corpus.meta["n_chars"] == 52


def test_fingerprint_is_stable_and_follows_the_split(tmp_path: Path) -> None:
    a, b = build(tmp_path / "a"), build(tmp_path / "b")
    assert a.fingerprint == b.fingerprint
    other = next(
        c
        for s in range(1, 20)
        if (c := build(tmp_path / f"s{s}", seed=s)).val_ids.tolist()
        != a.val_ids.tolist()
    )
    assert other.fingerprint != a.fingerprint


def test_existing_output_needs_force(tmp_path: Path) -> None:
    build(tmp_path / "c")
    with pytest.raises(CorpusError, match="exists; pass --force"):
        build(tmp_path / "c")
    assert build(tmp_path / "c", force=True).n_posts == 4
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary left over


def test_force_never_replaces_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    with pytest.raises(CorpusError, match="not a corpus store"):
        CorpusWriter(tmp_path / "home", force=True)
    assert (tmp_path / "home" / "notes.txt").read_text() == "keep me"


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    writer = CorpusWriter(tmp_path / "c")
    writer.add(np.array([1, 2], np.uint8), np.array([3], np.uint8), 0)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_open_missing_store(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"no meta\.json there"):
        Corpus.open(tmp_path / "nothing")


def test_open_detects_a_truncated_array(tmp_path: Path) -> None:
    build(tmp_path / "c")
    offsets = tmp_path / "c" / ARRAYS["offsets"][0]
    offsets.write_bytes(offsets.read_bytes()[:-8])
    with pytest.raises(
        CorpusError, match=r"offsets holds 4 entries, meta\.json says 5"
    ):
        Corpus.open(tmp_path / "c")


def test_open_refuses_another_format_version(tmp_path: Path) -> None:
    build(tmp_path / "c")
    meta_path = tmp_path / "c" / META
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorpusError, match="format version 99"):
        Corpus.open(tmp_path / "c")


def fake_store(path: Path, n: int) -> None:
    """A valid store of n four-character posts, written straight from numpy."""
    path.mkdir()
    arrays = {
        "codes": np.append(np.ones(4 * n, np.uint8), np.uint8(0)),
        "offsets": np.arange(n + 1, dtype=np.int64) * 4,
        "title_len": np.ones(n, np.int32),
        "labels": (np.arange(n) % 2).astype(np.int32),
        "train_ids": np.arange(n, dtype=np.int64),
        "val_ids": np.zeros(0, np.int64),
    }
    for name, array in arrays.items():
        (path / ARRAYS[name][0]).write_bytes(array.tobytes())
    meta = {
        "format_version": FORMAT_VERSION,
        "alphabet": Alphabet().to_dict(),
        "label_names": ["a", "b"],
        "n_posts": n,
        "n_train": n,
        "n_val": 0,
        "n_chars": 4 * n,
        "fingerprint": "x",
    }
    (path / META).write_text(json.dumps(meta))


def best_open_s(path: Path) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        corpus = Corpus.open(path)
        best = min(best, time.perf_counter() - started)
        del corpus
    return best


def test_open_time_does_not_grow_with_size(tmp_path: Path) -> None:
    fake_store(tmp_path / "small", 10_000)
    fake_store(tmp_path / "large", 1_000_000)
    small, large = best_open_s(tmp_path / "small"), best_open_s(tmp_path / "large")
    assert small < 0.05
    assert large < 0.05
    corpus = Corpus.open(tmp_path / "large")
    assert corpus.n_posts == 1_000_000
    assert corpus.post_codes(999_999)[1].tolist() == [1, 1, 1]
