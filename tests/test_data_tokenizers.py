"""Tests for gpt_jax.data.tokenizers."""

import json

import numpy as np
import pytest

from gpt_jax.data import tokenizers

_TEXT = "Hello, wörld! ünïcödé → 東京 🙂\nsecond line\ttab"


def test_byte_round_trip_non_ascii():
    tok = tokenizers.build_tokenizer("byte", "")
    ids = tok.encode(_TEXT)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert len(ids) == len(_TEXT.encode("utf-8"))
    assert tok.vocab_size == 256 and tok.name == "byte"
    assert tok.decode(ids) == _TEXT
    assert tok.decode(list(map(int, ids))) == _TEXT


def test_byte_decode_replaces_invalid_utf8():
    tok = tokenizers.ByteTokenizer()
    # A sampled sequence can cut a multi-byte character in half.
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


def test_decode_rejects_ids_outside_vocab():
    with pytest.raises(ValueError, match="outside"):
        tokenizers.ByteTokenizer().decode([256])
    with pytest.raises(ValueError, match="outside"):
        tokenizers.CharTokenizer.from_text("ab").decode([2])


def test_char_vocab_is_sorted_unique_chars():
    tok = tokenizers.build_tokenizer("char", "hello world")
    assert tok.name == "char"
    assert tok.to_dict()["chars"] == " dehlorw"
    assert tok.vocab_size == 8
    np.testing.assert_array_equal(tok.encode("hello"), [3, 2, 4, 4, 5])


def test_char_round_trip():
    tok = tokenizers.build_tokenizer("char", _TEXT)
    ids = tok.encode(_TEXT)
    assert ids.dtype == np.int32
    assert tok.vocab_size == len(set(_TEXT))
    assert tok.decode(ids) == _TEXT
    assert ids.max() == tok.vocab_size - 1


def test_char_unknown_character_error():
    tok = tokenizers.build_tokenizer("char", "abc")
    with pytest.raises(ValueError, match=r"'z'.*comes from the training corpus"):
        tok.encode("abz")
    # Past the end of the lookup table too.
    with pytest.raises(ValueError, match="not in the char tokenizer"):
        tok.encode("a🙂")


@pytest.mark.parametrize("name", tokenizers.TOKENIZERS)
def test_save_load_round_trip(tmp_path, name):
    tok = tokenizers.build_tokenizer(name, _TEXT)
    path = tmp_path / "tokenizer.json"
    tokenizers.save_tokenizer(tok, path)
    assert json.loads(path.read_text(encoding="utf-8"))["name"] == name
    loaded = tokenizers.load_tokenizer(path)
    assert loaded.name == name and loaded.vocab_size == tok.vocab_size
    np.testing.assert_array_equal(loaded.encode(_TEXT), tok.encode(_TEXT))
    assert tokenizers.tokenizer_from_dict(tok.to_dict()).decode(tok.encode(_TEXT)) == _TEXT


def test_unknown_tokenizer_lists_valid_names():
    with pytest.raises(ValueError, match="byte, char"):
        tokenizers.build_tokenizer("bpe", "x")
