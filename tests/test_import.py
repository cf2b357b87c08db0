"""trainerctl import: every source format, the split, and every bad input.

Bad inputs run the real command in a subprocess and check its exit status and its
one-line message: no traceback ever reaches a user.
"""

from __future__ import annotations

import csv
import errno
import gzip
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from trainerd.producers import importer
from trainerd.producers.corpus import Corpus
from trainerd.producers.encoding import Alphabet
from trainerd.producers.errors import CorpusError, InputError
from trainerd.producers.importer import (
    Fields,
    import_corpus,
    parse_alphabet,
    parse_columns,
    sha256_file,
)

RECORDS = [
    {
        "title": f"title {i}",
        "text": f"body of post {i}",
        "label": ["x", "y", "z"][i % 3],
    }
    for i in range(60)
]


def trainerctl(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "trainerd.daemon.cli", *map(str, args)]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def write_jsonl(path: Path, records: list, *, gz: bool = False) -> Path:
    lines = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(lines) if gz else lines)
    return path


def write_csv(path: Path, rows: list[list], header: list[str] | None = None) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def read_posts(corpus: Corpus) -> list[tuple[str, str, str]]:
    alphabet = corpus.alphabet
    posts = []
    for i in range(corpus.n_posts):
        title, body = corpus.post_codes(i)
        label = corpus.label_names[int(corpus.labels[i])]
        posts.append((alphabet.decode(title), alphabet.decode(body), label))
    return posts


# Formats


@pytest.mark.parametrize("name", ["posts.jsonl", "posts.jsonl.gz"])
def test_jsonl(tmp_path: Path, name: str) -> None:
    source = write_jsonl(tmp_path / name, RECORDS, gz=name.endswith(".gz"))
    summary = import_corpus(source, tmp_path / "c", val_fraction=0.25, seed=3)
    corpus = Corpus.open(tmp_path / "c")
    assert corpus.label_names == ["x", "y", "z"]
    assert (summary.n_train, summary.n_val) == (45, 15)
    assert read_posts(corpus)[4] == ("title\x004", "body\x00of\x00post\x004", "y")
    meta = corpus.meta
    assert meta["source"]["sha256"] == sha256_file(source)
    assert meta["split"] == {"mode": "fraction", "seed": 3, "val_fraction": 0.25}
    counts = meta["class_counts"]
    assert [a + b for a, b in zip(counts["train"], counts["val"], strict=True)] == [
        20,
        20,
        20,
    ]
    assert sum(counts["val"]) == 15


def test_csv_with_header(tmp_path: Path) -> None:
    rows = [[r["label"], r["title"], r["text"]] for r in RECORDS]
    source = write_csv(tmp_path / "p.csv", rows, header=["label", "title", "text"])
    import_corpus(source, tmp_path / "c")
    assert read_posts(Corpus.open(tmp_path / "c"))[0] == (
        "title\x000",
        "body\x00of\x00post\x000",
        "x",
    )


def test_headerless_csv_with_numeric_labels_like_ag_news(tmp_path: Path) -> None:
    rows = [[str(i % 4 + 1), f"t{i}", f"b{i}"] for i in range(3, 43)]
    source = write_csv(tmp_path / "ag.csv", rows)
    fields = Fields(columns=("label", "title", "text"))
    import_corpus(source, tmp_path / "c", fields=fields)
    corpus = Corpus.open(tmp_path / "c")
    assert corpus.label_names == ["1", "2", "3", "4"]  # sorted by value
    assert corpus.labels[0] == 3  # the first row's label is "4"


def test_pickle_of_dicts_and_of_tuples(tmp_path: Path) -> None:
    dicts = tmp_path / "d.pkl"
    dicts.write_bytes(pickle.dumps(RECORDS))
    tuples = tmp_path / "t.pickle"
    rows = tuple((r["title"], r["text"].encode(), i % 2) for i, r in enumerate(RECORDS))
    tuples.write_bytes(pickle.dumps(rows, protocol=2))  # bytes via _codecs.encode
    import_corpus(dicts, tmp_path / "a")
    import_corpus(tuples, tmp_path / "b")
    assert Corpus.open(tmp_path / "a").label_names == ["x", "y", "z"]
    b = Corpus.open(tmp_path / "b")
    assert b.label_names == ["0", "1"]
    assert read_posts(b)[1] == ("title\x001", "body\x00of\x00post\x001", "1")


def test_custom_field_names(tmp_path: Path) -> None:
    records = [
        {"subj": r["title"], "msg": r["text"], "cat": r["label"]} for r in RECORDS
    ]
    source = write_jsonl(tmp_path / "p.jsonl", records)
    fields = Fields(title="subj", text="msg", label="cat")
    import_corpus(source, tmp_path / "c", fields=fields)
    assert Corpus.open(tmp_path / "c").n_posts == 60


def test_split_is_seeded(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        import_corpus(source, tmp_path / name, seed=seed, val_fraction=0.5)
    a, b, c = (Corpus.open(tmp_path / n) for n in "abc")
    assert a.val_ids.tolist() == b.val_ids.tolist()
    assert a.val_ids.tolist() != c.val_ids.tolist()
    assert sorted([*a.train_ids.tolist(), *a.val_ids.tolist()]) == list(range(60))
    assert list(a.train_ids) == sorted(a.train_ids)  # source order within a split


def test_explicit_validation_source(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    val = write_jsonl(tmp_path / "val.jsonl", RECORDS[:7])
    import_corpus(train, tmp_path / "c", val_source=val)
    corpus = Corpus.open(tmp_path / "c")
    assert corpus.train_ids.tolist() == list(range(60))
    assert corpus.val_ids.tolist() == list(range(60, 67))
    assert corpus.meta["source"]["val_sha256"] == sha256_file(val)
    assert corpus.meta["class_counts"]["val"] == [3, 2, 2]


def test_keep_case_and_custom_alphabet(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    alphabet = Alphabet("abT\n", lowercase=False)
    import_corpus(source, tmp_path / "c", alphabet=alphabet)
    corpus = Corpus.open(tmp_path / "c")
    assert corpus.alphabet == alphabet
    assert corpus.post_codes(0)[0].tolist() == [0, 0, 0, 0, 0, 0, 0]
    assert corpus.alphabet.encode("Tab").tolist() == [3, 1, 2]


# Bad input: each a one-line error and a non-zero exit


def case_empty(d: Path) -> list:
    (d / "p.jsonl").write_bytes(b"")
    return ["p.jsonl"]


def case_missing(d: Path) -> list:
    return ["nothing.jsonl"]


def case_only_blank_lines(d: Path) -> list:
    (d / "p.jsonl").write_text("\n\n")
    return ["p.jsonl"]


def without(field: str) -> Callable[[Path], list]:
    def case(d: Path) -> list:
        records = [dict(RECORDS[0]), dict(RECORDS[1])]
        del records[1][field]
        write_jsonl(d / "p.jsonl", records)
        return ["p.jsonl"]

    return case


def case_text_not_a_string(d: Path) -> list:
    write_jsonl(d / "p.jsonl", [*RECORDS[:5], {"title": "t", "text": 12, "label": "x"}])
    return ["p.jsonl"]


def case_label_only_in_validation(d: Path) -> list:
    write_jsonl(d / "t.jsonl", RECORDS)
    write_jsonl(d / "v.jsonl", [{"title": "t", "text": "b", "label": "w"}])
    return ["t.jsonl", "--val", "v.jsonl"]


def case_one_class(d: Path) -> list:
    write_jsonl(d / "p.jsonl", [{**r, "label": "x"} for r in RECORDS])
    return ["p.jsonl"]


def case_malformed_json(d: Path) -> list:
    lines = [json.dumps(r) for r in RECORDS[:2]] + ['{"title": "t", "text": ']
    (d / "p.jsonl").write_text("\n".join(lines) + "\n")
    return ["p.jsonl"]


def case_ragged_csv(d: Path) -> list:
    (d / "p.csv").write_text("label,title,text\nx,a,b\ny,c\n")
    return ["p.csv"]


def case_csv_without_label_column(d: Path) -> list:
    (d / "p.csv").write_text("category,title,text\nx,a,b\ny,c,d\n")
    return ["p.csv"]


def case_output_exists(d: Path) -> list:
    write_jsonl(d / "p.jsonl", RECORDS)
    (d / "out").mkdir()
    return ["p.jsonl"]


def case_unknown_format(d: Path) -> list:
    write_jsonl(d / "p.txt", RECORDS)
    return ["p.txt"]


def case_broken_gzip(d: Path) -> list:
    data = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS))
    (d / "p.jsonl.gz").write_bytes(data[: len(data) // 2])
    return ["p.jsonl.gz"]


def case_not_a_pickle(d: Path) -> list:
    (d / "p.pkl").write_bytes(b"this is not a pickle")
    return ["p.pkl"]


def case_bad_val_fraction(d: Path) -> list:
    write_jsonl(d / "p.jsonl", RECORDS)
    return ["p.jsonl", "--val-fraction", "1.5"]


def case_negative_seed(d: Path) -> list:
    write_jsonl(d / "p.jsonl", RECORDS)
    return ["p.jsonl", "--seed", "-1"]


def case_val_fraction_zero(d: Path) -> list:
    write_jsonl(d / "p.jsonl", RECORDS)
    return ["p.jsonl", "--val-fraction", "0"]


def case_val_fraction_too_small(d: Path) -> list:
    write_jsonl(d / "p.jsonl", RECORDS)
    return ["p.jsonl", "--val-fraction", "0.001"]


def case_val_fraction_leaves_one_class(d: Path) -> list:
    write_jsonl(d / "p.jsonl", RECORDS)
    return ["p.jsonl", "--val-fraction", "0.99"]


def case_header_with_columns(d: Path) -> list:
    rows = [[r["label"], r["title"], r["text"]] for r in RECORDS]
    write_csv(d / "p.csv", rows, header=["Label", "Title", "Text"])
    return ["p.csv", "--columns", "label,title,text"]


def case_all_posts_empty(d: Path) -> list:
    write_jsonl(d / "p.jsonl", [{**r, "title": "", "text": ""} for r in RECORDS])
    return ["p.jsonl"]


def case_binary_csv(d: Path) -> list:
    (d / "p.csv").write_bytes(b"\x7fELF\x02\x01\xff\x00,\x00\x1b[2J\n\x03\x00>\n")
    return ["p.csv"]


def case_label_a_float(d: Path) -> list:
    write_jsonl(d / "p.jsonl", [*RECORDS[:3], {"title": "", "text": "", "label": 1.5}])
    return ["p.jsonl"]


BAD_INPUTS = {
    "empty file": (case_empty, "the file is empty"),
    "missing file": (case_missing, "nothing.jsonl: no such file"),
    "only blank lines": (case_only_blank_lines, "holds no posts"),
    "no title": (without("title"), "p.jsonl:2: record has no 'title' field"),
    "no text": (without("text"), "p.jsonl:2: record has no 'text' field"),
    "no label": (without("label"), "p.jsonl:2: record has no 'label' field"),
    "text not a string": (case_text_not_a_string, "p.jsonl:6: the text must be a "),
    "label only in validation": (
        case_label_only_in_validation,
        "v.jsonl:1: label 'w' appears in validation but not in training",
    ),
    "one class": (case_one_class, "a classifier needs at least two"),
    "malformed json": (case_malformed_json, "p.jsonl:3: malformed JSON on line 3"),
    "ragged csv": (case_ragged_csv, "p.csv:3: ragged CSV row: 2 fields"),
    "csv without label": (case_csv_without_label_column, "has no 'label' field"),
    "output exists": (case_output_exists, "exists; pass --force"),
    "unknown format": (case_unknown_format, "cannot tell the format"),
    "broken gzip": (case_broken_gzip, "p.jsonl.gz: cannot read it"),
    "not a pickle": (case_not_a_pickle, "p.pkl: not a readable pickle"),
    "bad val fraction": (case_bad_val_fraction, "--val-fraction must be in (0, 1)"),
    "negative seed": (
        case_negative_seed,
        "error: --seed must be a non-negative integer, got -1\n",
    ),
    "val fraction 0": (
        case_val_fraction_zero,
        "error: --val-fraction 0 leaves the validation split empty, and training "
        "validates every epoch; pass a fraction such as 0.1, or --val FILE\n",
    ),
    "val fraction rounds to no posts": (
        case_val_fraction_too_small,
        "error: --val-fraction 0.001 of 60 posts leaves the validation split "
        "empty; raise it, or pass --val FILE\n",
    ),
    "val fraction leaves one class": (
        case_val_fraction_leaves_one_class,
        "error: --val-fraction 0.99 leaves 1 training post(s) of 1 class(es)",
    ),
    "header with --columns": (
        case_header_with_columns,
        "error: p.csv:1: the first row looks like a header (label,title,text); "
        "drop --columns to read the header\n",
    ),
    "all posts empty": (
        case_all_posts_empty,
        "error: no characters in any post: every title and text is empty",
    ),
    "binary csv": (
        case_binary_csv,
        "error: p.csv:2: ragged CSV row: 1 fields, the header names 2 "
        "('\\x7fELF\\x02\\x01\\ufffd\\x00,\\x00\\x1b[2J')\n",
    ),
    "float label": (case_label_a_float, "label must be a non-empty string or an int"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line(tmp_path: Path, case: str) -> None:
    make, message = BAD_INPUTS[case]
    args = make(tmp_path)
    result = trainerctl("import", *args, "--out", "out", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("trainerctl import: error: ")
    assert message in result.stderr
    assert result.stderr[:-1].isprintable(), result.stderr
    # Nothing half-written is left beside the output.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_force_replaces_an_existing_store(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "p.jsonl", RECORDS)
    first = trainerctl("import", "p.jsonl", "--out", "out", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = trainerctl("import", "p.jsonl", "--out", "out", "--force", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "split: 54 train, 6 validation" in again.stdout
    assert Corpus.open(tmp_path / "out").n_posts == 60


class Hostile:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.path}",))


class HostileEval:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (eval, (f"open({str(self.path)!r}, 'w')",))


@pytest.mark.parametrize(
    ("payload", "name"), [(Hostile, "posix.system"), (HostileEval, "builtins.eval")]
)
def test_hostile_pickle_is_refused_and_not_run(
    tmp_path: Path, payload: type, name: str
) -> None:
    marker = tmp_path / "pwned"
    records = [*RECORDS[:3], {"title": "t", "text": payload(marker), "label": "x"}]
    (tmp_path / "p.pkl").write_bytes(pickle.dumps(records))
    result = trainerctl("import", "p.pkl", "--out", "out", cwd=tmp_path)
    assert not marker.exists()
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"pickle refused: it asks for {name}" in result.stderr
    assert not (tmp_path / "out").exists()


def test_hostile_pickle_in_process(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "p.pkl").write_bytes(pickle.dumps([Hostile(marker)]))
    with pytest.raises(InputError, match=r"posix\.system"):
        import_corpus(tmp_path / "p.pkl", tmp_path / "out")
    assert not marker.exists()


# Odd but acceptable input


def test_bytes_not_utf8_are_replaced_and_counted(tmp_path: Path) -> None:
    lines = [json.dumps(r).encode() for r in RECORDS]
    lines[1] = b'{"title": "caf\xe9 \xff", "text": "ok", "label": "y"}'
    (tmp_path / "p.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    result = trainerctl("import", "p.jsonl", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 bytes not UTF-8 replaced" in result.stdout
    corpus = Corpus.open(tmp_path / "out")
    assert corpus.meta["bad_bytes"] == 2
    assert corpus.post_codes(1)[0].tolist() == [3, 1, 6, 0, 0, 0]


def test_nul_bytes_are_code_zero(tmp_path: Path) -> None:
    records = [*RECORDS, {"title": "a\x00b", "text": "\x00", "label": "x"}]
    raw = write_jsonl(tmp_path / "p.jsonl", records).read_bytes()
    # A raw NUL inside a JSON string, as well as the escaped one.
    (tmp_path / "p.jsonl").write_bytes(raw.replace(b"\\u0000", b"\x00", 1))
    import_corpus(tmp_path / "p.jsonl", tmp_path / "c")
    title, body = Corpus.open(tmp_path / "c").post_codes(60)
    assert (title.tolist(), body.tolist()) == ([1, 0, 2], [0])


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_long_post_and_empty_fields(tmp_path: Path, fmt: str) -> None:
    long_text = "ab" * 80_000
    records = [
        *RECORDS,
        {"title": "long", "text": long_text, "label": "x"},
        {"title": "no body", "text": "", "label": "y"},
        {"title": "", "text": "no title", "label": "z"},
    ]
    if fmt == "jsonl":
        source = write_jsonl(tmp_path / "p.jsonl", records)
    else:
        rows = [[r["title"], r["text"], r["label"]] for r in records]
        source = write_csv(tmp_path / "p.csv", rows, header=["title", "text", "label"])
    result = trainerctl("import", source.name, "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    corpus = Corpus.open(tmp_path / "out")
    lengths = [(t.size, b.size) for t, b in map(corpus.post_codes, (60, 61, 62))]
    assert lengths == [(4, 160_000), (7, 0), (0, 8)]


def test_summary_lines(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    result = trainerctl(
        "import", source.name, "--out", "out", "--val-fraction", "0.5", cwd=tmp_path
    )
    lines = result.stdout.splitlines()
    assert lines[1] == "split: 30 train, 30 validation"
    assert lines[2].split() == ["class", "train", "val"]
    assert [line.split()[0] for line in lines[3:6]] == ["x", "y", "z"]
    assert lines[6].startswith("summary: 60 posts, 3 classes, 1,360 characters, ")
    assert "% outside the alphabet" in lines[6]


# Real data


@pytest.mark.slow
def test_newsgroups(newsgroups_corpus: Path) -> None:
    corpus = Corpus.open(newsgroups_corpus)
    assert (corpus.train_ids.size, corpus.val_ids.size) == (11_314, 7_532)
    assert len(corpus.label_names) == 20
    assert corpus.label_names[0] == "alt.atheism"
    counts = corpus.meta["class_counts"]
    assert counts["train"][0] == 480 and counts["val"][0] == 319
    assert np.bincount(corpus.labels[corpus.train_ids]).tolist() == counts["train"]


@pytest.mark.slow
def test_newsgroups_import_is_fast(tmp_path: Path) -> None:
    from conftest import shared_data_dir

    source = shared_data_dir() / "20newsgroups-bydate"
    if not (source / "train.jsonl.gz").is_file():
        pytest.skip(f"no 20 Newsgroups data under {source}")
    started = time.monotonic()
    result = trainerctl(
        "import",
        source / "train.jsonl.gz",
        "--val",
        source / "test.jsonl.gz",
        "--out",
        "ng",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 60
    assert "summary: 18,846 posts, 20 classes" in result.stdout


def test_leftovers_of_a_dead_import_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".c.importing-999999999"
    stale.mkdir()
    (stale / "codes.u8").write_bytes(b"half")
    import_corpus(write_jsonl(tmp_path / "p.jsonl", RECORDS), tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "p.jsonl"]


def test_progress_bar_draws_without_breaking_the_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainerd.producers.importer as importer

    monkeypatch.setattr(importer, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(importer, "PROGRESS_EVERY", 1)
    source = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    summary = import_corpus(source, tmp_path / "c", progress=True)
    assert summary.n_train + summary.n_val == 60


def test_alphabet_and_columns_options() -> None:
    assert parse_alphabet("ab\\n\\\\c") == "ab\n\\c"
    assert parse_columns("label, title,text") == ("label", "title", "text")
    with pytest.raises(InputError, match="distinct non-empty names"):
        parse_columns("label,,text")


def test_keep_case_flag_extends_the_default_alphabet(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "p.jsonl", RECORDS)
    result = trainerctl("import", "p.jsonl", "--out", "c", "--keep-case", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    alphabet = Corpus.open(tmp_path / "c").alphabet
    assert (alphabet.size, alphabet.lowercase) == (95, False)
    assert alphabet.encode("Aa").tolist() == [70, 1]


def test_val_fraction_leaving_one_class_points_at_the_fraction(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    with pytest.raises(InputError) as caught:
        import_corpus(source, tmp_path / "c", val_fraction=0.99)
    assert str(caught.value).endswith(
        "a classifier needs at least two, lower --val-fraction"
    )


def test_output_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "p.jsonl", RECORDS)
    result = trainerctl("import", "p.jsonl", "--out", "/proc/td-nowhere", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(
        "trainerctl import: error: /proc/td-nowhere: cannot write the corpus store "
        "there ("
    )
    assert result.stderr.count("\n") == 1, result.stderr

    with pytest.raises(CorpusError) as caught:
        import_corpus(tmp_path / "p.jsonl", tmp_path / "p.jsonl" / "c")
    assert str(caught.value) == (
        f"{tmp_path}/p.jsonl/c: cannot write the corpus store there "
        f"(not a directory: {tmp_path}/p.jsonl)"
    )


def test_full_disk_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_jsonl(tmp_path / "p.jsonl", RECORDS)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(CorpusError) as caught:
        import_corpus(source, tmp_path / "c")
    assert str(caught.value) == (
        f"{tmp_path}/c: cannot write the corpus store there (No space left on device)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


KILLED_IMPORT = """
import os, signal, sys
from trainerd.producers.corpus import CorpusWriter
CorpusWriter(sys.argv[1])
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_leftovers_of_a_killed_import_are_removed(tmp_path: Path, reaped: bool) -> None:
    child = subprocess.Popen([sys.executable, "-c", KILLED_IMPORT, str(tmp_path / "c")])
    leftover = tmp_path / f".c.importing-{child.pid}"
    deadline = time.monotonic() + 30
    # Until the parent waits, the killed child stays a zombie holding its pid.
    while not _is_zombie(child.pid):
        assert time.monotonic() < deadline, "the import was not killed"
        time.sleep(0.01)
    assert leftover.is_dir()
    if reaped:
        assert child.wait(timeout=30) == -9
    try:
        import_corpus(write_jsonl(tmp_path / "p.jsonl", RECORDS), tmp_path / "c")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "p.jsonl"]
    finally:
        child.wait(timeout=30)


def _is_zombie(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "Z"


def test_a_reused_pid_does_not_keep_leftovers() -> None:
    from trainerd.producers.importer import _alive

    assert _alive(os.getpid(), since=time.time())
    # A directory last written before this process started is not its own.
    assert not _alive(os.getpid(), since=time.time() - 10 * 365 * 86400)


def test_pickle_records_count_from_one(tmp_path: Path) -> None:
    source = tmp_path / "p.pkl"
    source.write_bytes(pickle.dumps([RECORDS[0], "not a post"]))
    with pytest.raises(InputError) as caught:
        import_corpus(source, tmp_path / "c")
    assert str(caught.value) == (
        f"{source}: record 2: expected a dict or a (title, text, label) tuple, got str"
    )


def test_oversized_lines_and_labels_are_refused_before_they_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for label in ('"' + "x" * 201 + '"', "1" * 400, "1" * 5000):
        source = write_jsonl(tmp_path / "q.jsonl", RECORDS)
        with source.open("a") as f:  # raw: json.dumps refuses 5000-digit numbers
            f.write(f'{{"title": "t", "text": "b", "label": {label}}}\n')
        refusal = "a label of more than 200" if len(label) < 4300 else "4300 digits"
        with pytest.raises(InputError, match=refusal):
            import_corpus(source, tmp_path / "c3")

    monkeypatch.setattr(importer, "MAX_POST_BYTES", 4096)
    long_line = {"title": "t", "text": "a" * 5000, "label": "x"}
    source = write_jsonl(tmp_path / "p.jsonl.gz", [*RECORDS, long_line], gz=True)
    with pytest.raises(InputError, match=r"p.jsonl.gz:\d+: a line of more than 0 MiB"):
        import_corpus(source, tmp_path / "c1")
    rows = [[r["title"], r["text"], r["label"]] for r in [*RECORDS, long_line]]
    source = write_csv(tmp_path / "p.csv", rows, header=["title", "text", "label"])
    with pytest.raises(InputError, match="field larger than field limit"):
        import_corpus(source, tmp_path / "c2")
