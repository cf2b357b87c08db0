"""trainerctl vote and evaluate: classify posts with trained checkpoints.

`vote` reads posts (JSON lines, CSV or pickle, as import reads them; `-` for standard
input) and writes one JSON line per post: its id (the post's `id` field, else its
1-based record number in every format), the label, its probability and the top k
labels. `evaluate` scores
labelled posts, or a corpus store's split, and prints accuracy, macro-F1, a per-class
table and the confusion matrix. Both work locally; no daemon is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainerd.producers.errors import ConfigError, InputError

log = logging.getLogger(__name__)

# Posts read and classified per round, so a large input never sits in memory whole.
CHUNK_POSTS = 4096
GZIP_MAGIC = b"\x1f\x8b"
PICKLE_PROTOCOL_OPCODE = 0x80


@dataclass(frozen=True)
class InputPost:
    """A post as the voter reads it: label None when the input has none."""

    id: Any
    title: str
    text: str
    label: str | None


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `vote` and `evaluate` to trainerctl."""
    vote = sub.add_parser(
        "vote",
        help="classify posts with one or more checkpoints",
        description="Classify posts (JSON lines, CSV or pickle; '-' for stdin) and "
        "write one JSON line per post: id, label, probability, top_k. The id is the "
        "post's --id-field, or else its record number counted from 1 (the first post "
        "of a JSON lines, CSV or pickle file is 1, whatever its line).",
    )
    _common(vote, "INPUT", "posts to classify")
    vote.add_argument(
        "-o",
        "--output",
        default="-",
        help="JSON lines out, not the input file (default -: stdout)",
    )
    vote.add_argument(
        "--top-k",
        type=int,
        default=3,
        metavar="K",
        help="labels listed per post (default %(default)s)",
    )
    vote.set_defaults(func=vote_command)

    evaluate = sub.add_parser(
        "evaluate",
        help="score checkpoints on labelled posts or a corpus split",
        description="Print accuracy, macro-F1, a per-class table and the confusion "
        "matrix of checkpoints on labelled posts, or on a corpus store's split.",
    )
    _common(evaluate, "LABELLED_INPUT", "labelled posts, or a corpus store directory")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead")
    evaluate.add_argument(
        "--split",
        choices=("val", "train", "all"),
        default="val",
        help="for a corpus store: which posts (default val)",
    )
    evaluate.add_argument(
        "--frames",
        choices=("voter", "trainer"),
        default="voter",
        help="voter: title and body tail (with --windows); trainer: the trainer's "
        "fixed validation windows (a corpus store's val split only)",
    )
    evaluate.set_defaults(func=evaluate_command)


def _common(parser: argparse.ArgumentParser, name: str, help_text: str) -> None:
    parser.add_argument(
        "-m",
        "--model",
        dest="checkpoints",
        action="append",
        required=True,
        metavar="CHECKPOINT",
        help="a checkpoint; repeat to vote with several",
    )
    parser.add_argument("input", metavar=name, help=f"{help_text}; - for stdin")
    parser.add_argument(
        "--vote",
        choices=("soft", "hard"),
        default="soft",
        help="soft: the label of highest probability averaged over checkpoints; "
        "hard: the label most checkpoints put first, ties to the higher mean "
        "probability (default %(default)s)",
    )
    parser.add_argument(
        "--windows",
        type=int,
        default=1,
        metavar="N",
        help="body windows per post, spread from start to tail (default 1: the tail)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        metavar="B",
        help="frames per forward pass (default %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--format",
        choices=("auto", "jsonl", "csv", "pickle"),
        default="auto",
        help="input format (auto: from the name, or sniffed on stdin)",
    )
    parser.add_argument("--title-field", default="title", metavar="NAME")
    parser.add_argument("--text-field", default="text", metavar="NAME")
    parser.add_argument("--label-field", default="label", metavar="NAME")
    parser.add_argument("--id-field", default="id", metavar="NAME")
    parser.add_argument(
        "--columns", metavar="A,B,C", help="column names of a header-less CSV"
    )


def vote_command(args: argparse.Namespace) -> int:
    """Classifies every post of INPUT and writes JSON lines."""
    from trainerd.model.voter import Voter

    _check_numbers(args)
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    _check_output(args.input, args.output)
    voter = Voter.from_checkpoints(args.checkpoints, device=args.device)
    try:
        count, seconds = _vote(voter, args)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as other filters do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    log.info(
        "voted: %d posts with %d checkpoint(s) on %s in %.1f s (%.0f posts/s)",
        count,
        len(voter.members),
        voter.device,
        seconds,
        count / seconds if seconds > 0 else 0.0,
    )
    return 0


def _vote(voter: Any, args: argparse.Namespace) -> tuple[int, float]:
    """Streams INPUT through the voter in chunks; returns (posts, seconds)."""
    started = time.monotonic()
    count = 0
    with _Output(args.output) as out:
        for chunk in _chunks(read_posts(args, need_label=False)):
            predictions = voter.predict(
                [(p.title, p.text) for p in chunk],
                top_k=args.top_k,
                windows=args.windows,
                vote=args.vote,
                batch_size=args.batch_size,
            )
            for post, pred in zip(chunk, predictions, strict=True):
                record = {
                    "id": post.id,
                    "label": pred.label,
                    "probability": round(pred.probability, 6),
                    "top_k": [[name, round(p, 6)] for name, p in pred.top_k],
                }
                if pred.votes is not None:
                    record["votes"] = pred.votes
                # default=str: a pickle's ids may be of types JSON lacks (a set, bytes)
                out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            count += len(chunk)
    return count, time.monotonic() - started


def evaluate_command(args: argparse.Namespace) -> int:
    """Scores checkpoints on labelled posts and prints the figures."""
    from trainerd.model.evaluation import figures
    from trainerd.model.voter import Voter, combine

    _check_numbers(args)
    voter = Voter.from_checkpoints(args.checkpoints, device=args.device)
    corpus = _open_corpus(args.input)
    if args.frames == "trainer" and (corpus is None or args.split != "val"):
        raise ConfigError(
            "--frames trainer needs a corpus store and --split val: it rebuilds the "
            "trainer's validation frames"
        )
    if args.frames == "trainer" and args.windows != 1:
        raise ConfigError("--windows applies to voter frames, not --frames trainer")

    true, probs = _labelled_probs(args, voter, corpus)
    if true.size == 0:
        raise InputError(f"{args.input}: no posts to evaluate")
    scores = combine(probs, vote=args.vote)
    result = figures(true, scores, voter.label_names)
    result["checkpoints"] = [
        {"path": m.path, "val": _val_summary(m.val)} for m in voter.members
    ]
    result["frames"] = args.frames
    result["windows"] = args.windows
    result["vote"] = args.vote
    if args.json:
        print(json.dumps(result))
    else:
        _print_report(result, args)
    return 0


def _labelled_probs(args: argparse.Namespace, voter: Any, corpus: Any) -> tuple:
    """(true label ids, (members, posts, classes) probabilities) of the input."""
    from trainerd.model import evaluation

    if corpus is None:
        posts = list(read_posts(args, need_label=True))
        labels = [p.label for p in posts]
        true = evaluation.label_ids(labels, voter.label_names, _name(args.input))
        encoded = voter.encode([(p.title, p.text) for p in posts])
    else:
        for member in voter.members:
            if member.corpus_fingerprint != corpus.fingerprint:
                log.warning(
                    "evaluate: %s trained on corpus %s, %s is %s; its stored "
                    "validation figures are not comparable",
                    member.path,
                    member.corpus_fingerprint,
                    corpus.path,
                    corpus.fingerprint,
                )
        ids = evaluation.corpus_split(corpus, args.split)
        true = evaluation.corpus_labels(corpus, ids, voter)
        if args.frames == "trainer":
            return true, evaluation.trainer_frame_probs(voter, corpus)
        encoded = [corpus.post_codes(int(i)) for i in ids]
    probs = voter.member_probs(
        encoded, windows=args.windows, batch_size=args.batch_size
    )
    return true, probs


def _check_numbers(args: argparse.Namespace) -> None:
    if args.windows < 1:
        raise ConfigError(f"--windows must be >= 1, got {args.windows}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")


def _check_output(source: str, target: str) -> None:
    """Refuses -o naming the input: the votes would replace the posts."""
    if source == "-" or target == "-":
        return
    same = Path(source).resolve() == Path(target).resolve()
    # samefile also sees hard links; it fails when the output does not exist yet.
    with contextlib.suppress(OSError):
        same = same or os.path.samefile(source, target)
    if same:
        raise ConfigError(
            f"-o {target}: is the input file; the votes would replace the posts, "
            "choose another output file"
        )


def _val_summary(val: Any) -> dict | None:
    """The headline of a checkpoint's stored validation record."""
    if not isinstance(val, dict):
        return None
    keys = ("epoch", "accuracy", "macro_f1", "loss", "samples")
    return {k: val[k] for k in keys if k in val}


# Reading posts


def read_posts(args: argparse.Namespace, *, need_label: bool) -> Iterator[InputPost]:
    """Posts of args.input, read with import's readers; InputError on bad input."""
    from trainerd.producers.importer import Fields, parse_columns

    columns = parse_columns(args.columns) if args.columns else None
    fields = Fields(args.title_field, args.text_field, args.label_field, columns)
    with _SourceFile(args.input, args.format) as (path, fmt):
        count = 0
        for post in _post_reader(path, fmt, fields, args.id_field, need_label):
            count += 1
            yield post
        if count == 0:
            raise InputError(f"{_name(args.input)}: holds no posts")


def _name(source: str) -> str:
    return "stdin" if source == "-" else source


class _SourceFile:
    """The input as a path and a format; stdin is spooled to a temporary file.

    Import's readers read files by name and tell gzip by the suffix, so standard
    input is copied to a file whose name says what the bytes are.
    """

    def __init__(self, source: str, fmt: str) -> None:
        self.source = source
        self.fmt = fmt
        self.tmp: str | None = None

    def __enter__(self) -> tuple[Path, str]:
        from trainerd.producers.importer import detect_format

        if self.source != "-":
            path = Path(self.source)
            if not path.exists():
                raise InputError(f"{path}: no such file")
            if path.is_dir():
                raise InputError(f"{path}: a directory, expected a file of posts")
            if path.stat().st_size == 0:
                raise InputError(f"{path}: the file is empty; it holds no posts")
            return path, detect_format(path) if self.fmt == "auto" else self.fmt
        fd, self.tmp = tempfile.mkstemp(prefix="trainerctl-vote-")
        with os.fdopen(fd, "wb") as spool:
            shutil.copyfileobj(sys.stdin.buffer, spool)
        head = Path(self.tmp).read_bytes()[:4096]
        if not head:
            raise InputError("stdin: empty; it holds no posts")
        gz = head.startswith(GZIP_MAGIC)
        fmt = self.fmt if self.fmt != "auto" else _sniff(head, gz)
        named = f"{self.tmp}.{fmt}" + (".gz" if gz else "")
        os.rename(self.tmp, named)
        self.tmp = named
        return Path(named), fmt

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            Path(self.tmp).unlink(missing_ok=True)


def _sniff(head: bytes, gz: bool) -> str:
    """The format of standard input from its first bytes."""
    if gz:
        import gzip
        import zlib

        try:
            head = gzip.decompress(head)
        except (OSError, EOFError, zlib.error):
            # A partial stream: decompress what is there.
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head)
    if head[:1] and head[0] == PICKLE_PROTOCOL_OPCODE:
        return "pickle"
    if head.lstrip()[:1] == b"{":
        return "jsonl"
    return "csv"


def _post_reader(
    path: Path, fmt: str, fields: Any, id_field: str, need_label: bool
) -> Iterator[InputPost]:
    """Import's reader for `fmt`, with the label optional and the post's id kept."""
    from trainerd.producers.importer import Decoder, PostReader

    class IdReader(PostReader):
        # Posts without an id are numbered from 1 in every format, not by line:
        # a CSV's header and a JSON file's blank lines would shift line numbers.
        number = 0

        def _post(self, record: dict, where: str) -> InputPost:  # type: ignore[override]
            self.number += 1
            title, text, label, where = super()._post(record, where)
            post_id = record.get(id_field)
            if isinstance(post_id, (bytes, bytearray)):
                post_id = self.decoder.decode(bytes(post_id))
            return InputPost(
                id=self.number if post_id is None else post_id,
                title=title,
                text=text,
                label=label,
            )

    return IdReader(path, fmt, fields, Decoder(), require_label=need_label).posts()


def _chunks(posts: Iterator[InputPost]) -> Iterator[list[InputPost]]:
    chunk: list[InputPost] = []
    for post in posts:
        chunk.append(post)
        if len(chunk) == CHUNK_POSTS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _open_corpus(source: str) -> Any:
    """A corpus store when `source` is one (a directory with meta.json), else None."""
    if source == "-" or not Path(source).is_dir():
        return None
    from trainerd.producers.corpus import Corpus

    return Corpus.open(source)


class _Output:
    """Standard output, or a file written under a temporary name and renamed on
    success, so a failed vote leaves no half-written file behind."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.tmp: Path | None = None

    def __enter__(self) -> Any:
        if self.target == "-":
            return sys.stdout
        path = Path(self.target)
        if path.is_dir():
            raise InputError(f"-o {path}: a directory, expected a file name")
        self.tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        try:
            self.file = open(self.tmp, "w", encoding="utf-8")
        except OSError as err:
            raise InputError(f"-o {path}: cannot write it: {err.strerror}") from err
        return self.file

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self.tmp is None:
            sys.stdout.flush()
            return
        self.file.close()
        if exc_type is None:
            os.replace(self.tmp, self.target)
        else:
            self.tmp.unlink(missing_ok=True)


# Printing the report


def _print_report(result: dict, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    names = result["labels"]
    width = max(100, 30 + 6 * len(names))
    console = Console(width=width, highlight=False)
    frames = (
        "the trainer's validation windows"
        if result["frames"] == "trainer"
        else f"voter frames, {result['windows']} window(s)"
    )
    console.print(
        f"evaluated {result['samples']:,} posts with {len(result['checkpoints'])} "
        f"checkpoint(s), {frames}, {result['vote']} vote"
    )
    console.print(
        f"accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}  "
        f"loss {result['loss']:.4f}"
    )
    for member in result["checkpoints"]:
        val = member["val"]
        if val and "accuracy" in val:
            console.print(
                f"  {member['path']}: stored validation accuracy {val['accuracy']:.4f}"
                + (f" (epoch {val['epoch']})" if "epoch" in val else "")
            )

    table = Table(title="per class")
    for column in ("#", "label", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for i, name in enumerate(names):
        table.add_row(
            str(i),
            name,
            f"{result['precision'][i]:.3f}",
            f"{result['recall'][i]:.3f}",
            f"{result['f1'][i]:.3f}",
            f"{result['support'][i]:,}",
        )
    console.print(table)

    console.print("confusion matrix (rows: true label, columns: predicted label)")
    matrix = Table()
    matrix.add_column("true", justify="left")
    for i in range(len(names)):
        matrix.add_column(str(i), justify="right")
    for i, row in enumerate(result["confusion"]):
        matrix.add_row(f"{i} {names[i]}", *(str(v) if v else "." for v in row))
    console.print(matrix)
