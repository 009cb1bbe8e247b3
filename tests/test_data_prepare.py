"""Tests for gpt_jax.data.prepare."""

import hashlib
import json

import numpy as np
import pytest

from gpt_jax.data import prepare as prepare_lib
from gpt_jax.data.corpora import Corpus


def _corpus(text: str) -> Corpus:
    return Corpus(text=text, description="test", sha256=hashlib.sha256(text.encode()).hexdigest())


_TEXT = "".join(chr(ord("a") + (i * 7) % 26) for i in range(1000))


def test_char_split_counts_dtype_and_files(tmp_path):
    prepared = prepare_lib.prepare(_corpus(_TEXT), "char", str(tmp_path), val_fraction=0.1)
    assert prepared.dir.parent == tmp_path / "prepared"
    assert sorted(p.name for p in prepared.dir.iterdir()) == [
        "meta.json", "tokenizer.json", "train.bin", "val.bin"
    ]
    meta = json.loads((prepared.dir / "meta.json").read_text())
    assert meta == prepared.meta
    assert meta["dtype"] == "uint16"
    assert (meta["train_tokens"], meta["val_tokens"]) == (900, 100)
    assert meta["source_sha256"] == _corpus(_TEXT).sha256
    assert meta["tokenizer"] == {"name": "char", "chars": "abcdefghijklmnopqrstuvwxyz"}
    assert meta["val_fraction"] == 0.1
    train, val = prepared.train_tokens(), prepared.val_tokens()
    assert isinstance(train, np.memmap) and not train.flags.writeable
    assert train.dtype == np.uint16 and train.shape == (900,)
    assert prepared.train_path.stat().st_size == 900 * 2
    # The split is of the token stream: concatenated, it is the whole encoded text.
    np.testing.assert_array_equal(
        np.concatenate([train, val]), prepared.tokenizer.encode(_TEXT)
    )
    assert prepared.tokenizer.decode(val) == _TEXT[900:]


def test_byte_split_is_of_tokens_not_characters(tmp_path):
    text = "é" * 50 + "a" * 50  # 150 bytes: a character split would differ.
    prepared = prepare_lib.prepare(_corpus(text), "byte", str(tmp_path), val_fraction=0.1)
    assert (prepared.meta["train_tokens"], prepared.meta["val_tokens"]) == (135, 15)
    assert np.all(prepared.val_tokens() == ord("a"))


def test_large_vocab_uses_uint32(tmp_path):
    text = "".join(chr(0x10000 + i) for i in range(65537)) * 2
    prepared = prepare_lib.prepare(_corpus(text), "char", str(tmp_path), val_fraction=0.5)
    assert prepared.meta["dtype"] == "uint32"
    assert prepared.val_tokens()[-1] == 65536


def test_reuses_up_to_date_folder(tmp_path, caplog):
    first = prepare_lib.prepare(_corpus(_TEXT), "char", str(tmp_path), val_fraction=0.1)
    mtime = first.train_path.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="absl"):
        second = prepare_lib.prepare(_corpus(_TEXT), "char", str(tmp_path), val_fraction=0.1)
    assert second.dir == first.dir
    assert second.train_path.stat().st_mtime_ns == mtime
    assert "Reusing" in caplog.text


def test_reprepares_when_source_or_settings_change(tmp_path):
    first = prepare_lib.prepare(_corpus(_TEXT), "char", str(tmp_path), val_fraction=0.1)
    changed = prepare_lib.prepare(_corpus(_TEXT + "z"), "char", str(tmp_path), val_fraction=0.1)
    other_split = prepare_lib.prepare(_corpus(_TEXT), "char", str(tmp_path), val_fraction=0.2)
    other_tok = prepare_lib.prepare(_corpus(_TEXT), "byte", str(tmp_path), val_fraction=0.1)
    assert len({first.dir, changed.dir, other_split.dir, other_tok.dir}) == 4
    assert changed.meta["train_tokens"] + changed.meta["val_tokens"] == 1001


def test_damaged_folder_is_rewritten(tmp_path):
    first = prepare_lib.prepare(_corpus(_TEXT), "char", str(tmp_path), val_fraction=0.1)
    expected = np.array(first.train_tokens())
    first.train_path.write_bytes(b"\x00" * 10)  # Truncated: meta.json no longer matches.
    again = prepare_lib.prepare(_corpus(_TEXT), "char", str(tmp_path), val_fraction=0.1)
    np.testing.assert_array_equal(again.train_tokens(), expected)


def test_interrupted_prepare_leaves_no_folder(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_lib.tokenizers, "save_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_lib.prepare(_corpus(_TEXT), "char", str(tmp_path), val_fraction=0.1)
    assert list((tmp_path / "prepared").iterdir()) == []


def test_load_prepared_round_trip_and_errors(tmp_path):
    prepared = prepare_lib.prepare(_corpus(_TEXT), "char", str(tmp_path), val_fraction=0.1)
    loaded = prepare_lib.load_prepared(str(prepared.dir))
    assert loaded.meta == prepared.meta
    np.testing.assert_array_equal(loaded.val_tokens(), prepared.val_tokens())
    with pytest.raises(FileNotFoundError, match=r"data\.prepared"):
        prepare_lib.load_prepared(tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_lib.prepare(_corpus(_TEXT), "char", str(tmp_path), val_fraction=1.0)


def test_load_prepared_rejects_a_vocab_too_large_for_its_token_dtype(tmp_path):
    prepared = prepare_lib.prepare(_corpus(_TEXT), "byte", str(tmp_path), val_fraction=0.1)
    meta = json.loads((prepared.dir / "meta.json").read_text())
    meta["dtype"] = "uint8"
    (prepared.dir / "meta.json").write_text(json.dumps(meta))
    prepare_lib.load_prepared(prepared.dir)  # 256 ids fit in uint8.
    (prepared.dir / "tokenizer.json").write_text(json.dumps({"name": "char", "chars": "".join(
        chr(0x4E00 + i) for i in range(300))}))
    with pytest.raises(ValueError, match="stores tokens as uint8"):
        prepare_lib.load_prepared(prepared.dir)
