"""Import posts from a pickle, JSON lines or CSV file into a corpus store.

Posts stream from the source into a CorpusWriter one at a time: each is checked,
normalised and encoded as it is read, so no Python object per post outlives its line
(pickles are the exception: a pickle is one object and is loaded whole). Labels are
numbered as they are met and sorted by name at the end. The split is either a seeded
shuffle cut by a ratio, or a second source read after the first.

Every problem with a source is an InputError (or a CorpusError for the output) that
names the file and, where there is one, the line or record.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from trainerd.producers.corpus import CorpusWriter
from trainerd.producers.encoding import Alphabet
from trainerd.producers.errors import InputError

log = logging.getLogger(__name__)

FORMATS = ("pickle", "jsonl", "csv")
SUFFIXES = {
    ".pkl": "pickle",
    ".pickle": "pickle",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
}
# What a pickle may load by name. Plain containers, strings and numbers pickle as
# opcodes; these few names appear in older protocols (bytes in protocol 2 load
# through _codecs.encode, sets through builtins.set).
SAFE_GLOBALS = {
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "dict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "str"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "bool"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
    ("_codecs", "encode"),
}
PROGRESS_AFTER_S = 0.5
PROGRESS_EVERY = 512  # records between progress updates
DEFAULT_VAL_FRACTION = 0.1
# A JSON line or CSV field longer than this is refused before it is read whole: no
# post is that long, and a frame reads at most a few thousand characters of one.
MAX_POST_BYTES = 64 * 2**20
MAX_LABEL_CHARS = 200


@dataclass(frozen=True)
class Fields:
    """Where a record keeps its title, text and label.

    Attributes:
        title: the title's field (JSON key, CSV column, pickle dict key).
        text: the body's field.
        label: the label's field.
        columns: names of the columns of a header-less CSV, in order.
    """

    title: str = "title"
    text: str = "text"
    label: str = "label"
    columns: tuple[str, ...] | None = None


@dataclass
class Summary:
    """What an import did; `lines()` is the report trainerctl prints."""

    out: Path
    sources: list[Path]
    n_train: int = 0
    n_val: int = 0
    label_names: list[str] = field(default_factory=list)
    train_counts: list[int] = field(default_factory=list)
    val_counts: list[int] = field(default_factory=list)
    n_chars: int = 0
    n_outside: int = 0
    bad_bytes: int = 0
    seconds: float = 0.0

    @property
    def outside_share(self) -> float:
        """Share of the stored characters outside the alphabet (code 0)."""
        return self.n_outside / self.n_chars if self.n_chars else 0.0

    def lines(self) -> list[str]:
        """The human report: split, class counts, then the totals."""
        names = ", ".join(p.name for p in self.sources) or "posts"
        width = max(len("class"), *(len(n) for n in self.label_names))
        lines = [
            f"imported {names} into {self.out}",
            f"split: {self.n_train:,} train, {self.n_val:,} validation",
            f"  {'class':<{width}}  {'train':>8}  {'val':>8}",
        ]
        for name, n_train, n_val in zip(
            self.label_names, self.train_counts, self.val_counts, strict=True
        ):
            lines.append(f"  {name:<{width}}  {n_train:>8,}  {n_val:>8,}")
        lines.append(
            f"summary: {self.n_train + self.n_val:,} posts, "
            f"{len(self.label_names)} classes, {self.n_chars:,} characters, "
            f"{self.outside_share:.2%} outside the alphabet, "
            f"{self.bad_bytes:,} bytes not UTF-8 replaced, {self.seconds:.2f} s"
        )
        return lines


# One post as a reader yields it: title, text, label, and where it came from.
Post = tuple[str, str, str | None, str]


class Decoder:
    """Decodes UTF-8 with replacement and counts the bytes it replaced."""

    def __init__(self) -> None:
        self.bad_bytes = 0
        self.name = f"trainerd-count-{id(self)}"
        codecs.register_error(self.name, self._replace)

    def _replace(self, err: UnicodeError) -> tuple[str, int]:
        if not isinstance(err, UnicodeDecodeError):
            raise err
        self.bad_bytes += err.end - err.start
        return "\ufffd", err.end

    def decode(self, data: bytes) -> str:
        return data.decode("utf-8", self.name)


class _SafeUnpickler(pickle.Unpickler):
    """Loads containers, strings and numbers; refuses every other global by name."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise InputError(
            f"pickle refused: it asks for {module}.{name}, and only plain containers, "
            "strings and numbers may be loaded; nothing from it was run"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise InputError(f"pickle refused: it holds a persistent id {pid!r}")


def detect_format(path: Path) -> str:
    """The format named by a file's suffix (a trailing .gz is looked through)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    fmt = SUFFIXES.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise InputError(
            f"{path}: cannot tell the format from the name; pass --format "
            f"{'|'.join(FORMATS)}"
        )
    return fmt


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_source(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; it holds no posts")


def _refuse_header(row: list[str], columns: tuple[str, ...], where: str) -> None:
    """Refuses a first row that repeats --columns: it is a header, not a post."""
    if [c.strip().lower() for c in row] == [c.lower() for c in columns]:
        raise InputError(
            f"{where}: the first row looks like a header ({','.join(columns)}); "
            "drop --columns to read the header"
        )


class PostReader:
    """Opens one source and yields its posts, tracking bytes read for progress."""

    def __init__(
        self,
        path: Path,
        fmt: str,
        fields: Fields,
        decoder: Decoder,
        *,
        require_label: bool = True,
    ):
        self.path = path
        self.require_label = require_label
        self.fmt = fmt
        self.fields = fields
        self.decoder = decoder
        self.size = path.stat().st_size
        self._raw: BinaryIO | None = None

    @property
    def position(self) -> int:
        """Bytes of the file read so far (compressed bytes for .gz)."""
        try:
            return self._raw.tell() if self._raw else 0
        except (OSError, ValueError):
            return 0

    def posts(self) -> Iterator[Post]:
        with open(self.path, "rb") as raw:
            self._raw = raw
            stream: BinaryIO = raw
            if self.path.suffix.lower() == ".gz":
                stream = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
            try:
                yield from getattr(self, f"_{self.fmt}")(stream)
            except (OSError, EOFError, zlib.error) as err:
                raise InputError(f"{self.path}: cannot read it: {err}") from err
            finally:
                self._raw = None

    def _jsonl(self, stream: BinaryIO) -> Iterator[Post]:
        number = 0
        while line := stream.readline(MAX_POST_BYTES + 1):
            number += 1
            if len(line) > MAX_POST_BYTES:
                raise InputError(
                    f"{self.path}:{number}: a line of more than "
                    f"{MAX_POST_BYTES >> 20} MiB; posts are shorter (one record a "
                    f"line?)"
                )
            text = self.decoder.decode(line)
            if number == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            where = f"{self.path}:{number}"
            try:
                # strict=False: control characters such as NUL inside strings are text.
                record = json.loads(text, strict=False)
            except json.JSONDecodeError as err:
                raise InputError(
                    f"{where}: malformed JSON on line {number}: {err.msg} "
                    f"(column {err.colno})"
                ) from err
            except ValueError as err:  # a number of more than 4300 digits
                raise InputError(f"{where}: unreadable JSON: {err}") from err
            if not isinstance(record, dict):
                raise InputError(
                    f"{where}: expected a JSON object with "
                    f"{self._names()}, got {type(record).__name__}"
                )
            yield self._post(record, where)

    def _csv(self, stream: BinaryIO) -> Iterator[Post]:
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors=self.decoder.name)
        # A post may be far longer than csv's 128 KiB default field limit.
        csv.field_size_limit(MAX_POST_BYTES)
        reader = csv.reader(text)
        columns = self.fields.columns
        try:
            if columns is None:
                header = next(reader, None)
                if header is None:
                    raise InputError(
                        f"{self.path}: the file holds no header and no rows"
                    )
                columns = tuple(c.strip() for c in header)
            first = True
            for row in reader:
                if not row:
                    continue
                where = f"{self.path}:{reader.line_num}"
                if first and self.fields.columns is not None:
                    _refuse_header(row, columns, where)
                first = False
                if len(row) != len(columns):
                    raise InputError(
                        f"{where}: ragged CSV row: {len(row)} fields, the "
                        f"{'header' if self.fields.columns is None else '--columns'}"
                        f" names {len(columns)} ({_excerpt(','.join(columns))})"
                    )
                yield self._post(dict(zip(columns, row, strict=True)), where)
        except csv.Error as err:
            raise InputError(f"{self.path}:{reader.line_num}: bad CSV: {err}") from err

    def _pickle(self, stream: BinaryIO) -> Iterator[Post]:
        try:
            data = _SafeUnpickler(stream).load()
        except InputError as err:
            raise InputError(f"{self.path}: {err}") from None
        except Exception as err:  # a corrupt pickle fails in any way
            raise InputError(
                f"{self.path}: not a readable pickle ({type(err).__name__}: {err})"
            ) from None
        if not isinstance(data, (list, tuple)):
            raise InputError(
                f"{self.path}: expected a list of posts (dicts or (title, text, label) "
                f"tuples), got {type(data).__name__}"
            )
        for number, item in enumerate(data, 1):  # records count from 1, as lines do
            where = f"{self.path}: record {number}"
            if isinstance(item, (list, tuple)):
                if len(item) != 3:
                    raise InputError(
                        f"{where}: a tuple post holds (title, text, label), "
                        f"got {len(item)} items"
                    )
                f = self.fields
                item = dict(zip((f.title, f.text, f.label), item, strict=True))
            elif not isinstance(item, dict):
                raise InputError(
                    f"{where}: expected a dict or a (title, text, label) tuple, "
                    f"got {type(item).__name__}"
                )
            yield self._post(item, where)

    def _names(self) -> str:
        f = self.fields
        return f"'{f.title}', '{f.text}' and '{f.label}'"

    def _post(self, record: dict, where: str) -> Post:
        f = self.fields
        wanted = [(f.title, "title"), (f.text, "text")]
        if self.require_label:
            wanted.append((f.label, "label"))
        for key, flag in wanted:
            if key not in record:
                names = ", ".join(repr(k) for k in list(record)[:8])
                if not names.isprintable() or "\ufffd" in names:
                    raise InputError(
                        f"{where}: its field names are not text (binary data, or "
                        f"not {self.fmt.upper()}?); expected {self._names()}"
                    )
                keys = _excerpt(names, 120)
                raise InputError(
                    f"{where}: record has no {key!r} field (it has {keys or 'none'}); "
                    f"name the right one with --{flag}-field"
                )
        return (
            self._string(record[f.title], where, "title"),
            self._string(record[f.text], where, "text"),
            self._label(record.get(f.label), where),
            where,
        )

    def _label(self, value: Any, where: str) -> str | None:
        if value in (None, "") and not self.require_label:
            return None
        return label_name(value, where)

    def _string(self, value: Any, where: str, what: str) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, (bytes, bytearray)):
            return self.decoder.decode(bytes(value))
        raise InputError(
            f"{where}: the {what} must be a string, got {type(value).__name__} "
            f"{_short(value)}"
        )


def label_name(value: Any, where: str) -> str:
    """A record's label as a name: a non-empty string, or an integer as text."""
    too_long = InputError(
        f"{where}: a label of more than {MAX_LABEL_CHARS} characters; labels name "
        f"classes (the wrong column?)"
    )
    if isinstance(value, str) and value:
        if len(value) > MAX_LABEL_CHARS:
            raise too_long
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= 10**MAX_LABEL_CHARS:  # before str(), which caps digits
            raise too_long
        return str(value)
    raise InputError(
        f"{where}: the label must be a non-empty string or an integer, got "
        f"{type(value).__name__} {_short(value)}"
    )


def _excerpt(text: str, limit: int = 60) -> str:
    """`text` as is when short and printable, else an escaped, shortened excerpt.

    A binary file read as CSV yields "columns" of control bytes and replacement
    characters; echoing them raw would garble the terminal.
    """
    if len(text) <= limit and text.isprintable() and "\ufffd" not in text:
        return text
    shown = ascii(text[:limit])
    return shown + "..." if len(text) > limit else shown


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _sort_key(name: str) -> tuple[int, int, str]:
    # Integer labels (AG News' 1..4) sort by value, names alphabetically.
    try:
        return (0, int(name), name)
    except ValueError:
        return (1, 0, name)


class _Progress:
    """A transient rich progress bar that appears only when an import takes a while."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.monotonic()
        self._bar = None
        self._task = None

    def update(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            if time.monotonic() - self.started < PROGRESS_AFTER_S:
                return
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(label, total=total)
        self._bar.update(self._task, description=label, completed=done, total=total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def build_corpus(
    train: Iterable[Post],
    out: str | os.PathLike,
    *,
    val: Iterable[Post] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    alphabet: Alphabet | None = None,
    force: bool = False,
    meta: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
) -> Summary:
    """Encodes posts into a corpus store at `out` and returns what it did.

    Args:
        train: posts of the training source (or of the whole source when split).
        out: the store directory to create.
        val: posts of an explicit validation source; None to split `train`.
        val_fraction: share of `train` drawn for validation when `val` is None.
        seed: seed of the split's shuffle.
        alphabet: the alphabet to encode with; the default one when None.
        force: replace an existing store at `out`.
        meta: extra metadata stored with the corpus (sources, fingerprints), or a
            function returning it, called once every post is read.
    """
    started = time.monotonic()
    alphabet = alphabet or Alphabet()
    _check_split_options(val is None, val_fraction, seed)
    _remove_stale_imports(Path(out))
    writer = CorpusWriter(out, force=force)
    try:
        labels: dict[str, int] = {}
        n_train = _add_posts(writer, alphabet, train, labels, grow=True)
        if val is not None:
            _add_posts(writer, alphabet, val, labels, grow=False)
        if writer.n_chars == 0:
            raise InputError(
                "no characters in any post: every title and text is empty, so "
                "there is nothing to learn from"
            )
        train_ids, val_ids = _split(writer.n_posts, n_train, val, val_fraction, seed)
        names = sorted(labels, key=_sort_key)
        order = np.empty(len(names), dtype=np.int64)
        order[[labels[n] for n in names]] = np.arange(len(names))
        writer.relabel(order)
        label_ids = writer.label_ids()
        train_counts = np.bincount(label_ids[train_ids], minlength=len(names))
        val_counts = np.bincount(label_ids[val_ids], minlength=len(names))
        _check_classes(
            names, train_counts, val_counts, None if val is not None else val_fraction
        )
        summary = Summary(
            out=Path(out),
            sources=[],
            n_train=int(train_ids.size),
            n_val=int(val_ids.size),
            label_names=names,
            train_counts=train_counts.tolist(),
            val_counts=val_counts.tolist(),
        )
        full_meta = {
            **((meta() if callable(meta) else meta) or {}),
            "alphabet": alphabet.to_dict(),
            "label_names": names,
            "split": {
                "mode": "fraction" if val is None else "file",
                "seed": seed if val is None else None,
                "val_fraction": val_fraction if val is None else None,
            },
            "class_counts": {"train": summary.train_counts, "val": summary.val_counts},
        }
        writer.finish(train_ids=train_ids, val_ids=val_ids, meta=full_meta)
    except BaseException:
        writer.abort()
        raise
    summary.n_chars = writer.n_chars
    summary.n_outside = writer.n_outside
    summary.seconds = time.monotonic() - started
    return summary


def _check_split_options(by_fraction: bool, val_fraction: float, seed: int) -> None:
    """Refuses a seed numpy cannot take and a split that leaves validation empty."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {seed!r}")
    if not by_fraction:
        return
    if not 0.0 <= val_fraction < 1.0:  # NaN fails here too
        raise InputError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        raise InputError(
            "--val-fraction 0 leaves the validation split empty, and training "
            "validates every epoch; pass a fraction such as 0.1, or --val FILE"
        )


def _remove_stale_imports(out: Path) -> None:
    """Removes half-written stores of earlier imports to `out` whose process is gone.

    A killed import (SIGKILL, power loss) cannot clean up after itself; its hidden
    directory is named after its pid, so the next import to the same --out removes
    it once that pid is dead, a zombie, or reused by a process started after it.
    """
    if not out.parent.is_dir():
        return
    for tmp in out.parent.glob(f".{out.name}.importing-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            written = tmp.stat().st_mtime
        except OSError:
            continue
        if not _alive(int(pid), since=written):
            log.info("import cleanup: removing %s, left by process %s", tmp, pid)
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int, *, since: float) -> bool:
    """True when `pid` runs and may be the process that wrote at time `since`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _process_start(pid)
    if started is None:
        return True  # no /proc to ask: assume the owner is still at work
    state, start_time = started
    # A zombie has exited; a process started after the directory's last write
    # got a reused pid and is not its owner.
    return state not in ("Z", "X") and start_time <= since + 1.0


def _process_start(pid: int) -> tuple[str, float] | None:
    """(state letter, start time in epoch seconds) from /proc, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after it
    # start at the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return fields[0], boot + int(fields[19]) / ticks


def _add_posts(
    writer: CorpusWriter,
    alphabet: Alphabet,
    posts: Iterable[Post],
    labels: dict[str, int],
    *,
    grow: bool,
) -> int:
    """Encodes and appends posts; returns how many were added."""
    added = 0
    for title, text, label, where in posts:
        label_id = labels.get(label)
        if label_id is None:
            if not grow:
                raise InputError(
                    f"{where}: label {label!r} appears in validation but not in "
                    "training; the model could never predict it"
                )
            label_id = labels[label] = len(labels)
        writer.add(alphabet.encode(title), alphabet.encode(text), label_id)
        added += 1
    return added


def _split(
    n_posts: int,
    n_train: int,
    val: Iterable[Post] | None,
    val_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    if val is not None:
        return np.arange(n_train), np.arange(n_train, n_posts)
    order = np.random.default_rng(seed).permutation(n_posts)
    n_val = round(n_posts * val_fraction)
    if n_val == 0:
        raise InputError(
            f"--val-fraction {val_fraction} of {n_posts:,} posts leaves the validation "
            "split empty; raise it, or pass --val FILE"
        )
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _check_classes(
    names: list[str],
    train: np.ndarray,
    val: np.ndarray,
    val_fraction: float | None,
) -> None:
    """Refuses a training split with fewer than two classes or missing a class.

    `val_fraction` is None when validation came from its own file; otherwise the
    fraction is the likely culprit and the message says so.
    """
    present = [n for n, c in zip(names, train, strict=True) if c > 0]
    if len(present) < 2 and val_fraction is not None and len(names) >= 2:
        raise InputError(
            f"--val-fraction {val_fraction} leaves {int(train.sum()):,} training "
            f"post(s) of {len(present)} class(es) ({', '.join(present) or 'none'}); "
            "a classifier needs at least two, lower --val-fraction"
        )
    if len(present) < 2:
        raise InputError(
            f"training holds {len(present)} class(es) ({', '.join(present) or 'none'}); "
            "a classifier needs at least two"
        )
    missing = [n for n, c in zip(names, train, strict=True) if c == 0]
    if missing:
        raise InputError(
            f"label {missing[0]!r} has all its posts in the validation split and none "
            "in training; lower --val-fraction or change --seed"
        )


def import_corpus(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    val_source: str | os.PathLike | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    fmt: str = "auto",
    fields: Fields | None = None,
    alphabet: Alphabet | None = None,
    force: bool = False,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
) -> Summary:
    """Imports a pickle, JSON lines or CSV file of posts into a corpus store.

    Args:
        source: the posts (the training posts when `val_source` is given).
        out: the store directory to create.
        val_source: a file of validation posts, same format rules as `source`.
        val_fraction: share of `source` drawn for validation when no `val_source`.
        seed: seed of the split's shuffle.
        fmt: "auto" (from the suffix), "pickle", "jsonl" or "csv".
        fields: the field names of title, text and label, and CSV columns.
        alphabet: the alphabet to encode with; the default one when None.
        force: replace an existing store at `out`.
        progress: draw a progress bar; None draws one when stderr is a terminal.
        echo: receives each line of the report; None prints nothing.
    """
    fields = fields or Fields()
    paths = [Path(source)] + ([Path(val_source)] if val_source is not None else [])
    for path in paths:
        _check_source(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(f"--format must be auto or one of {', '.join(FORMATS)}")
    formats = [detect_format(p) if fmt == "auto" else fmt for p in paths]
    digests = [sha256_file(p) for p in paths]
    decoder = Decoder()
    readers = [
        PostReader(p, f, fields, decoder) for p, f in zip(paths, formats, strict=True)
    ]
    bar = _Progress(sys.stderr.isatty() if progress is None else progress)
    meta = {
        "source": {
            "path": str(paths[0].resolve()),
            "format": formats[0],
            "sha256": digests[0],
            "val_path": str(paths[1].resolve()) if val_source is not None else None,
            "val_sha256": digests[1] if val_source is not None else None,
            "fields": {
                "title": fields.title,
                "text": fields.text,
                "label": fields.label,
            },
        },
        "source_fingerprint": hashlib.sha256(":".join(digests).encode()).hexdigest(),
    }
    try:
        summary = build_corpus(
            _tracked(readers[0], bar),
            out,
            val=_tracked(readers[1], bar) if val_source is not None else None,
            val_fraction=val_fraction,
            seed=seed,
            alphabet=alphabet,
            force=force,
            # Replaced bytes are counted only once every post is read.
            meta=lambda: {**meta, "bad_bytes": decoder.bad_bytes},
        )
    finally:
        bar.close()
    summary.sources = paths
    summary.bad_bytes = decoder.bad_bytes
    log.debug("import finished: %s posts into %s", summary.n_train + summary.n_val, out)
    if echo is not None:
        for line in summary.lines():
            echo(line)
    return summary


def _tracked(reader: PostReader, bar: _Progress) -> Iterator[Post]:
    label = f"importing {reader.path.name}"
    count = 0
    for count, post in enumerate(reader.posts(), 1):
        if count % PROGRESS_EVERY == 0:
            bar.update(label, reader.position, reader.size)
        yield post
    if count == 0:
        raise InputError(f"{reader.path}: holds no posts")
    bar.update(label, reader.size, reader.size)


def parse_alphabet(text: str) -> str:
    """Reads --alphabet: the symbols in order, with \\n, \\t and \\\\ as escapes."""
    escapes = {"n": "\n", "t": "\t", "\\": "\\"}
    symbols, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in escapes:
            symbols.append(escapes[text[i + 1]])
            i += 2
        else:
            symbols.append(text[i])
            i += 1
    return "".join(symbols)


def parse_columns(text: str) -> tuple[str, ...]:
    """Reads --columns: comma-separated names of a header-less CSV's columns."""
    columns = tuple(c.strip() for c in text.split(","))
    if not all(columns) or len(set(columns)) != len(columns):
        raise InputError(
            f"--columns must be distinct non-empty names separated by commas, "
            f"got {text!r}"
        )
    return columns


__all__ = [
    "Fields",
    "Post",
    "Summary",
    "build_corpus",
    "detect_format",
    "import_corpus",
    "parse_alphabet",
    "parse_columns",
    "sha256_file",
]
