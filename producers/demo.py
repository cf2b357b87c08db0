"""The built-in demo corpus: synthetic labelled posts, deterministic by seed.

Four topics each own a list of words; every post mixes its topic's words into a larger
share of filler words common to all topics, and now and then borrows a word from
another topic, so a model must read several words to be sure. Titles are short and
lean on the topic more than bodies do. `make demo` and the fast tests use it, so the
main job runs on a machine with no data at hand.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from trainerd.producers.importer import Post, Summary, build_corpus

TOPIC_WORDS = {
    "orbit": (
        "rocket launch orbit booster capsule lander crater comet asteroid telescope "
        "payload thruster satellite nebula lunar solar eclipse gravity astronaut "
        "countdown mission module docking hatch propellant apogee spacewalk probe "
        "meteor galaxy"
    ),
    "kitchen": (
        "recipe oven simmer garlic onion butter flour dough bake roast saucepan "
        "skillet pepper basil pasta broth whisk knead yeast vinegar lemon crust "
        "stew ginger noodle dumpling spatula marinade caramel herbs"
    ),
    "pitch": (
        "goal striker keeper referee penalty corner league season midfield tackle "
        "offside derby stadium coach transfer header dribble fixture trophy kickoff "
        "defender winger captain substitute halftime squad volley crossbar fans "
        "whistle"
    ),
    "circuit": (
        "compiler kernel driver firmware router cache thread socket buffer patch "
        "debugger terminal script module server packet checksum register memory "
        "processor binary install upgrade laptop keyboard monitor cable voltage "
        "resistor solder"
    ),
}
FILLER_WORDS = (
    "the a an and or but so then when while because if this that these those it "
    "they we you i he she our your their my is was are were be been have has had "
    "do did will would can could should just really quite very some many few more "
    "most other another new old good bad big small first last next still again "
    "today yesterday week year time day people thing way idea question answer help "
    "think know want need try use make take give look find tell ask seem feel "
    "anyone everyone here there about after before over under with without from "
    "into onto around"
)
TOPICS = {name: tuple(words.split()) for name, words in TOPIC_WORDS.items()}
FILLER = tuple(FILLER_WORDS.split())
PUNCTUATION = (".", ".", ".", "!", "?")
TOPIC_SHARE_TITLE = 0.45
TOPIC_SHARE_BODY = 0.18
BORROW_SHARE = 0.04  # a word from another topic, so no single word decides


def _words(
    rng: np.random.Generator, topic: int, n: int, share: float, vocab: list
) -> list[str]:
    """n words: the topic's own with probability `share`, else filler or borrowed."""
    kind = rng.random(n)
    picks = rng.integers(0, 1 << 30, size=n)
    other = (topic + 1 + rng.integers(0, len(vocab) - 1, size=n)) % len(vocab)
    words = []
    for k, p, o in zip(kind.tolist(), picks.tolist(), other.tolist(), strict=True):
        if k < share:
            source = vocab[topic]
        elif k < share + BORROW_SHARE:
            source = vocab[o]
        else:
            source = FILLER
        words.append(source[p % len(source)])
    return words


def demo_posts(n_posts: int, *, seed: int = 0) -> Iterator[Post]:
    """Yields n_posts synthetic posts: (title, text, label, where)."""
    rng = np.random.default_rng(seed)
    names = list(TOPICS)
    vocab = [list(TOPICS[n]) for n in names]
    topics = rng.integers(0, len(names), size=n_posts)
    for i, topic in enumerate(topics.tolist()):
        title_words = _words(
            rng, topic, int(rng.integers(3, 9)), TOPIC_SHARE_TITLE, vocab
        )
        title = " ".join(title_words).capitalize()
        sentences = []
        for _ in range(int(rng.integers(1, 7))):
            words = _words(
                rng, topic, int(rng.integers(5, 15)), TOPIC_SHARE_BODY, vocab
            )
            mark = PUNCTUATION[int(rng.integers(0, len(PUNCTUATION)))]
            sentences.append(" ".join(words).capitalize() + mark)
        # Paragraph breaks now and then, so bodies hold newlines as real posts do.
        body = ""
        for s in sentences:
            body += s + ("\n" if rng.random() < 0.2 else " ")
        yield title, body.strip(), names[topic], f"demo post {i}"


def demo_records(n_posts: int, *, seed: int = 0) -> list[dict[str, str]]:
    """The demo posts as dicts of title, text and label (to write as test sources)."""
    return [
        {"title": t, "text": x, "label": label}
        for t, x, label, _ in demo_posts(n_posts, seed=seed)
    ]


def write_demo_corpus(
    out: str | os.PathLike,
    *,
    n_posts: int = 4000,
    seed: int = 0,
    val_fraction: float = 0.2,
    force: bool = False,
) -> Path:
    """Generates the demo posts and writes them as a corpus store at `out`.

    Args:
        out: the store directory to create.
        n_posts: posts to generate, both splits.
        seed: seed of the generator and of the split.
        val_fraction: share of the posts drawn for validation.
        force: replace an existing store at `out`.
    """
    return build_demo_corpus(
        out, n_posts=n_posts, seed=seed, val_fraction=val_fraction, force=force
    ).out


def build_demo_corpus(
    out: str | os.PathLike,
    *,
    n_posts: int = 4000,
    seed: int = 0,
    val_fraction: float = 0.2,
    force: bool = False,
) -> Summary:
    """As write_demo_corpus, returning the import's summary."""
    recipe = f"trainerd-demo:n_posts={n_posts}:seed={seed}"
    meta = {
        "source": {"demo": {"n_posts": n_posts, "seed": seed}},
        "source_fingerprint": hashlib.sha256(recipe.encode()).hexdigest(),
        "bad_bytes": 0,
    }
    return build_corpus(
        demo_posts(n_posts, seed=seed),
        out,
        val_fraction=val_fraction,
        seed=seed,
        force=force,
        meta=meta,
    )
