"""Epoch plans and make_batch: the pure definition of every batch's content."""

from __future__ import annotations

import numpy as np
import pytest

from trainerd.producers.config import DataConfig
from trainerd.producers.corpus import Corpus, CorpusWriter
from trainerd.producers.encoding import Alphabet
from trainerd.producers.plans import Plan, make_batch, train_plan, val_plan
from trainerd.producers.sampling import Sampler, Window, frame_codes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    alphabet = Alphabet()
    rng = np.random.default_rng(5)
    writer = CorpusWriter(tmp_path_factory.mktemp("plans") / "corpus")
    for i in range(103):
        body = " ".join(f"w{i}x{j}" for j in range(int(rng.integers(0, 30))))
        writer.add(alphabet.encode(f"post {i}"), alphabet.encode(body), i % 4)
    path = writer.finish(
        train_ids=np.arange(0, 83),
        val_ids=np.arange(83, 103),
        meta={"alphabet": alphabet.to_dict(), "label_names": list("abcd")},
    )
    return Corpus.open(path)


def plan_args(**kw: object) -> dict:
    return {"run_id": "r", "seed": 7, "epoch": 0, "seq": 0, **kw}


def test_train_plan_is_a_seeded_permutation_with_the_short_batch_kept(corpus: Corpus):
    cfg = DataConfig(length=32, batch_size=10)
    plan = train_plan(corpus, cfg, **plan_args())
    again = train_plan(corpus, cfg, **plan_args())
    other = train_plan(corpus, cfg, **plan_args(epoch=1))

    assert sorted(plan.ids.tolist()) == list(range(83))
    assert np.array_equal(plan.ids, again.ids)
    assert not np.array_equal(plan.ids, other.ids)
    assert plan.n_batches == 9
    assert [plan.batch_rows(b) for b in (0, 8)] == [10, 3]
    assert plan.batch_ids(8).tolist() == plan.ids[80:].tolist()


def test_drop_last_drops_only_the_short_training_batch(corpus: Corpus):
    cfg = DataConfig(length=32, batch_size=10, drop_last=True)
    plan = train_plan(corpus, cfg, **plan_args())
    val = val_plan(corpus, cfg, **plan_args(seq=1))

    assert plan.n_batches == 8 and plan.ids.size == 80
    assert val.n_batches == 2 and val.ids.tolist() == list(range(83, 103))


def test_validation_windows_do_not_depend_on_the_epoch(corpus: Corpus):
    cfg = DataConfig(length=32, batch_size=8)
    v0 = val_plan(corpus, cfg, **plan_args(epoch=0))
    v5 = val_plan(corpus, cfg, **plan_args(epoch=5, seq=9))
    t0 = train_plan(corpus, cfg, **plan_args(epoch=0))
    t1 = train_plan(corpus, cfg, **plan_args(epoch=1))

    assert v0.batch_rng(2).integers(1 << 30) == v5.batch_rng(2).integers(1 << 30)
    assert t0.batch_rng(2).integers(1 << 30) != t1.batch_rng(2).integers(1 << 30)
    assert v0.batch_rng(1).integers(1 << 30) != v0.batch_rng(2).integers(1 << 30)
    assert v0.window is Window.UNIFORM and t0.window is Window.UNIFORM


def test_make_batch_matches_the_reference_frame_of_each_post(corpus: Corpus):
    cfg = DataConfig(length=40, batch_size=8)
    plan = train_plan(corpus, cfg, **plan_args())
    sampler = Sampler(corpus, 40, 8)
    codes = np.full((8, 40), 99, dtype=np.uint8)
    onehot = np.zeros((8, 40, corpus.alphabet.size), dtype=np.uint8)
    labels = np.zeros(8, dtype=np.int64)
    ids = np.zeros(8, dtype=np.int64)

    b = plan.n_batches - 1
    rows = make_batch(sampler, plan, b, codes, onehot, labels_out=labels, ids_out=ids)

    assert rows == 83 - 8 * b == 3
    assert ids[:rows].tolist() == plan.batch_ids(b).tolist()
    assert labels[:rows].tolist() == [i % 4 for i in plan.batch_ids(b)]
    assert not codes[rows:].any()
    newline = corpus.alphabet.code_of("\n")
    for row, post in enumerate(plan.batch_ids(b)):
        title, body = corpus.post_codes(int(post))
        width = min(body.size, 40 - title.size - 1)
        starts = [
            s
            for s in range(body.size - width + 1)
            if np.array_equal(
                frame_codes(title, body, 40, newline=newline, start=s), codes[row]
            )
        ]
        assert starts, f"row {row}: not a frame of post {post}"
        expanded = np.argmax(onehot[row], axis=1) + 1
        expanded[onehot[row].sum(axis=1) == 0] = 0
        assert expanded.tolist() == codes[row].tolist()
    again = np.zeros_like(codes)
    make_batch(sampler, plan, b, again)
    assert np.array_equal(again, codes)


def test_plan_wire_form_round_trips(corpus: Corpus):
    cfg = DataConfig(length=32, batch_size=10)
    plan = train_plan(corpus, cfg, **plan_args(start_batch=3, seq=4))

    back, head = Plan.from_frames(*plan.to_frames(prev=3))

    assert head["prev"] == 3
    assert back.header() == plan.header()
    assert np.array_equal(back.ids, plan.ids) and back.ids.dtype == np.int64


def test_start_batch_out_of_range_is_refused(corpus: Corpus):
    cfg = DataConfig(length=32, batch_size=10)
    with pytest.raises(ValueError, match=r"start_batch must be in 0\.\.9, got 10"):
        train_plan(corpus, cfg, **plan_args(start_batch=10))
