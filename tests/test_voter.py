"""The voter: frames from the checkpoint alone, voting, evaluate, and bad input."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainerd.daemon.cli import main as trainerctl
from trainerd.model.checkpoint import write_checkpoint
from trainerd.model.net import build_model, model_spec
from trainerd.model.voter import Voter, combine, window_starts
from trainerd.producers.corpus import Corpus
from trainerd.producers.demo import demo_records, write_demo_corpus
from trainerd.producers.encoding import DEFAULT_ALPHABET, Alphabet
from trainerd.producers.errors import CheckpointError, InputError
from trainerd.producers.sampling import Sampler, Window

sys.path.insert(0, str(Path(__file__).parent))
from trainer_util import tiny_corpus, tiny_job

LENGTH = 64
TRAINERCTL = [sys.executable, "-m", "trainerd.daemon.cli"]


def make_checkpoint(
    path: Path,
    *,
    label_names: list[str],
    alphabet: Alphabet | None = None,
    length: int = LENGTH,
    seed: int = 0,
) -> Path:
    """A checkpoint of an untrained tiny default model, as the trainer writes one."""
    alphabet = alphabet or Alphabet()
    spec = model_spec(
        preset="default",
        n_classes=len(label_names),
        alphabet_size=alphabet.size,
        length=length,
        features=16,
        hidden=16,
        dropout=0.0,
    )
    torch.manual_seed(seed)
    model = build_model(**spec)
    return write_checkpoint(
        path,
        {
            "model": spec,
            "model_state": model.state_dict(),
            "alphabet": alphabet.to_dict(),
            "label_names": label_names,
            "length": length,
            "corpus_fingerprint": "test",
            "config": {"data": {"length": length, "batch_size": 8}, "train": {}},
            "optimizer": None,
            "scheduler": None,
            "cursor": {"epoch": 1, "batch": 0, "validated": True},
            "step": 0,
            "val": None,
        },
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    out = tmp_path_factory.mktemp("voter") / "corpus"
    return Corpus.open(write_demo_corpus(out, n_posts=200, seed=1))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus) -> list[Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return [
        make_checkpoint(root / f"m{seed}.pt", label_names=corpus.label_names, seed=seed)
        for seed in range(3)
    ]


@pytest.fixture(scope="module")
def posts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("posts") / "posts.jsonl"
    lines = [json.dumps(r) for r in demo_records(30, seed=7)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_cli(*argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*TRAINERCTL, *argv],
        input=stdin,
        capture_output=True,
        timeout=120,
        env=env,
        check=False,
    )


# Frames


def test_frame_is_title_newline_and_exact_body_tail(checkpoints: list[Path]) -> None:
    voter = Voter.from_checkpoints(checkpoints[:1], device="cpu")
    body = "The first words fall outside. " + "x" * 20 + " and THE END, here."
    title = "Café Title"
    encoded = voter.encode([{"title": title, "text": body}])
    frame = voter.frames(encoded, length=40)[0]

    # 11 columns of title and newline leave 29 for the body's last 29 characters.
    tail = voter.alphabet.encode(body)[-29:]
    np.testing.assert_array_equal(frame[11:], tail)
    np.testing.assert_array_equal(frame[:10], voter.alphabet.encode(title))
    assert frame[10] == voter.alphabet.code_of("\n")
    # The space is outside the paper's alphabet: code 0, shown here as "_".
    text = voter.alphabet.decode(frame, unknown="_")
    assert text == "cafe_title\n" + "x" * 10 + "_and_the_end,_here."


def test_frame_pads_short_posts_and_cuts_long_titles(checkpoints: list[Path]) -> None:
    voter = Voter.from_checkpoints(checkpoints[:1], device="cpu")
    encoded = voter.encode([("ab", "cd"), ("t" * 50, "body")])
    frames = voter.frames(encoded, length=10)
    assert voter.alphabet.decode(frames[0], unknown="_") == "ab\ncd_____"
    assert voter.alphabet.decode(frames[1]) == "t" * 10


def test_frames_equal_the_samplers_tail_window(
    corpus: Corpus, checkpoints: list[Path]
) -> None:
    voter = Voter.from_checkpoints(checkpoints[:1], device="cpu")
    ids = np.arange(corpus.n_posts)
    expected = np.zeros((ids.size, LENGTH), dtype=np.uint8)
    Sampler(corpus, LENGTH, ids.size).codes_into(ids, expected, window=Window.TAIL)
    encoded = [corpus.post_codes(int(i)) for i in ids]
    np.testing.assert_array_equal(voter.frames(encoded, length=LENGTH), expected)


def test_windows_spread_from_the_start_to_the_tail(checkpoints: list[Path]) -> None:
    # title 4 + newline leaves 5 body columns; body of 25 -> tail starts at 20
    assert window_starts(4, 25, 10, 1) == [20]
    assert window_starts(4, 25, 10, 3) == [0, 10, 20]
    assert window_starts(4, 3, 10, 3) == [0, 0, 0]

    voter = Voter.from_checkpoints(checkpoints[:1], device="cpu")
    body = "abcdefghijklmnopqrstuvwxy"
    frames = voter.frames(voter.encode([("titl", body)]), length=10, windows=3)
    decoded = [voter.alphabet.decode(f) for f in frames]
    assert decoded == ["titl\nabcde", "titl\nklmno", "titl\nuvwxy"]


def test_probabilities_match_the_model_on_one_hot_frames(
    checkpoints: list[Path], corpus: Corpus
) -> None:
    voter = Voter.from_checkpoints(checkpoints[:1], device="cpu")
    posts = demo_records(10, seed=3)
    probs = voter.member_probs(voter.encode(posts), batch_size=4)[0]

    codes = voter.frames(voter.encode(posts), length=LENGTH)
    onehot = Sampler(corpus, LENGTH, 1).one_hot_table[codes]  # (B, L, V)
    x = torch.from_numpy(onehot).permute(0, 2, 1).float()
    with torch.no_grad():
        direct = torch.softmax(voter.members[0].model(x), 1).numpy()
    np.testing.assert_allclose(probs, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


# Voting


def test_soft_and_hard_votes_differ_where_they_should() -> None:
    # Two checkpoints lean to class 0, one is sure of class 1.
    probs = np.array(
        [[[0.6, 0.4, 0.0]], [[0.6, 0.4, 0.0]], [[0.02, 0.98, 0.0]]], dtype=np.float32
    )
    soft = combine(probs, vote="soft")
    hard = combine(probs, vote="hard")
    assert soft.predicted.tolist() == [1]
    assert hard.predicted.tolist() == [0]
    assert hard.votes[0].tolist() == [2, 1, 0]
    np.testing.assert_allclose(soft.probs[0], [0.406667, 0.593333, 0.0], atol=1e-5)


def test_hard_vote_ties_go_to_the_higher_mean_probability() -> None:
    probs = np.array([[[0.9, 0.1]], [[0.45, 0.55]]], dtype=np.float32)
    hard = combine(probs, vote="hard")
    assert hard.votes[0].tolist() == [1, 1]
    assert hard.predicted.tolist() == [0]


def test_predict_soft_averages_checkpoints(checkpoints: list[Path]) -> None:
    posts = demo_records(12, seed=4)
    one = [Voter.from_checkpoints([p], device="cpu") for p in checkpoints]
    voter = Voter.from_checkpoints(checkpoints, device="cpu")
    each = np.stack([v.member_probs(v.encode(posts))[0] for v in one])

    predictions = voter.predict(posts, top_k=2)
    mean = each.mean(axis=0)
    for i, pred in enumerate(predictions):
        best = int(mean[i].argmax())
        assert pred.label == voter.label_names[best]
        assert pred.probability == pytest.approx(float(mean[i, best]), abs=1e-6)
        assert len(pred.top_k) == 2 and pred.top_k[0] == (pred.label, pred.probability)
        assert pred.votes is None

    hard = voter.predict(posts, vote="hard")
    for i, pred in enumerate(hard):
        tops = each[:, i].argmax(axis=1)
        assert pred.votes == np.bincount(tops).max()


def test_checkpoints_with_other_labels_are_refused(
    tmp_path: Path, checkpoints: list[Path], corpus: Corpus
) -> None:
    names = [*corpus.label_names[:-1], "weather"]
    other = make_checkpoint(tmp_path / "other.pt", label_names=names)
    with pytest.raises(CheckpointError, match="different label sets") as err:
        Voter.from_checkpoints([checkpoints[0], other], device="cpu")
    assert "'weather'" in str(err.value)
    assert repr(corpus.label_names[-1]) in str(err.value)

    shuffled = make_checkpoint(
        tmp_path / "order.pt", label_names=corpus.label_names[::-1]
    )
    with pytest.raises(CheckpointError, match="another order"):
        Voter.from_checkpoints([checkpoints[0], shuffled], device="cpu")


def test_checkpoints_with_other_alphabets_are_refused(
    tmp_path: Path, checkpoints: list[Path], corpus: Corpus
) -> None:
    wide = Alphabet(DEFAULT_ALPHABET + "é")
    other = make_checkpoint(
        tmp_path / "wide.pt", label_names=corpus.label_names, alphabet=wide
    )
    with pytest.raises(CheckpointError, match="different alphabets") as err:
        Voter.from_checkpoints([checkpoints[0], other], device="cpu")
    assert "only in" in str(err.value) and "'é'" in str(err.value)

    cased = Alphabet(DEFAULT_ALPHABET, lowercase=False)
    other = make_checkpoint(
        tmp_path / "case.pt", label_names=corpus.label_names, alphabet=cased
    )
    with pytest.raises(CheckpointError, match=r"lowercase True .* False"):
        Voter.from_checkpoints([checkpoints[0], other], device="cpu")


def test_posts_without_title_or_text_are_refused(checkpoints: list[Path]) -> None:
    voter = Voter.from_checkpoints(checkpoints[:1], device="cpu")
    with pytest.raises(InputError, match="post 2: has no 'title' field"):
        voter.predict([{"title": "a", "text": "b"}, {"text": "b"}])
    with pytest.raises(InputError, match="post 1: the text must be a string"):
        voter.predict([{"title": "a", "text": None}])


# trainerctl vote


def test_vote_writes_json_lines_with_ids(
    tmp_path: Path, checkpoints: list[Path], posts_file: Path, capsys
) -> None:
    out = tmp_path / "votes.jsonl"
    argv = ["vote", "-m", str(checkpoints[0]), "-m", str(checkpoints[1])]
    assert trainerctl([*argv, str(posts_file), "-o", str(out), "--top-k", "2"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]

    assert [r["id"] for r in records] == list(range(1, 31))  # record numbers
    voter = Voter.from_checkpoints(checkpoints[:2], device="cpu")
    expected = voter.predict(demo_records(30, seed=7), top_k=2)
    for record, pred in zip(records, expected, strict=True):
        assert record["label"] == pred.label
        assert record["probability"] == pytest.approx(pred.probability, abs=1e-6)
        assert [name for name, _ in record["top_k"]] == [n for n, _ in pred.top_k]

    # CSV with an id column and no labels; a pickle of dicts with ids
    csv_path = tmp_path / "posts.csv"
    csv_path.write_text('id,title,text\nx1,"Goal, late",striker volley\nx2,Oven,bake\n')
    assert trainerctl(["vote", "-m", str(checkpoints[0]), str(csv_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["x1", "x2"]

    pkl = tmp_path / "posts.pkl"
    pkl.write_bytes(pickle.dumps([{"id": 7, "title": "t", "text": "rocket orbit"}]))
    assert (
        trainerctl(["vote", "-m", str(checkpoints[0]), str(pkl), "--windows", "3"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["id"] == 7


@pytest.mark.slow
def test_vote_reads_stdin_gzip_and_hard_votes(
    checkpoints: list[Path], posts_file: Path
) -> None:
    data = gzip.compress(posts_file.read_bytes())
    argv = ["vote", "-m", str(checkpoints[0]), "-m", str(checkpoints[1])]
    result = run_cli(
        *argv, "-m", str(checkpoints[2]), "--vote", "hard", "-", stdin=data
    )
    assert result.returncode == 0, result.stderr.decode()
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(records) == 30
    assert all(1 <= r["votes"] <= 3 for r in records)
    assert b"voted: 30 posts with 3 checkpoint(s)" in result.stderr


@pytest.fixture(scope="module")
def bad_files(
    tmp_path_factory: pytest.TempPathFactory, checkpoints: list[Path]
) -> dict:
    root = tmp_path_factory.mktemp("bad")
    files = {}
    files["empty"] = root / "empty.jsonl"
    files["empty"].write_bytes(b"")
    files["blank"] = root / "blank.jsonl"
    files["blank"].write_text("\n\n")
    files["no_title"] = root / "no_title.jsonl"
    files["no_title"].write_text('{"title": "a", "text": "b"}\n{"text": "only"}\n')
    files["no_text"] = root / "no_text.jsonl"
    files["no_text"].write_text('{"title": "only a title"}\n')
    data = checkpoints[0].read_bytes()
    files["truncated"] = root / "truncated.pt"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["plain_dict"] = root / "plain.pt"
    torch.save({"weights": torch.zeros(3), "note": "not ours"}, files["plain_dict"])
    files["random"] = root / "random.pt"
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["module"] = root / "module.pt"
    torch.save(torch.nn.Linear(2, 2), files["module"])
    files["pickle"] = root / "pickle.pt"
    files["pickle"].write_bytes(pickle.dumps({"format": "trainerd-checkpoint"}))

    class Hostile:
        def __reduce__(self) -> tuple:
            return (os.system, ("touch pwned",))

    files["hostile"] = root / "hostile.pt"
    torch.save({"format": "trainerd-checkpoint", "x": Hostile()}, files["hostile"])
    files["directory"] = root
    return files


@pytest.mark.slow
@pytest.mark.parametrize(
    ("checkpoint", "posts", "message"),
    [
        (None, "empty", "the file is empty"),
        (None, "blank", "holds no posts"),
        (None, "no_title", "no_title.jsonl:2: record has no 'title' field"),
        (None, "no_text", "no_text.jsonl:1: record has no 'text' field"),
        ("truncated", None, "truncated or corrupt"),
        ("plain_dict", None, "not a trainerd checkpoint"),
        ("random", None, "truncated or corrupt"),
        ("module", None, "not a trainerd checkpoint (it holds torch.nn"),
        ("pickle", None, "truncated or corrupt"),
        (
            "hostile",
            None,
            "hostile.pt: not a trainerd checkpoint (it holds posix.system, which "
            "weights-only loading refuses; nothing from it was run)\n",
        ),
        (
            "directory",
            None,
            ": a directory; expected a checkpoint file, e.g. "
            "runs/RUN/checkpoints/best.pt\n",
        ),
    ],
)
def test_bad_input_is_one_line_without_traceback(
    bad_files: dict,
    checkpoints: list[Path],
    posts_file: Path,
    checkpoint,
    posts,
    message,
) -> None:
    ckpt = bad_files[checkpoint] if checkpoint else checkpoints[0]
    source = bad_files[posts] if posts else posts_file
    result = run_cli("vote", "-m", str(ckpt), str(source))
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" not in stderr
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith("trainerctl vote: error: ")
    assert message in stderr
    assert result.stdout == b""


def test_mismatched_checkpoints_are_refused_by_the_cli(
    tmp_path: Path, checkpoints: list[Path], posts_file: Path, capsys
) -> None:
    other = make_checkpoint(tmp_path / "o.pt", label_names=["a", "b"])
    argv = ["vote", "-m", str(checkpoints[0]), "-m", str(other), str(posts_file)]
    assert trainerctl(argv) == CheckpointError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("trainerctl vote: error: checkpoints ")
    assert "different label sets" in err and err.count("\n") == 1


# trainerctl evaluate


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained by the trainer itself, in process (about a second)."""
    from trainerd.daemon.trainer_main import run_job

    root = tmp_path_factory.mktemp("run")
    config = tiny_job(tiny_corpus(root / "corpus"), train={"epochs": 3})
    run_job(config, run_dir=root / "run", runtime_dir=root, in_process=True)
    return root


def test_evaluate_on_trainer_frames_equals_the_runs_validation(
    trained_run: Path, capsys
) -> None:
    last = trained_run / "run" / "checkpoints" / "last.pt"
    corpus = trained_run / "corpus"
    argv = ["evaluate", "-m", str(last), str(corpus), "--json"]
    assert trainerctl([*argv, "--frames", "trainer"]) == 0
    result = json.loads(capsys.readouterr().out)

    lines = (trained_run / "run" / "validation.jsonl").read_text().splitlines()
    logged = json.loads(lines[-1])
    assert logged["epoch"] == 3
    assert result["samples"] == logged["samples"] == 24
    assert result["accuracy"] == logged["accuracy"]
    assert result["macro_f1"] == logged["macro_f1"]
    assert result["confusion"] == logged["confusion"]
    assert result["loss"] == pytest.approx(logged["loss"], rel=1e-4)
    assert result["checkpoints"][0]["val"]["accuracy"] == logged["accuracy"]

    # Voter frames (the tail) read other windows: a figure of its own, not compared.
    assert trainerctl(argv) == 0
    tail = json.loads(capsys.readouterr().out)
    assert tail["samples"] == 24 and 0.0 <= tail["accuracy"] <= 1.0


def test_evaluate_prints_the_figures_and_tables(
    checkpoints: list[Path], posts_file: Path, capsys
) -> None:
    assert trainerctl(["evaluate", "-m", str(checkpoints[0]), str(posts_file)]) == 0
    out = capsys.readouterr().out
    assert "evaluated 30 posts with 1 checkpoint(s)" in out
    assert "accuracy " in out and "macro-F1 " in out
    assert "precision" in out and "support" in out
    assert "confusion matrix (rows: true label, columns: predicted label)" in out

    assert (
        trainerctl(["evaluate", "-m", str(checkpoints[0]), str(posts_file), "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert sum(result["support"]) == 30
    assert np.array(result["confusion"]).sum() == 30
    correct = np.trace(np.array(result["confusion"]))
    assert result["accuracy"] == pytest.approx(correct / 30)


def test_evaluate_refuses_unknown_labels_and_unlabelled_posts(
    tmp_path: Path, checkpoints: list[Path], capsys
) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"title": "a", "text": "b", "label": "weather"}\n')
    assert trainerctl(["evaluate", "-m", str(checkpoints[0]), str(path)]) == 2
    assert (
        "label 'weather', which the checkpoints do not know" in capsys.readouterr().err
    )
    path.write_text('{"title": "a", "text": "b"}\n')
    assert trainerctl(["evaluate", "-m", str(checkpoints[0]), str(path)]) == 2
    assert "record has no 'label' field" in capsys.readouterr().err


def test_stdin_formats_are_sniffed() -> None:
    from trainerd.daemon.cmd_vote import _sniff

    assert _sniff(b'\n{"title": "a"}', gz=False) == "jsonl"
    assert _sniff(pickle.dumps([{"title": "a"}]), gz=False) == "pickle"
    assert _sniff(b"title,text\na,b\n", gz=False) == "csv"
    assert _sniff(gzip.compress(b'{"a": 1}\n')[:12], gz=True) == "jsonl"


def test_options_out_of_range_are_one_line_errors(
    checkpoints: list[Path], posts_file: Path, capsys
) -> None:
    base = ["-m", str(checkpoints[0]), str(posts_file)]
    cases = [
        (["vote", *base, "--windows", "0"], "--windows must be >= 1, got 0"),
        (["vote", *base, "--top-k", "0"], "--top-k must be >= 1, got 0"),
        (["vote", *base, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["vote", *base, "--device", "tpu"], "--device: must be auto, cpu, cuda"),
        (["evaluate", *base, "--frames", "trainer"], "--frames trainer needs a corpus"),
    ]
    if not torch.cuda.is_available():
        cases.append((["vote", *base, "--device", "cuda"], "CUDA is not available"))
    for argv, message in cases:
        assert trainerctl(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_vote_refuses_to_overwrite_its_input(
    tmp_path: Path, checkpoints: list[Path], posts_file: Path, capsys
) -> None:
    posts = tmp_path / "posts.jsonl"
    posts.write_bytes(posts_file.read_bytes())
    os.link(posts, tmp_path / "alias.jsonl")
    for output in (posts, tmp_path / "." / "posts.jsonl", tmp_path / "alias.jsonl"):
        argv = ["vote", "-m", str(checkpoints[0]), str(posts), "-o", str(output)]
        assert trainerctl(argv) == 2
        err = capsys.readouterr().err
        assert err == (
            f"trainerctl vote: error: -o {output}: is the input file; the votes "
            "would replace the posts, choose another output file\n"
        )
    assert posts.read_bytes() == posts_file.read_bytes()


def test_ids_are_record_numbers_in_every_format(
    tmp_path: Path, checkpoints: list[Path], capsys
) -> None:
    records = [{"title": f"t{i}", "text": f"post {i}"} for i in range(3)]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n" + "\n\n".join(json.dumps(r) for r in records) + "\n")
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("title,text\n" + "".join(f"t{i},post {i}\n" for i in range(3)))
    pkl = tmp_path / "p.pkl"
    pkl.write_bytes(pickle.dumps(records))
    for source in (jsonl, csv_path, pkl):
        assert trainerctl(["vote", "-m", str(checkpoints[0]), str(source)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [json.loads(line)["id"] for line in lines] == [1, 2, 3], source


def test_vote_help_documents_choices_and_defaults() -> None:
    result = run_cli("vote", "--help")
    text = " ".join(result.stdout.decode().split())
    assert "soft: the label of highest probability averaged over checkpoints" in text
    assert "hard: the label most checkpoints put first" in text
    assert "frames per forward pass (default 64)" in text
    assert "labels listed per post (default 3)" in text
    assert "record number counted from 1" in text
