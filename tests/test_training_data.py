"""Tests for gpt_jax.data.training_data: the one opener of prepared folders (in-process or CLI)."""

import hashlib
import json
import pathlib

import numpy as np
import pytest

from gpt_jax.data import prepare, prepare_stream, shards, training_data
from gpt_jax.data.corpora import Corpus
from gpt_jax.data.pipeline import TokenStream

_TEXT = "".join(f"line {i}: {'é' * (i % 3)} the quick fox\n" for i in range(40))


def _corpus(text: str) -> Corpus:
    return Corpus(text=text, description="test", sha256=hashlib.sha256(text.encode()).hexdigest())


def _cli_folder(tmp_path: pathlib.Path, name: str, text: str, tokenizer: str = "byte",
                **kwargs) -> pathlib.Path:
    """A folder made as the prepare CLI makes it, from a text file of `text`."""
    source = tmp_path / f"{name}.txt"
    source.write_text(text, encoding="utf-8")
    out = tmp_path / name
    prepare_stream.prepare_folder(str(source), tokenizer, out, num_workers=1,
                                  show_progress=False, **kwargs)
    return out


def _all(stream: TokenStream) -> np.ndarray:
    return stream.read(0, len(stream))


def test_one_folder(tmp_path):
    folder = _cli_folder(tmp_path, "a", _TEXT, shard_tokens=200, chunk_bytes=128)
    data = training_data.open_folders([str(folder)], None)
    p = shards.open_shards(folder)
    assert len(p.meta["shards"]) > 2
    assert data.names == [str(folder)] and data.weights is None
    assert data.tokenizer.name == "byte" and data.eot_id is None
    train, val = data.train_tokens(), data.val_tokens()
    assert isinstance(train, TokenStream) and train.num_parts > 2
    np.testing.assert_array_equal(_all(train), np.concatenate(p.train))
    np.testing.assert_array_equal(_all(val), np.concatenate(p.val))
    assert len(train) == p.meta["train_tokens"] and len(val) == p.meta["val_tokens"]


def test_mixture_with_weights(tmp_path):
    a = _cli_folder(tmp_path, "a", _TEXT)
    b = _cli_folder(tmp_path, "b", _TEXT[:300])
    data = training_data.open_folders([str(a), str(b)], [3, 1])
    assert data.weights == [0.75, 0.25] and data.names == [str(a), str(b)]
    train = data.train_tokens()
    assert isinstance(train, list) and [len(t) for t in train] == [
        shards.read_meta(f)["train_tokens"] for f in (a, b)]
    np.testing.assert_array_equal(_all(data.val_tokens()),
                                  np.concatenate(shards.open_shards(a).val))  # The first's.
    # Without weights: proportional to the folders' train tokens.
    sizes = [len(t) for t in train]
    assert training_data.open_folders([str(a), str(b)], None).weights == pytest.approx(
        [sizes[0] / sum(sizes), sizes[1] / sum(sizes)])
    with pytest.raises(ValueError, match="3 weight.*for 2 data.prepared"):
        training_data.open_folders([str(a), str(b)], [1, 2, 3])


def test_mismatched_tokenizers_are_refused_in_one_line(tmp_path):
    byte = _cli_folder(tmp_path, "byte", _TEXT)
    char = _cli_folder(tmp_path, "char", _TEXT, tokenizer="char")
    with pytest.raises(ValueError, match="different tokenizers; prepare every dataset") as e:
        training_data.open_folders([str(byte), str(char)], None)
    assert "\n" not in str(e.value) and "byte, vocab 256" in str(e.value)


def test_empty_train_split_is_refused(tmp_path):
    # Two tokens ("a" and the byte tokenizer's "\n" separator): int(2 · 0.4) = 0 train.
    folder = _cli_folder(tmp_path, "tiny", "a", val_fraction=0.6)
    assert shards.read_meta(folder)["train_tokens"] == 0
    with pytest.raises(ValueError, match="has no train tokens") as e:
        training_data.open_folders([str(folder)], None)
    assert "\n" not in str(e.value)


def test_missing_and_old_format_folders_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared data folder"):
        training_data.open_folders([str(tmp_path / "missing")], None)
    old = tmp_path / "old"
    old.mkdir()
    np.arange(10, dtype=np.uint16).tofile(old / "train.bin")
    with pytest.raises(ValueError, match="old train.bin/val.bin format") as e:
        training_data.open_folders([str(old)], None)
    assert "\n" not in str(e.value)


def test_verify_checks_every_shard_before_training_opens_it(tmp_path, caplog):
    """data.verify_shards: open_folders(verify=True) compares each shard with its sha256."""
    a = _cli_folder(tmp_path, "a", _TEXT, shard_tokens=200, chunk_bytes=128)
    b = _cli_folder(tmp_path, "b", _TEXT[:300])
    with caplog.at_level("INFO", logger="absl"):
        training_data.open_folders([str(a), str(b)], None, verify=True)
    assert caplog.text.count("match their sha256") == 2
    shard = a / shards.read_meta(a)["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[0] ^= 0xFF  # The same size: only the checksum tells.
    shard.write_bytes(bytes(data))
    training_data.open_folders([str(a)], None)  # Unverified: opened, sizes being right.
    with pytest.raises(ValueError, match=f"{shard.name} does not match its sha256") as e:
        training_data.open_folders([str(b), str(a)], None, verify=True)
    assert "\n" not in str(e.value)


def test_a_truncated_shard_is_one_line_naming_it(tmp_path):
    folder = _cli_folder(tmp_path, "a", _TEXT, shard_tokens=200, chunk_bytes=128)
    shard = folder / shards.read_meta(folder)["shards"][-1]["file"]
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(ValueError, match=f"{shard.name} is truncated") as e:
        training_data.open_folders([str(folder)], None)
    assert "\n" not in str(e.value)


def test_prepared_vocab_size(tmp_path):
    char = _cli_folder(tmp_path, "char", _TEXT, tokenizer="char")
    assert training_data.prepared_vocab_size(str(char)) == len(set(_TEXT))
    folder = prepare.prepare(_corpus(_TEXT), "byte", str(tmp_path / "cache"), 0.1)
    assert training_data.prepared_vocab_size(str(folder)) == 256
    assert training_data.prepared_vocab_size(str(tmp_path / "missing")) is None
    (tmp_path / "old").mkdir()  # The old in-process meta.json has no vocab size: not read.
    (tmp_path / "old" / "meta.json").write_text(json.dumps({"version": 1,
                                                            "tokenizer": {"name": "byte"}}))
    assert training_data.prepared_vocab_size(str(tmp_path / "old")) is None


def _keys(meta: dict) -> dict:
    """The schema of a meta.json: its keys, and those of its nested records."""
    return {"top": sorted(meta), "source": sorted(meta["source"]),
            "tokenizer": sorted(meta["tokenizer"]), "shard": sorted(meta["shards"][0]),
            "splits": sorted(meta["splits"]), "range": sorted(meta["splits"]["train"][0])}


def test_in_process_and_cli_folders_share_the_format_and_tokens(tmp_path):
    cli = _cli_folder(tmp_path, "cli", _TEXT)
    in_process = prepare.prepare(_corpus(_TEXT), "byte", str(tmp_path / "cache"), 0.1)
    cli_meta, ip_meta = shards.read_meta(cli), shards.read_meta(in_process)
    assert _keys(ip_meta) == _keys(cli_meta)
    assert sorted(p.name for p in in_process.iterdir()) == sorted(p.name for p in cli.iterdir())
    for key in ("format", "version", "vocab_size", "eot_id", "dtype"):
        assert ip_meta[key] == cli_meta[key]
    shards.verify(in_process)
    # The same tokens, except the separator the CLI appends after each document (byte: "\n");
    # the in-process path appends none, so runs read the tokens they always read.
    assert (cli_meta["separator"], ip_meta["separator"]) == ([10], [])
    cli_data = training_data.open_folders([str(cli)], None)
    ip_data = training_data.open_folders([str(in_process)], None)
    cli_stream = np.concatenate([_all(cli_data.train_tokens()), _all(cli_data.val_tokens())])
    ip_stream = np.concatenate([_all(ip_data.train_tokens()), _all(ip_data.val_tokens())])
    np.testing.assert_array_equal(cli_stream, np.append(ip_stream, 10))
    np.testing.assert_array_equal(ip_stream, np.frombuffer(_TEXT.encode(), np.uint8))
    assert len(ip_data.train_tokens()) == int(len(ip_stream) * 0.9)  # nanoGPT's split.
    assert ip_data.tokenizer.to_dict() == cli_data.tokenizer.to_dict()
