"""The voter: classifies posts with one or more trained checkpoints.

Everything needed to encode a post comes from the checkpoint: its alphabet and its
frame length. The voter's frame is the whole title, a newline, then the end of the
body (training draws the body window at random; a new post is read where it ends).
With `windows=N` it also reads N - 1 more windows spread evenly from the start of the
body, the tail always among them, and averages their probabilities.

Several checkpoints vote: `soft` averages their probabilities, `hard` counts each
checkpoint's top label (ties go to the higher mean probability). They must share the
label names and the alphabet; frame lengths may differ, each reads its own. On CUDA
each network runs under the autocast its run trained with (bf16 unless the run set
train.precision: fp32); on the CPU in float32.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from trainerd.model.checkpoint import read_checkpoint
from trainerd.model.net import build_model
from trainerd.model.train import autocast_dtype
from trainerd.producers.encoding import Alphabet
from trainerd.producers.errors import CheckpointError, ConfigError, InputError
from trainerd.producers.sampling import frame_codes

log = logging.getLogger(__name__)

Vote = Literal["soft", "hard"]
VOTES = ("soft", "hard")
# bench/vote.py measured batches of 64 faster than 256 on the CPU (smaller one-hot
# intermediates); on a GPU pass a larger --batch-size.
DEFAULT_BATCH_SIZE = 64
FRAME_CHUNK_POSTS = 4096


@dataclass(frozen=True)
class Member:
    """One checkpoint of a voter: its network in eval mode and its frame length."""

    path: str
    model: nn.Module
    length: int
    val: dict | None = None
    config: dict | None = None
    amp_dtype: torch.dtype | None = None
    corpus_fingerprint: str | None = None


@dataclass(frozen=True)
class Prediction:
    """The vote on one post.

    `probability` is the winning label's probability averaged over checkpoints (and
    windows); `top_k` lists (label, probability) pairs in the vote's order; `votes`,
    for a hard vote only, counts the checkpoints whose top label won.
    """

    label: str
    probability: float
    top_k: list[tuple[str, float]]
    votes: int | None = None


@dataclass(frozen=True)
class Scores:
    """The vote on a batch of posts, as arrays.

    Attributes:
        probs: (posts, classes) probabilities averaged over checkpoints and windows.
        order: (posts, classes) class ids from the winner down, as the vote ranks them.
        votes: (posts, classes) checkpoints whose top label each class is (hard only).
    """

    probs: np.ndarray
    order: np.ndarray
    votes: np.ndarray | None = None

    @property
    def predicted(self) -> np.ndarray:
        """(posts,) the winning class id of each post."""
        return self.order[:, 0]


@dataclass
class Voter:
    """Checkpoints that classify posts together; build one with `from_checkpoints`."""

    members: list[Member]
    alphabet: Alphabet
    label_names: list[str]
    device: torch.device
    _tables: dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_checkpoints(
        cls, paths: Sequence[str | os.PathLike], *, device: str = "auto"
    ) -> Voter:
        """Loads checkpoints (weights-only) and checks they can vote together.

        Raises CheckpointError for an unreadable file or checkpoints whose label names
        or alphabets differ, naming the difference.
        """
        if not paths:
            raise ConfigError("vote: give at least one checkpoint with -m")
        target = resolve_device(device)
        first: tuple[str, dict] | None = None
        members = []
        for path in paths:
            payload = read_checkpoint(path)
            if first is None:
                first = (str(path), payload)
            else:
                _check_compatible(first, (str(path), payload))
            members.append(_member(str(path), payload, target))
        assert first is not None
        return cls(
            members=members,
            alphabet=Alphabet.from_dict(first[1]["alphabet"]),
            label_names=list(first[1]["label_names"]),
            device=target,
        )

    @property
    def lengths(self) -> list[int]:
        """The distinct frame lengths of the members, in member order."""
        return list(dict.fromkeys(m.length for m in self.members))

    def encode(self, posts: Iterable[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(title codes, body codes) of each post, with the checkpoints' alphabet.

        A post is a mapping with "title" and "text", or a (title, text, ...) sequence.
        """
        encode = self.alphabet.encode
        return [
            (encode(title), encode(text))
            for title, text in (post_text(p, i) for i, p in enumerate(posts))
        ]

    def frames(
        self,
        encoded: Sequence[tuple[np.ndarray, np.ndarray]],
        *,
        length: int,
        windows: int = 1,
    ) -> np.ndarray:
        """(posts * windows, length) uint8 frames: each post's windows, tail last."""
        if windows < 1:
            raise ConfigError(f"vote: --windows must be >= 1, got {windows}")
        newline = self.alphabet.code_of("\n")
        out = np.zeros((len(encoded) * windows, length), dtype=np.uint8)
        row = 0
        for title, body in encoded:
            for start in window_starts(title.size, body.size, length, windows):
                out[row] = frame_codes(
                    title, body, length, newline=newline, start=start
                )
                row += 1
        return out

    def member_probs(
        self,
        encoded: Sequence[tuple[np.ndarray, np.ndarray]],
        *,
        windows: int = 1,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> np.ndarray:
        """(members, posts, classes) probabilities, each averaged over its windows."""
        n, n_classes = len(encoded), len(self.label_names)
        out = np.empty((len(self.members), n, n_classes), np.float32)
        # Frames are built a chunk of posts at a time, so their memory stays bounded.
        for lo in range(0, n, FRAME_CHUNK_POSTS):
            chunk = encoded[lo : lo + FRAME_CHUNK_POSTS]
            for length in self.lengths:
                codes = self.frames(chunk, length=length, windows=windows)
                for i, member in enumerate(self.members):
                    if member.length != length:
                        continue
                    probs = self.frame_probs(member, codes, batch_size=batch_size)
                    # (posts * windows, C) -> (posts, windows, C) -> mean over windows
                    probs = probs.reshape(len(chunk), windows, n_classes)
                    out[i, lo : lo + len(chunk)] = probs.mean(axis=1)
        return out

    def frame_probs(
        self,
        member: Member,
        codes: np.ndarray,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> np.ndarray:
        """(rows, classes) float32 softmax of one member over frames of codes."""
        table = self._one_hot_table()
        out = np.empty((codes.shape[0], len(self.label_names)), dtype=np.float32)
        with torch.inference_mode():
            for lo in range(0, codes.shape[0], batch_size):
                chunk = torch.from_numpy(codes[lo : lo + batch_size])
                chunk = chunk.to(self.device, non_blocking=True).long()
                # (B, L) codes -> (B, L, V) one-hot -> (B, V, L), contiguous as the
                # trainer feeds it, so the same frames give the same figures
                x = table[chunk].permute(0, 2, 1).contiguous()
                with amp(member):
                    logits = member.model(x).float()
                out[lo : lo + len(chunk)] = torch.softmax(logits, 1).cpu().numpy()
        return out

    def scores(
        self,
        posts: Sequence[Any],
        *,
        windows: int = 1,
        vote: Vote = "soft",
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> Scores:
        """Votes on posts and returns the result as arrays."""
        if vote not in VOTES:
            raise ConfigError(f"vote: --vote must be soft or hard, got {vote!r}")
        encoded = self.encode(posts)
        member_probs = self.member_probs(
            encoded, windows=windows, batch_size=batch_size
        )
        return combine(member_probs, vote=vote)

    def predict(
        self,
        posts: Sequence[Any],
        *,
        top_k: int = 3,
        windows: int = 1,
        vote: Vote = "soft",
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> list[Prediction]:
        """Classifies posts: one Prediction per post, in input order."""
        if top_k < 1:
            raise ConfigError(f"vote: --top-k must be >= 1, got {top_k}")
        s = self.scores(posts, windows=windows, vote=vote, batch_size=batch_size)
        names = self.label_names
        k = min(top_k, len(names))
        out = []
        for i in range(s.probs.shape[0]):
            ranked = s.order[i, :k]
            pairs = [(names[c], float(s.probs[i, c])) for c in ranked]
            votes = None if s.votes is None else int(s.votes[i, ranked[0]])
            out.append(Prediction(pairs[0][0], pairs[0][1], pairs, votes))
        return out

    def _one_hot_table(self) -> torch.Tensor:
        """(V + 1, V) float32 on the device: row 0 zeros, row c one-hot at c - 1."""
        table = self._tables.get(self.device)
        if table is None:
            size = self.alphabet.size
            table = torch.zeros(size + 1, size, device=self.device)
            table[1:] = torch.eye(size, device=self.device)
            self._tables[self.device] = table
        return table


def amp(member: Member) -> Any:
    """Autocast as the member's run validated: bf16 on CUDA unless it trained fp32."""
    if member.amp_dtype is None:
        return nullcontext()
    return torch.autocast(next(member.model.parameters()).device.type, member.amp_dtype)


def combine(member_probs: np.ndarray, *, vote: Vote) -> Scores:
    """Turns (members, posts, classes) probabilities into one vote per post."""
    probs = member_probs.mean(axis=0)
    if vote == "soft":
        # Stable sort on the negated values: equal probabilities keep label order.
        return Scores(probs=probs, order=np.argsort(-probs, axis=1, kind="stable"))
    top = member_probs.argmax(axis=2)  # (members, posts)
    votes = np.zeros(probs.shape, dtype=np.int64)
    for member_top in top:
        votes[np.arange(probs.shape[0]), member_top] += 1
    # Rank by votes, then mean probability: probabilities lie in [0, 1], so adding
    # them to twice the vote count never reorders different vote counts.
    key = 2.0 * votes + probs
    order = np.argsort(-key, axis=1, kind="stable")
    return Scores(probs=probs, order=order, votes=votes)


def window_starts(
    title_len: int, body_len: int, length: int, windows: int
) -> list[int]:
    """Body offsets of a post's windows, spread from the start to the tail (last)."""
    t = min(title_len, length)
    width = min(body_len, max(length - t - 1, 0))
    tail = body_len - width
    if windows == 1:
        return [tail]
    return np.linspace(0, tail, windows).round().astype(int).tolist()


def post_text(post: Any, index: int) -> tuple[str, str]:
    """(title, text) of a post; InputError naming the post when either is missing."""
    if isinstance(post, Mapping):
        for name in ("title", "text"):
            if name not in post:
                raise InputError(f"post {index + 1}: has no {name!r} field")
        title, text = post["title"], post["text"]
    elif isinstance(post, (tuple, list)) and len(post) >= 2:
        title, text = post[0], post[1]
    else:
        raise InputError(
            f"post {index + 1}: expected a mapping with title and text, or a "
            f"(title, text) pair, got {type(post).__name__}"
        )
    for name, value in (("title", title), ("text", text)):
        if not isinstance(value, str):
            raise InputError(
                f"post {index + 1}: the {name} must be a string, "
                f"got {type(value).__name__}"
            )
    return title, text


def resolve_device(device: str) -> torch.device:
    """auto picks CUDA when present; cuda:N is checked against the devices there."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(
            f"--device: must be auto, cpu, cuda or cuda:N, got {device!r}"
        ) from err
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available here")
        if (target.index or 0) >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)"
            )
    elif target.type != "cpu":
        raise ConfigError(
            f"--device: must be auto, cpu, cuda or cuda:N, got {device!r}"
        )
    return target


def _member(path: str, payload: dict, device: torch.device) -> Member:
    spec = payload["model"]
    try:
        model = build_model(**spec)
        model.load_state_dict(payload["model_state"])
    except (TypeError, KeyError, RuntimeError, ConfigError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path}: its weights do not fit its model entry ({reason[:160]})"
        ) from err
    model.to(device).eval()
    config = payload.get("config")
    train = config.get("train", {}) if isinstance(config, dict) else {}
    precision = str(train.get("precision", "auto"))
    return Member(
        path=path,
        model=model,
        length=int(payload["length"]),
        val=payload.get("val"),
        config=config,
        amp_dtype=autocast_dtype(precision, device),
        corpus_fingerprint=payload.get("corpus_fingerprint"),
    )


def _check_compatible(first: tuple[str, dict], other: tuple[str, dict]) -> None:
    """Refuses checkpoints that cannot vote together, naming what differs."""
    (path_a, a), (path_b, b) = first, other
    labels_a, labels_b = list(a["label_names"]), list(b["label_names"])
    if labels_a != labels_b:
        only_a = [x for x in labels_a if x not in labels_b]
        only_b = [x for x in labels_b if x not in labels_a]
        if only_a or only_b:
            detail = f"only in {path_a}: {only_a}; only in {path_b}: {only_b}"
        else:
            detail = "the same labels in another order (ids would not match)"
        raise CheckpointError(
            f"checkpoints {path_a} and {path_b} have different label sets: {detail}"
        )
    alpha_a = Alphabet.from_dict(a["alphabet"])
    alpha_b = Alphabet.from_dict(b["alphabet"])
    if alpha_a != alpha_b:
        raise CheckpointError(
            f"checkpoints {path_a} and {path_b} have different alphabets: "
            f"{_alphabet_difference(alpha_a, alpha_b, path_a, path_b)}"
        )


def _alphabet_difference(a: Alphabet, b: Alphabet, name_a: str, name_b: str) -> str:
    if a.lowercase != b.lowercase:
        return f"lowercase {a.lowercase} in {name_a}, {b.lowercase} in {name_b}"
    only_a = "".join(c for c in a.symbols if c not in b.symbols)
    only_b = "".join(c for c in b.symbols if c not in a.symbols)
    if only_a or only_b:
        return f"only in {name_a}: {only_a!r}; only in {name_b}: {only_b!r}"
    return "the same symbols in another order (codes would not match)"
