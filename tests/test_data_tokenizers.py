"""Tests for gpt_jax.data.tokenizers."""

import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import requests
import tiktoken
import tiktoken.registry

from gpt_jax.data import tokenizers

_TEXT = "Hello, wörld! ünïcödé → 東京 🙂\nsecond line\ttab"
# A small corpus that BPE can learn a few hundred merges from, quickly.
_CORPUS = "\n".join(
    f"def function_{i}(x, y):\n    return x * {i} + y  # the {i % 7}th of the {i % 3} kinds\n"
    for i in range(300)
) + "\nThe quick brown fox jumps over the lazy dog. Ünïcödé → 東京 🙂\n"
_GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"


def _gpt2_cached() -> bool:
    """Whether tiktoken can load gpt2 offline (its files are in tiktoken's cache)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or (
        os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    return os.path.exists(os.path.join(cache, hashlib.sha1(_GPT2_URL.encode()).hexdigest()))


@pytest.fixture(scope="module")
def bpe() -> tokenizers.BPETokenizer:
    return tokenizers.build_tokenizer("bpe", _CORPUS, vocab_size=400)


@pytest.fixture
def hf_json_path(tmp_path, bpe):
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe.tokenizer_json, encoding="utf-8")
    return path


def test_byte_round_trip_non_ascii():
    tok = tokenizers.build_tokenizer("byte", "")
    ids = tok.encode(_TEXT)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert len(ids) == len(_TEXT.encode("utf-8"))
    assert tok.vocab_size == 256 and tok.name == "byte" and tok.eot_id is None
    assert tok.decode(ids) == _TEXT
    assert tok.decode(list(map(int, ids))) == _TEXT


def test_byte_decode_replaces_invalid_utf8():
    tok = tokenizers.ByteTokenizer()
    # A sampled sequence can cut a multi-byte character in half.
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


def test_decode_rejects_ids_outside_vocab(bpe):
    with pytest.raises(ValueError, match="outside"):
        tokenizers.ByteTokenizer().decode([256])
    with pytest.raises(ValueError, match="outside"):
        tokenizers.CharTokenizer.from_text("ab").decode([2])
    with pytest.raises(ValueError, match="outside the bpe tokenizer's vocab of 400"):
        bpe.decode([400])


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


def test_char_vocab_from_several_texts_is_their_union():
    tok = tokenizers.build_tokenizer("char", iter(["hello", "", "world 🙂"]))
    assert tok.to_dict()["chars"] == " dehlorw🙂"


def test_char_unknown_character_error():
    tok = tokenizers.build_tokenizer("char", "abc")
    with pytest.raises(ValueError, match=r"'z'.*comes from the training corpus"):
        tok.encode("abz")
    # Past the end of the lookup table too.
    with pytest.raises(ValueError, match="not in the char tokenizer"):
        tok.encode("a🙂")


def test_bpe_round_trip_vocab_and_end_of_text(bpe):
    assert bpe.name == "bpe" and bpe.vocab_size == 400 and bpe.eot_id == 0
    for text in (_CORPUS, _TEXT, "never seen: ☃ ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\r\n"):
        ids = bpe.encode(text)
        assert ids.dtype == np.int32 and ids.max() < 400
        assert bpe.decode(ids) == text
    assert len(bpe.encode(_CORPUS)) < len(_CORPUS) / 2  # It learned merges.
    # The special token's text inside a document is text, not a document boundary.
    ids = bpe.encode("a <|endoftext|> b")
    assert 0 not in ids and bpe.decode(ids) == "a <|endoftext|> b"
    assert bpe.decode([0]) == "<|endoftext|>"


def test_bpe_training_is_deterministic(bpe):
    again = tokenizers.build_tokenizer("bpe", iter([_CORPUS]), vocab_size=400)
    assert again.tokenizer_json == bpe.tokenizer_json
    # Another process, one thread: HF's trainer is parallel, and hashes differ per process.
    code = ("import sys, hashlib; from gpt_jax.data import tokenizers; "
            "t = tokenizers.build_tokenizer('bpe', sys.stdin.read(), vocab_size=400); "
            "print(hashlib.sha256(t.tokenizer_json.encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], input=_CORPUS, capture_output=True,
                         text=True, check=True, env={**os.environ, "RAYON_NUM_THREADS": "1"})
    assert out.stdout.strip() == hashlib.sha256(bpe.tokenizer_json.encode()).hexdigest()


def test_bpe_tokenizer_json_is_a_hugging_face_file(bpe, hf_json_path):
    spec = json.loads(bpe.tokenizer_json)
    assert spec["model"]["type"] == "BPE" and spec["pre_tokenizer"]["type"] == "ByteLevel"
    assert spec["added_tokens"][0]["content"] == "<|endoftext|>"
    # HF's own encoder agrees with our tiktoken one on this text (see the module doc).
    hf_tok = tokenizers.build_tokenizer(f"hf:{hf_json_path}", "")
    np.testing.assert_array_equal(hf_tok.encode(_CORPUS), bpe.encode(_CORPUS))


def test_hf_json_round_trip(hf_json_path):
    tok = tokenizers.build_tokenizer(f"hf:{hf_json_path}", "ignored")
    assert tok.name == "hf" and tok.vocab_size == 400 and tok.eot_id == 0
    assert tok.decode(tok.encode(_TEXT)) == _TEXT
    assert 0 not in tok.encode("x<|endoftext|>y")  # Special tokens in text are text.
    with pytest.raises(FileNotFoundError, match="hf:PATH"):
        tokenizers.build_tokenizer(f"hf:{hf_json_path.parent / 'missing.json'}", "")
    hf_json_path.write_text('{"name": "bpe"}')  # Not HF's format (a gpt_jax tokenizer.json).
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        tokenizers.build_tokenizer(f"hf:{hf_json_path}", "")


@pytest.mark.parametrize("name", ["byte", "char", "bpe", "hf"])
def test_save_load_round_trip(tmp_path, hf_json_path, name):
    spec = f"hf:{hf_json_path}" if name == "hf" else name
    tok = tokenizers.build_tokenizer(spec, _CORPUS + _TEXT)
    path = tmp_path / "saved.json"
    tokenizers.save_tokenizer(tok, path)
    assert json.loads(path.read_text(encoding="utf-8"))["name"] == name
    hf_json_path.unlink()  # The saved file alone rebuilds it.
    loaded = tokenizers.load_tokenizer(path)
    assert loaded.name == name and loaded.vocab_size == tok.vocab_size
    assert loaded.eot_id == tok.eot_id and loaded.to_dict() == tok.to_dict()
    np.testing.assert_array_equal(loaded.encode(_TEXT), tok.encode(_TEXT))
    assert tokenizers.tokenizer_from_dict(tok.to_dict()).decode(tok.encode(_TEXT)) == _TEXT


@pytest.mark.skipif(not _gpt2_cached(), reason="tiktoken's gpt2 files are not cached "
                    "(offline machine): set TIKTOKEN_CACHE_DIR to a folder holding them")
def test_gpt2_round_trip():
    tok = tokenizers.build_tokenizer("gpt2", "")
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    np.testing.assert_array_equal(tok.encode("Hello world"), [15496, 995])
    assert tok.decode(tok.encode(_TEXT)) == _TEXT
    assert tokenizers.tokenizer_from_dict(tok.to_dict()).decode(tok.encode(_TEXT)) == _TEXT


def test_gpt2_wrapper_on_a_stand_in_encoding(monkeypatch):
    # tiktoken's real gpt2 file may be unreachable: the wrapper runs on a byte-only stand-in.
    fake = tiktoken.Encoding("gpt2", pat_str=tokenizers._GPT2_PATTERN,
                             mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={"<|endoftext|>": 50256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    tok = tokenizers.build_tokenizer("gpt2", "")
    assert tok.name == "gpt2" and tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.decode(tok.encode(_TEXT)) == _TEXT
    assert tok.decode([50256]) == "<|endoftext|>"
    assert tok.to_dict() == {"name": "gpt2"}


def test_gpt2_offline_error_says_how_to_provide_the_files(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(requests, "get", offline)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # Nothing loaded before.
    with pytest.raises(ValueError, match=r"gpt2 .*TIKTOKEN_CACHE_DIR.*--tokenizer=bpe") as e:
        tokenizers.build_tokenizer("gpt2", "")
    assert "\n" not in str(e.value)


def test_bpe_vocab_size_checks():
    with pytest.raises(ValueError, match="≥ 257"):
        tokenizers.build_tokenizer("bpe", "abc", vocab_size=256)
    with pytest.raises(ValueError, match="only to the bpe tokenizer"):
        tokenizers.build_tokenizer("byte", "abc", vocab_size=1000)
    # A corpus with too few pairs gives a smaller vocab than asked for, never a broken one.
    tok = tokenizers.build_tokenizer("bpe", "abab", vocab_size=1000)
    assert 257 < tok.vocab_size < 1000 and tok.decode(tok.encode("abba")) == "abba"


def test_unknown_tokenizer_lists_valid_names():
    with pytest.raises(ValueError, match="byte, char, bpe, gpt2, or hf:PATH"):
        tokenizers.build_tokenizer("wordpiece", "x")
    with pytest.raises(ValueError, match="unknown tokenizer 'hf:'"):
        tokenizers.check_name("hf:")
    assert tokenizers.learns_vocab("bpe") and not tokenizers.learns_vocab("gpt2")


def test_ids_the_tokenizer_lacks_decode_as_replacement_characters():
    """A model's vocab may exceed its tokenizer's: such ids show as U+FFFD and are counted."""
    tok = tokenizers.CharTokenizer("\nab")
    assert tokenizers.decode_known(tok, [1, 2, 7, 0, 1, 3]) == ("ab\ufffd\na\ufffd", 2)
    assert tokenizers.decode_known(tok, [1, 2]) == ("ab", 0)
