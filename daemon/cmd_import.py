"""trainerctl import: turn a file of posts into a corpus store.

The work happens here, in the calling process; no daemon is needed. The store is
written beside --out under a hidden name and renamed into place when complete.
"""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Read posts (a title, a body text and a label each) from SOURCE and write a corpus
store to CORPUS_DIR: flat, memory-mapped arrays of encoded characters that training
jobs open in constant time.

SOURCE formats, told apart by the file name unless --format says:
  pickle      .pkl/.pickle: a list of dicts, or of (title, text, label) tuples;
              loaded with a restricted unpickler (containers, strings, numbers only)
  JSON lines  .jsonl/.jsonl.gz: one object per line
  CSV         .csv/.csv.gz: a header row naming the columns, or --columns for
              header-less files such as AG News' (--columns label,title,text)

Labels may be strings or integers; their names are kept and sorted (integers by
value). Validation posts come from --val SOURCE2, or else a seeded shuffle of SOURCE
gives --val-fraction of it to validation.
"""

EPILOG = """\
examples:
  trainerctl import train.jsonl.gz --val test.jsonl.gz --out corpora/20ng
  trainerctl import ag_news.csv --columns label,title,text --out corpora/ag
  trainerctl import posts.pkl --val-fraction 0.2 --seed 7 --out corpora/posts
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Adds this module's commands to trainerctl."""
    p = sub.add_parser(
        "import",
        help="import posts from a pickle, JSON lines or CSV file into a corpus store",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="file of posts to import")
    p.add_argument(
        "--out",
        metavar="CORPUS_DIR",
        required=True,
        help="store directory to create (refused if it exists, unless --force)",
    )
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--val-fraction",
        metavar="F",
        type=float,
        default=None,
        help="share of SOURCE drawn at random for validation, in (0, 1); the "
        "validation split must not be empty (default 0.1)",
    )
    split.add_argument(
        "--val",
        metavar="SOURCE2",
        default=None,
        help="file of validation posts; all of SOURCE then trains",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the split's shuffle, a non-negative integer (default 0)",
    )
    p.add_argument(
        "--format",
        choices=("auto", "pickle", "jsonl", "csv"),
        default="auto",
        help="format of SOURCE and SOURCE2 (default: from the file name)",
    )
    p.add_argument(
        "--columns",
        metavar="NAMES",
        default=None,
        help="comma-separated column names of a header-less CSV, e.g. "
        "label,title,text (a first row equal to them is refused as a header)",
    )
    p.add_argument(
        "--title-field", default="title", metavar="T", help="field of the title"
    )
    p.add_argument(
        "--text-field", default="text", metavar="X", help="field of the body text"
    )
    p.add_argument(
        "--label-field", default="label", metavar="L", help="field of the label"
    )
    p.add_argument(
        "--alphabet",
        metavar="SYMBOLS",
        default=None,
        help="the alphabet's symbols in order (write newline as \\n, backslash as "
        "\\\\); default: the 69 symbols of the character CNN paper",
    )
    p.add_argument(
        "--keep-case",
        action="store_true",
        help="do not lower-case text; the default alphabet then gains A-Z",
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing store at CORPUS_DIR"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="never draw a progress bar"
    )
    p.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    """Handler of `trainerctl import`."""
    from trainerd.producers.encoding import DEFAULT_ALPHABET, Alphabet
    from trainerd.producers.importer import (
        DEFAULT_VAL_FRACTION,
        Fields,
        import_corpus,
        parse_alphabet,
        parse_columns,
    )

    if args.alphabet is not None:
        symbols = parse_alphabet(args.alphabet)
    elif args.keep_case:
        symbols = DEFAULT_ALPHABET + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    else:
        symbols = DEFAULT_ALPHABET
    fields = Fields(
        title=args.title_field,
        text=args.text_field,
        label=args.label_field,
        columns=parse_columns(args.columns) if args.columns else None,
    )
    import_corpus(
        args.source,
        args.out,
        val_source=args.val,
        val_fraction=(
            DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
        ),
        seed=args.seed,
        fmt=args.format,
        fields=fields,
        alphabet=Alphabet(symbols, lowercase=not args.keep_case),
        force=args.force,
        progress=False if args.no_progress else None,
        echo=print,
    )
    return 0
