"""Checkpoint files: atomic writes, safe reads, and which file a run resumes from.

A checkpoint describes itself: the model's build arguments, its weights, the alphabet,
the label names, the frame length, the corpus fingerprint, the resolved job config,
the optimizer and schedule state, and the cursor (the next batch not yet trained).
A reader needs no config beside it. Files are written to a temporary name in the same
directory, synced and renamed, so a crash leaves the previous file whole.

Payload keys (format "trainerd-checkpoint", version 1): format, version, model
{preset, n_classes, alphabet_size, length, features, hidden, dropout}, model_state,
alphabet, label_names, length, corpus_fingerprint, config, optimizer, scheduler,
cursor {epoch, batch, validated}, step, val, and for information seed, time, torch.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from trainerd.producers.durable import atomic_file, fsync_path
from trainerd.producers.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "trainerd-checkpoint"
VERSION = 1
REQUIRED = (
    "model",
    "model_state",
    "alphabet",
    "label_names",
    "length",
    "corpus_fingerprint",
    "config",
    "cursor",
    "step",
)
LAST = "last.pt"
BEST = "best.pt"


def write_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Writes `payload` to `path` atomically: temp file, fsync, rename, fsync dir."""
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        torch.save(payload, f)
    return path


def link_checkpoint(source: Path, target: Path) -> None:
    """Makes `target` name the same file as `source`, atomically, without copying."""
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.link(source, tmp)
    os.replace(tmp, target)
    fsync_path(target.parent)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint onto the CPU with weights-only unpickling.

    Raises CheckpointError naming the file when it is missing, truncated, corrupt, or
    not a trainerd checkpoint of this version.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path}: a directory; expected a checkpoint file, e.g. "
            "runs/RUN/checkpoints/best.pt"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    # torch.save writes a zip archive whose directory sits at the end and whose
    # members carry CRC-32s: a cut file, other bytes (a plain pickle, text), a
    # damaged directory and a flipped byte in the weights all fail here.
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError):
        raise CheckpointError(
            f"checkpoint {path}: truncated or corrupt (not a complete torch zip "
            f"archive)"
        ) from None
    if damaged is not None:
        raise CheckpointError(
            f"checkpoint {path}: corrupt ({damaged} fails its CRC-32 check)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # On junk bytes the unpickler raises almost anything (KeyError, IndexError).
        raise CheckpointError(f"checkpoint {path}: {_load_failure(err)}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a trainerd checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {payload.get('version')!r}, "
            f"this trainerd reads {VERSION}"
        )
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing {', '.join(missing)}")
    return payload


def _load_failure(err: Exception) -> str:
    """One line on why torch.load refused a file (its own message spans many)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    # torch names a refused global as "Unsupported global: GLOBAL x.y" or
    # "unsupported GLOBAL x.y whose module x is blocked", by version.
    refused = re.search(r"unsupported\s+global:?\s+(?:GLOBAL\s+)?([\w.]+)", text, re.I)
    if refused:
        return (
            f"not a trainerd checkpoint (it holds {refused.group(1)}, which "
            "weights-only loading refuses; nothing from it was run)"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        # The first paragraph is torch's advice to load unsafely; the reason follows.
        reasons = [ln for ln in lines[1:] if not ln.startswith("Check the doc")]
        reason = reasons[0] if reasons else "weights-only loading refused it"
        return f"not a trainerd checkpoint ({_words(reason, 160)})"
    reason = lines[0] if lines else type(err).__name__
    return f"truncated or corrupt ({type(err).__name__}: {_words(reason, 120)})"


def _words(text: str, limit: int) -> str:
    """`text` cut to about `limit` characters at a word boundary."""
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut.rstrip(" .,;:") + " ..."


def candidates(directory: Path) -> list[Path]:
    """Checkpoints in a run's checkpoints/ directory, newest first (`last` first on ties)."""
    if not directory.is_dir():
        return []
    files = [p for p in directory.glob("*.pt") if not p.name.startswith(".")]

    def key(p: Path) -> tuple[float, bool]:
        return (p.stat().st_mtime, p.name == LAST)

    return sorted(files, key=key, reverse=True)


def newest_valid(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that reads cleanly; warns about each broken newer one."""
    broken: Path | None = None
    for path in candidates(directory):
        try:
            payload = read_checkpoint(path)
        except CheckpointError as err:
            log.warning("checkpoint unreadable: %s; trying an older one", err)
            broken = broken or path
            continue
        if broken is not None:
            log.warning(
                "checkpoint fallback: %s is broken, resuming from %s instead",
                broken,
                path,
            )
        return path, payload
    if broken is not None:
        raise CheckpointError(
            f"checkpoints in {directory}: none readable (newest {broken}); "
            f"start again with --resume none"
        )
    return None


def model_from_checkpoint(payload: dict[str, Any]) -> torch.nn.Module:
    """Rebuilds the network a checkpoint describes and loads its weights (eval mode)."""
    from trainerd.model.net import build_model

    model = build_model(**payload["model"])
    model.load_state_dict(payload["model_state"])
    return model.eval()


def load_weights(
    model: torch.nn.Module, payload: dict[str, Any], *, source: str, reinit_head: bool
) -> list[str]:
    """Loads a checkpoint's weights into a freshly built model (`model.init_from`).

    Layers whose shapes differ are listed one per line in the CheckpointError; with
    `reinit_head` a classifier head (`head.*`) of another class count keeps its fresh
    initialisation instead. Returns the names of the layers left as initialised.
    """
    state = model.state_dict()
    loaded = payload["model_state"]
    problems, skipped = [], []
    for name, tensor in state.items():
        if name not in loaded:
            problems.append(f"{name}: missing in {source}")
        elif loaded[name].shape != tensor.shape:
            if reinit_head and name.startswith("head."):
                skipped.append(name)
                continue
            problems.append(
                f"{name}: {tuple(loaded[name].shape)} in {source}, "
                f"{tuple(tensor.shape)} in this model"
            )
    problems += [f"{name}: not in this model" for name in loaded if name not in state]
    if problems:
        hint = " (model.reinit_head: true re-initialises a head of another size)"
        head_only = all(p.startswith("head.") for p in problems)
        raise CheckpointError(
            f"model.init_from {source}: weights do not fit this model"
            f"{hint if head_only else ''}: " + "; ".join(problems)
        )
    model.load_state_dict(
        {k: v for k, v in loaded.items() if k not in skipped}, strict=False
    )
    return skipped
