"""Text normalisation and the alphabet that maps characters to codes.

Code 0 means both "not in the alphabet" and "padding"; it becomes an all-zero column
in the one-hot form. Codes 1..V are the alphabet's symbols in order.
"""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass

import numpy as np

from trainerd.producers.errors import ConfigError

# The symbols of Zhang, Zhao and LeCun (2015): their list names '-' twice, so it has
# 69 distinct symbols, the newline included.
DEFAULT_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyz0123456789-,;.!?:'\"/\\|_@#$%^&*~`+=<>()[]{}\n"
)
NORMALISATION = "NFKD, combining marks dropped"
MAX_SYMBOLS = 255
SURROGATES = "surrogatepass"


@functools.cache
def _combining_table() -> np.ndarray:
    """A bool per code point below 0x30000: True where the character is a combining mark."""
    table = np.zeros(0x30000, dtype=bool)
    for cp in range(0x300, 0x30000):
        if unicodedata.combining(chr(cp)):
            table[cp] = True
    return table


def normalise(text: str, *, lowercase: bool = True) -> str:
    """Folds text to the form the alphabet sees: NFKD with combining marks dropped."""
    if text.isascii():
        return text.lower() if lowercase else text
    decomposed = unicodedata.normalize("NFKD", text)
    # Lower-case after decomposing: compatibility forms such as U+1D400 (bold A)
    # only become a plain capital letter there.
    if lowercase:
        decomposed = decomposed.lower()
    # Lone surrogates (JSON allows "\ud800") pass through and encode to code 0.
    points = np.frombuffer(decomposed.encode("utf-32-le", SURROGATES), dtype=np.uint32)
    table = _combining_table()
    marks = table[np.minimum(points, table.size - 1)]
    if not marks.any():
        return decomposed
    return points[~marks].tobytes().decode("utf-32-le", SURROGATES)


@dataclass(frozen=True)
class Alphabet:
    """An ordered set of symbols; symbol i (0-based) has code i + 1."""

    symbols: str = DEFAULT_ALPHABET
    lowercase: bool = True

    def __post_init__(self) -> None:
        if not self.symbols:
            raise ConfigError("alphabet: must hold at least one symbol, got ''")
        if len(set(self.symbols)) != len(self.symbols):
            seen = sorted({c for c in self.symbols if self.symbols.count(c) > 1})
            raise ConfigError(f"alphabet: symbols must be distinct, repeated: {seen!r}")
        if len(self.symbols) > MAX_SYMBOLS:
            raise ConfigError(
                f"alphabet: at most {MAX_SYMBOLS} symbols fit a uint8 code, "
                f"got {len(self.symbols)}"
            )

    @property
    def size(self) -> int:
        """V, the number of symbols: the one-hot width."""
        return len(self.symbols)

    @functools.cached_property
    def _table(self) -> np.ndarray:
        points = [ord(c) for c in self.symbols]
        table = np.zeros(max(points) + 2, dtype=np.uint8)
        table[points] = np.arange(1, len(points) + 1, dtype=np.uint8)
        return table

    def code_of(self, char: str) -> int:
        """The code of one character after normalisation, 0 when outside the alphabet."""
        point = ord(char)
        return int(self._table[point]) if point < self._table.size else 0

    def encode(self, text: str) -> np.ndarray:
        """Normalises text and returns its codes as a fresh uint8 array."""
        folded = normalise(text, lowercase=self.lowercase)
        points = np.frombuffer(folded.encode("utf-32-le", SURROGATES), dtype=np.uint32)
        table = self._table
        return table[np.minimum(points, table.size - 1)]

    def decode(self, codes: np.ndarray, *, unknown: str = "\x00") -> str:
        """Maps codes back to symbols; 0 becomes `unknown` (for tests and debugging)."""
        # A list, not a numpy string array: numpy drops trailing NULs, so "\x00"
        # would vanish.
        lookup = [unknown, *self.symbols]
        return "".join([lookup[c] for c in np.asarray(codes, dtype=np.int64).tolist()])

    def to_dict(self) -> dict:
        """The form stored in corpus metadata and checkpoints."""
        return {
            "symbols": self.symbols,
            "lowercase": self.lowercase,
            "normalisation": NORMALISATION,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Alphabet:
        """Rebuilds an alphabet from `to_dict`'s form."""
        return cls(symbols=data["symbols"], lowercase=bool(data["lowercase"]))
