"""The job config: strict types, duplicated keys, and every message a user reads.

Messages are pinned whole: each must read as one plain line naming the file, the
setting (or line) and what would be valid, with no library wording.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainerd.daemon.config import _Loader, load_config, parse_config
from trainerd.producers.errors import ConfigError

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def load(tmp_path: Path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    message = str(caught.value)
    assert "\n" not in message
    prefix = f"{tmp_path / 'job.yaml'}: "
    assert message.startswith(prefix), message
    return message[len(prefix) :]


BAD = {
    "bool for a count": (
        "corpus: c\ndata: {producers: true}\n",
        "data.producers: must be an integer, got True",
    ),
    "string for a count": (
        'corpus: c\ndata: {batch_size: "32"}\n',
        "data.batch_size: must be an integer, got '32'",
    ),
    "float for a count": (
        "corpus: c\ntrain: {epochs: 2.5}\n",
        "train.epochs: must be an integer, got 2.5",
    ),
    "string for a number": (
        "corpus: c\ntrain: {lr: fast}\n",
        "train.lr: must be a number, got 'fast'",
    ),
    "number for a flag": (
        "corpus: c\ndata: {drop_last: 1}\n",
        "data.drop_last: must be true or false, got 1",
    ),
    "number for a string": (
        "corpus: c\ndata: {shm_dir: 5}\n",
        "data.shm_dir: must be a string, got 5",
    ),
    "bad name": (
        "name: x y\ncorpus: c\n",
        "name: must be 1-64 letters, digits, '.', '_' or '-', starting with a letter "
        "or digit, got 'x y'",
    ),
    "empty section": (
        "corpus: c\nmodel:\n",
        "model: must be a mapping of settings, got None",
    ),
    "list for a section": (
        "corpus: c\ntrain: [1, 2]\n",
        "train: must be a mapping of settings, got [1, 2]",
    ),
    "below a bound": ("corpus: c\ntrain: {lr: -1}\n", "train.lr: must be > 0, got -1"),
    "two bounds": (
        "corpus: c\ntrain: {lr: 0, momentum: 1.5}\n",
        "train.lr: must be > 0, got 0; train.momentum: must be < 1, got 1.5",
    ),
    "not a choice": (
        "corpus: c\ndata: {wire: json}\n",
        "data.wire: must be one of 'onehot' or 'codes', got 'json'",
    ),
    "bad device": (
        "corpus: c\ntrain: {device: tpu}\n",
        "train.device: must be auto, cpu, cuda or cuda:N, got 'tpu'",
    ),
    "unknown setting": (
        "corpus: c\nmetrics: {flush: 1}\n",
        "metrics.flush: unknown setting; valid here: flush_s, log_every_steps",
    ),
    "missing corpus": ("name: x\n", "corpus: required setting is missing"),
    "duplicated key": (
        "name: a\ncorpus: c\nname: b\n",
        "line 3: key 'name' is given twice (first on line 1)",
    ),
    "duplicated nested key": (
        "corpus: c\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n",
        "line 5: key 'lr' is given twice (first on line 3)",
    ),
    "bad indentation": (
        "corpus: c\ntrain:\n  lr: 0.1\n epochs: 3\n",
        "not valid YAML at line 4, column 2: expected <block end>, but found "
        "'<block mapping start>'",
    ),
    "unclosed list": (
        "corpus: [c\n",
        "not valid YAML at line 2, column 1: expected ',' or ']', but got "
        "'<stream end>'",
    ),
    "empty file": (
        "",
        "empty; a job needs at least 'corpus: PATH' (see examples/demo.yaml)",
    ),
    "only comments": (
        "# nothing yet\n",
        "empty; a job needs at least 'corpus: PATH' (see examples/demo.yaml)",
    ),
    "a list": ("- corpus: c\n", "must be a mapping of settings, got list"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_message(tmp_path: Path, case: str) -> None:
    text, message = BAD[case]
    assert error(tmp_path, text) == message


def test_ints_are_taken_for_float_settings(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "corpus: c\ntrain: {lr: 1, weight_decay: 0}\ndata: {wait_timeout_s: 5}\n",
    )
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.weight_decay == 0.0
    assert config.data.wait_timeout_s == 5.0


def test_exponent_floats_without_a_dot_are_numbers(tmp_path: Path) -> None:
    config = load(tmp_path, "corpus: c\ntrain: {lr: 1e-3, weight_decay: 5E-4}\n")
    assert config.train.lr == pytest.approx(1e-3)
    assert config.train.weight_decay == pytest.approx(5e-4)


def test_merge_keys_may_override() -> None:
    # A `<<:` merge then an explicit key is an override, not a duplicate.
    data = yaml.load("a: &b {lr: 0.1, epochs: 2}\nc: {<<: *b, lr: 0.5}\n", _Loader)
    assert data["c"] == {"lr": 0.5, "epochs": 2}


def test_parse_config_takes_a_dict_and_makes_no_path_absolute() -> None:
    config = parse_config({"corpus": "c", "data": {"batch_size": 32}})
    assert config.corpus == "c" and config.data.batch_size == 32
    with pytest.raises(ConfigError) as caught:
        parse_config({"corpus": "c", "data": {"batch_size": True}}, source="job")
    assert str(caught.value) == "job: data.batch_size: must be an integer, got True"


def test_corpus_is_resolved_beside_the_file(tmp_path: Path) -> None:
    assert load(tmp_path, "corpus: corpora/x\n").corpus == str(tmp_path / "corpora/x")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "none.yaml")
    assert str(caught.value) == f"{tmp_path / 'none.yaml'}: no such config file"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_load(path: Path) -> None:
    assert load_config(path).corpus
