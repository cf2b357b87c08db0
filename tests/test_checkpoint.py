"""Checkpoint files: atomic writes, weights-only reads, fallback, init_from."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

from trainerd.model import checkpoint as ckpt
from trainerd.model.net import build_model, model_spec
from trainerd.producers.encoding import Alphabet
from trainerd.producers.errors import CheckpointError


def _payload(n_classes: int = 3, *, step: int = 7) -> dict:
    spec = model_spec(
        preset="default",
        n_classes=n_classes,
        alphabet_size=69,
        length=64,
        features=16,
        hidden=8,
        dropout=0.5,
    )
    torch.manual_seed(step)
    model = build_model(**spec)
    return {
        "model": spec,
        "model_state": model.state_dict(),
        "alphabet": Alphabet().to_dict(),
        "label_names": [f"c{i}" for i in range(n_classes)],
        "length": 64,
        "corpus_fingerprint": "abc",
        "config": {"name": "t"},
        "optimizer": {},
        "scheduler": {},
        "cursor": {"epoch": 1, "batch": 3, "validated": False},
        "step": step,
        "val": None,
    }


def test_round_trip_rebuilds_the_model_and_leaves_no_temp_file(tmp_path: Path):
    payload = _payload()
    path = ckpt.write_checkpoint(tmp_path / "last.pt", payload)
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]
    loaded = ckpt.read_checkpoint(path)
    assert loaded["format"] == "trainerd-checkpoint" and loaded["version"] == 1
    assert loaded["cursor"] == payload["cursor"]
    model = ckpt.model_from_checkpoint(loaded)
    for name, tensor in payload["model_state"].items():
        assert torch.equal(model.state_dict()[name], tensor)
    assert Alphabet.from_dict(loaded["alphabet"]) == Alphabet()


def test_truncated_file_is_a_checkpoint_error(tmp_path: Path):
    path = ckpt.write_checkpoint(tmp_path / "last.pt", _payload())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.read_checkpoint(path)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        # Inside the stored weights: the member's CRC-32 no longer matches.
        (0.5, r"corrupt \(archive/data/\d+ fails its CRC-32 check\)"),
        # In the zip directory at the end of the file.
        (-60, "truncated or corrupt"),
    ],
)
def test_damaged_bytes_are_a_checkpoint_error(
    tmp_path: Path, where: float, message: str
):
    path = ckpt.write_checkpoint(tmp_path / "last.pt", _payload())
    data = bytearray(path.read_bytes())
    at = int(len(data) * where) if where > 0 else len(data) + int(where)
    data[at : at + 4] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=message):
        ckpt.read_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.read_checkpoint(path)


def test_foreign_files_are_refused(tmp_path: Path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a trainerd checkpoint"):
        ckpt.read_checkpoint(other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello, not a zip")
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.read_checkpoint(junk)
    with pytest.raises(CheckpointError, match="no such file"):
        ckpt.read_checkpoint(tmp_path / "absent.pt")


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/trainerd-should-not-exist",))


def test_weights_only_loading_never_runs_pickled_code(tmp_path: Path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save(
            {"format": "trainerd-checkpoint", "x": _Boom()}, f, pickle_protocol=2
        )
    with pytest.raises(CheckpointError):
        ckpt.read_checkpoint(path)
    assert not Path("/tmp/trainerd-should-not-exist").exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Boom(), protocol=2))
    with pytest.raises(CheckpointError):
        ckpt.read_checkpoint(raw)
    assert not Path("/tmp/trainerd-should-not-exist").exists()


def test_broken_newest_falls_back_to_the_previous_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    good = ckpt.write_checkpoint(tmp_path / "epoch-0001.pt", _payload(step=5))
    os.utime(good, (1_000_000, 1_000_000))
    last = ckpt.write_checkpoint(tmp_path / "last.pt", _payload(step=9))
    data = bytearray(last.read_bytes())
    # Its zip directory damaged, the length unchanged.
    data[-60:-56] = b"\xff\xff\xff\xff"
    last.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        path, payload = ckpt.newest_valid(tmp_path)
    assert path == good and payload["step"] == 5
    fallback = [r.message for r in caplog.records if "fallback" in r.message]
    assert fallback and str(last) in fallback[0] and str(good) in fallback[0]


def test_no_checkpoints_and_only_broken_ones(tmp_path: Path):
    assert ckpt.newest_valid(tmp_path) is None
    (tmp_path / "last.pt").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="none readable"):
        ckpt.newest_valid(tmp_path)


def test_link_keeps_the_linked_file_when_the_source_is_replaced(tmp_path: Path):
    last = ckpt.write_checkpoint(tmp_path / "last.pt", _payload(step=1))
    ckpt.link_checkpoint(last, tmp_path / "best.pt")
    ckpt.write_checkpoint(tmp_path / "last.pt", _payload(step=2))
    assert ckpt.read_checkpoint(tmp_path / "best.pt")["step"] == 1
    assert ckpt.read_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_load_weights_lists_mismatches_and_reinitialises_a_head():
    source = _payload(n_classes=3)
    target = build_model(**{**source["model"], "n_classes": 5})
    with pytest.raises(CheckpointError) as err:
        ckpt.load_weights(target, source, source="a.pt", reinit_head=False)
    message = str(err.value)
    assert "head.weight: (3, 8) in a.pt, (5, 8) in this model" in message
    assert "head.bias: (3,) in a.pt, (5,) in this model" in message
    assert "reinit_head" in message
    fresh = ckpt.load_weights(target, source, source="a.pt", reinit_head=True)
    assert fresh == ["head.weight", "head.bias"]
    assert torch.equal(
        target.state_dict()["fc.0.weight"], source["model_state"]["fc.0.weight"]
    )
    wider = build_model(**{**source["model"], "features": 32})
    with pytest.raises(CheckpointError, match="convs"):
        ckpt.load_weights(wider, source, source="a.pt", reinit_head=True)
