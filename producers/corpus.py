"""The corpus store: a directory of flat, memory-mappable arrays of encoded posts.

Layout of a store directory:

    meta.json        format version, alphabet, labels, counts, fingerprints
    codes.u8         every post's codes back to back (title then body), plus one 0
    offsets.i64      n + 1 offsets into codes.u8; post i is codes[offsets[i]:offsets[i+1]]
    title_len.i32    the title's share of each post
    labels.i32       label id of each post
    train_ids.i64    ids of the training split, in source order
    val_ids.i64      ids of the validation split, in source order

Opening a store maps the arrays and reads meta.json: the same time for any size, and no
Python object per post.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from array import array as typed_array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainerd.producers.durable import fsync_path
from trainerd.producers.encoding import Alphabet
from trainerd.producers.errors import CorpusError

FORMAT_VERSION = 1
META = "meta.json"
ARRAYS = {
    "codes": ("codes.u8", np.uint8),
    "offsets": ("offsets.i64", np.int64),
    "title_len": ("title_len.i32", np.int32),
    "labels": ("labels.i32", np.int32),
    "train_ids": ("train_ids.i64", np.int64),
    "val_ids": ("val_ids.i64", np.int64),
}


def _map(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass(frozen=True)
class Corpus:
    """An opened corpus store; arrays are read-only memory maps."""

    path: Path
    meta: dict[str, Any]
    codes: np.ndarray
    offsets: np.ndarray
    title_len: np.ndarray
    labels: np.ndarray
    train_ids: np.ndarray
    val_ids: np.ndarray

    @classmethod
    def open(cls, path: str | os.PathLike) -> Corpus:
        """Maps a store; raises CorpusError naming what is missing or wrong."""
        root = Path(path)
        meta_path = root / META
        if not meta_path.is_file():
            raise CorpusError(
                f"corpus {root}: no {META} there; create one with "
                f"'trainerctl import SOURCE --out {root}'"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CorpusError(f"corpus {root}: unreadable {META}: {err}") from err
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise CorpusError(
                f"corpus {root}: format version {version!r}, this trainerd reads "
                f"{FORMAT_VERSION}; import the source again"
            )
        arrays = {}
        for name, (filename, dtype) in ARRAYS.items():
            file = root / filename
            if not file.is_file():
                raise CorpusError(f"corpus {root}: missing {filename}; import again")
            arrays[name] = _map(file, dtype)
        corpus = cls(path=root, meta=meta, **arrays)
        corpus._check_sizes()
        return corpus

    def _check_sizes(self) -> None:
        n = self.meta["n_posts"]
        expected = {
            "offsets": n + 1,
            "title_len": n,
            "labels": n,
            "train_ids": self.meta["n_train"],
            "val_ids": self.meta["n_val"],
            "codes": self.meta["n_chars"] + 1,
        }
        for name, size in expected.items():
            if getattr(self, name).size != size:
                raise CorpusError(
                    f"corpus {self.path}: {name} holds {getattr(self, name).size} "
                    f"entries, meta.json says {size}; the store is damaged, import again"
                )

    @property
    def alphabet(self) -> Alphabet:
        """The alphabet the codes were made with."""
        return Alphabet.from_dict(self.meta["alphabet"])

    @property
    def label_names(self) -> list[str]:
        """Label names in id order."""
        return list(self.meta["label_names"])

    @property
    def fingerprint(self) -> str:
        """Identifies the corpus content: source, encoding and split."""
        return str(self.meta["fingerprint"])

    @property
    def n_posts(self) -> int:
        """Posts in the store, both splits."""
        return int(self.meta["n_posts"])

    def post_codes(self, post_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The title's and the body's codes of one post (views, no copy)."""
        start, end = int(self.offsets[post_id]), int(self.offsets[post_id + 1])
        split = start + int(self.title_len[post_id])
        return self.codes[start:split], self.codes[split:end]


class CorpusWriter:
    """Builds a store in a temporary directory beside `out` and renames it into place.

    An interrupted import leaves no half corpus: until `finish` the store lives under a
    hidden name that `trainerctl import` removes on the next run. Any OSError writing
    it (no such parent, read-only, disk full) is a CorpusError naming `out`.
    """

    def __init__(self, out: str | os.PathLike, *, force: bool = False) -> None:
        self.out = Path(out)
        self.tmp = self.out.parent / f".{self.out.name}.importing-{os.getpid()}"
        try:
            self._create(force)
        except OSError as err:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise self._write_error(err) from err

    def _create(self, force: bool) -> None:
        if self.out.exists() and not force:
            raise CorpusError(
                f"{self.out} exists; pass --force to replace it, or choose another --out"
            )
        if self.out.exists() and not _replaceable(self.out):
            # --force replaces a corpus store, never an arbitrary directory or file.
            raise CorpusError(
                f"{self.out} exists and is not a corpus store; refusing to replace "
                "it even with --force, choose another --out"
            )
        parent = self.out.parent
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(parent))
        parent.mkdir(parents=True, exist_ok=True)
        self.force = force
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self._codes = open(self.tmp / ARRAYS["codes"][0], "wb")  # noqa: SIM115
        # Typed arrays, not lists: 16 bytes a post rather than about a hundred.
        self._offsets = typed_array("q", [0])
        self._title_len = typed_array("i")
        self._labels = typed_array("i")
        self.n_outside = 0

    def _write_error(self, err: OSError) -> CorpusError:
        reason = err.strerror or str(err)
        if err.filename is not None and Path(err.filename) != self.out:
            reason = f"{reason}: {err.filename}"
        return CorpusError(
            f"{self.out}: cannot write the corpus store there ({reason})"
        )

    def add(self, title: np.ndarray, body: np.ndarray, label: int) -> int:
        """Appends one encoded post and returns its id."""
        try:
            self._codes.write(title.tobytes())
            self._codes.write(body.tobytes())
        except OSError as err:
            raise self._write_error(err) from err
        self.n_outside += int(
            np.count_nonzero(title == 0) + np.count_nonzero(body == 0)
        )
        self._offsets.append(self._offsets[-1] + title.size + body.size)
        self._title_len.append(title.size)
        self._labels.append(label)
        return len(self._labels) - 1

    @property
    def n_posts(self) -> int:
        """Posts added so far."""
        return len(self._labels)

    @property
    def n_chars(self) -> int:
        """Codes written so far, titles and bodies."""
        return self._offsets[-1]

    def label_ids(self) -> np.ndarray:
        """A copy of the label ids added so far, in post order."""
        return np.frombuffer(self._labels, dtype=np.int32).astype(np.int64)

    def relabel(self, new_ids: np.ndarray) -> None:
        """Renumbers the labels added so far: label id i becomes new_ids[i].

        The importer numbers labels as it meets them and sorts their names at the end.
        """
        table = np.asarray(new_ids, dtype=np.int64)
        relabelled = table[np.frombuffer(self._labels, dtype=np.int32)]
        self._labels = typed_array("i", relabelled.astype(np.int32).tobytes())

    def finish(
        self,
        *,
        train_ids: np.ndarray,
        val_ids: np.ndarray,
        meta: dict[str, Any],
    ) -> Path:
        """Writes arrays and meta, syncs them and renames the store into place."""
        try:
            return self._finish(train_ids, val_ids, meta)
        except OSError as err:
            raise self._write_error(err) from err

    def _finish(
        self, train_ids: np.ndarray, val_ids: np.ndarray, meta: dict[str, Any]
    ) -> Path:
        self._codes.write(b"\x00")  # the padding sentinel the sampler gathers from
        self._codes.flush()
        os.fsync(self._codes.fileno())
        self._codes.close()
        arrays = {
            "offsets": np.frombuffer(self._offsets, dtype=np.int64),
            "title_len": np.frombuffer(self._title_len, dtype=np.int32),
            "labels": np.frombuffer(self._labels, dtype=np.int32),
            "train_ids": np.asarray(train_ids, dtype=np.int64),
            "val_ids": np.asarray(val_ids, dtype=np.int64),
        }
        digest = hashlib.sha256()
        for name, array in arrays.items():
            _write_array(self.tmp / ARRAYS[name][0], array)
            digest.update(name.encode() + array.tobytes())
        meta = {
            **meta,
            "format_version": FORMAT_VERSION,
            "n_posts": self.n_posts,
            "n_train": int(arrays["train_ids"].size),
            "n_val": int(arrays["val_ids"].size),
            "n_chars": int(self._offsets[-1]),
            "n_outside": self.n_outside,
        }
        digest.update(str(meta.get("source_fingerprint")).encode())
        digest.update(json.dumps(meta["alphabet"], sort_keys=True).encode())
        meta["fingerprint"] = digest.hexdigest()[:16]
        meta_file = self.tmp / META
        meta_file.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        fsync_path(meta_file)
        return self._swap_in()

    def _swap_in(self) -> Path:
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.replaced-{os.getpid()}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        fsync_path(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        """Removes the temporary store; the previous one, if any, is untouched."""
        codes = getattr(self, "_codes", None)
        if codes is not None and not codes.closed:
            # A full disk fails the final flush; the file is removed anyway.
            with contextlib.suppress(OSError):
                codes.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _replaceable(path: Path) -> bool:
    """True for a corpus store or an empty directory."""
    if not path.is_dir():
        return False
    return (path / META).is_file() or not any(path.iterdir())


def _write_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(array.tobytes())
        f.flush()
        os.fsync(f.fileno())
