"""Shared fixtures: the demo corpus, and real data from ../shared/data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainerd.producers.demo import write_demo_corpus
from trainerd.producers.importer import import_corpus

DEMO_POSTS = 2000


def shared_data_dir() -> Path:
    """The real-data folder: $TRAINERD_DATA_DIR, else shared/data beside the repo."""
    env = os.environ.get("TRAINERD_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo store: 2000 posts, 4 classes, a fifth of them for validation."""
    out = tmp_path_factory.mktemp("demo") / "corpus"
    return write_demo_corpus(out, n_posts=DEMO_POSTS, seed=0, val_fraction=0.2)


@pytest.fixture(scope="session")
def newsgroups_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 Newsgroups (bydate): train, with test as the validation split."""
    source = shared_data_dir() / "20newsgroups-bydate"
    train, test = source / "train.jsonl.gz", source / "test.jsonl.gz"
    if not (train.is_file() and test.is_file()):
        pytest.skip(f"no 20 Newsgroups data under {source}")
    out = tmp_path_factory.mktemp("20ng") / "corpus"
    import_corpus(train, out, val_source=test, progress=False)
    return out
