"""The built-in demo corpus: deterministic, four classes, fast, learnable."""

from __future__ import annotations

import collections
import time
from pathlib import Path

from trainerd.producers.corpus import Corpus
from trainerd.producers.demo import TOPICS, demo_posts, demo_records, write_demo_corpus


def test_same_seed_same_posts() -> None:
    assert list(demo_posts(50, seed=4)) == list(demo_posts(50, seed=4))
    assert list(demo_posts(50, seed=4)) != list(demo_posts(50, seed=5))


def test_records_hold_title_text_label() -> None:
    records = demo_records(20, seed=1)
    assert len(records) == 20
    assert all(set(r) == {"title", "text", "label"} for r in records)
    assert {r["label"] for r in demo_records(200)} == set(TOPICS)


def test_fixture_store(demo_corpus: Path) -> None:
    corpus = Corpus.open(demo_corpus)
    assert corpus.n_posts == 2000
    assert corpus.label_names == ["circuit", "kitchen", "orbit", "pitch"]
    assert (corpus.train_ids.size, corpus.val_ids.size) == (1600, 400)
    assert min(corpus.meta["class_counts"]["val"]) > 50
    assert corpus.meta["source"]["demo"] == {"n_posts": 2000, "seed": 0}


def test_same_seed_same_fingerprint(tmp_path: Path) -> None:
    a = Corpus.open(write_demo_corpus(tmp_path / "a", n_posts=300, seed=2))
    b = Corpus.open(write_demo_corpus(tmp_path / "b", n_posts=300, seed=2))
    c = Corpus.open(write_demo_corpus(tmp_path / "c", n_posts=300, seed=3))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.codes.tobytes() == b.codes.tobytes()


def test_four_thousand_posts_in_well_under_two_seconds(tmp_path: Path) -> None:
    started = time.perf_counter()
    out = write_demo_corpus(tmp_path / "d", n_posts=4000, seed=0)
    assert time.perf_counter() - started < 2.0
    assert Corpus.open(out).n_posts == 4000


def test_learnable_but_not_trivial() -> None:
    # Counting topic words in the title names the right class most of the time,
    # never always: filler dominates and other topics' words creep in.
    owner = {word: name for name, words in TOPICS.items() for word in words}
    right = 0
    posts = list(demo_posts(1000, seed=0))
    for title, _, label, _ in posts:
        votes = collections.Counter(
            owner[w] for w in title.lower().split() if w in owner
        )
        right += bool(votes) and votes.most_common(1)[0][0] == label
    assert 0.75 < right / len(posts) < 0.99
