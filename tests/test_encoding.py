"""Normalisation and the alphabet: exact codes for hand-written text."""

from __future__ import annotations

import numpy as np
import pytest

from trainerd.producers.encoding import DEFAULT_ALPHABET, Alphabet, normalise
from trainerd.producers.errors import ConfigError


def test_czech_diacritics_fold_to_latin_letters() -> None:
    assert normalise("Příliš žluťoučký kůň") == "prilis zlutoucky kun"


def test_french_and_german_fold_too() -> None:
    assert normalise("Ça déjà été Über") == "ca deja ete uber"


def test_keep_case_keeps_capitals() -> None:
    assert normalise("Kůň ABC", lowercase=False) == "Kun ABC"


def test_compatibility_forms_lower_case_after_folding() -> None:
    # U+1D400 MATHEMATICAL BOLD CAPITAL A only becomes "A" under NFKD.
    assert normalise("\U0001d400\uff22") == "ab"


def test_default_alphabet_has_69_symbols_newline_last() -> None:
    alphabet = Alphabet()
    assert alphabet.size == 69
    assert len(set(DEFAULT_ALPHABET)) == 69
    assert alphabet.code_of("a") == 1
    assert alphabet.code_of("z") == 26
    assert alphabet.code_of("0") == 27
    assert alphabet.code_of("-") == 37
    assert alphabet.code_of("\n") == 69
    assert alphabet.code_of(" ") == 0
    assert alphabet.code_of("\u20ac") == 0


def test_encode_hand_computed() -> None:
    codes = Alphabet().encode("Ab z9\n€é")
    assert codes.dtype == np.uint8
    assert codes.tolist() == [1, 2, 0, 26, 36, 69, 0, 5]


def test_nul_and_lone_surrogates_encode_to_zero() -> None:
    assert Alphabet().encode("a\x00b\ud800c").tolist() == [1, 0, 2, 0, 3]


def test_decode_round_trip() -> None:
    alphabet = Alphabet()
    text = "hello, world!\n(42)"
    assert alphabet.decode(alphabet.encode(text), unknown=" ") == text
    assert alphabet.decode(np.array([1, 0, 2]), unknown="_") == "a_b"


def test_custom_alphabet_codes_follow_symbol_order() -> None:
    alphabet = Alphabet("zyx", lowercase=False)
    assert alphabet.encode("xyzZ").tolist() == [3, 2, 1, 0]


def test_dict_round_trip() -> None:
    alphabet = Alphabet("abc\n", lowercase=False)
    data = alphabet.to_dict()
    assert data["normalisation"] == "NFKD, combining marks dropped"
    assert Alphabet.from_dict(data) == alphabet


@pytest.mark.parametrize(
    ("symbols", "message"),
    [
        ("", "at least one symbol"),
        ("abca", "repeated: ['a']"),
        ("".join(chr(0x100 + i) for i in range(256)), "at most 255"),
    ],
)
def test_bad_alphabets_are_config_errors(symbols: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        Alphabet(symbols)
