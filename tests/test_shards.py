"""Tests for gpt_jax.data.shards: the one prepared-folder format (writer, split, reader, checks)."""

import json
import pathlib

import numpy as np
import pytest

from gpt_jax.data import shards, tokenizers

# Chunks of a token stream (ids < 256, so the byte tokenizer describes them) and the shards a
# ShardWriter with shard_tokens=10 cuts them into: a shard closes at the first chunk past 10.
_CHUNKS = [np.arange(4), np.arange(10, 17), np.arange(20, 23), np.arange(30, 42), np.array([99])]
_SHARD_SIZES = [11, 15, 1]


def _write_folder(folder: pathlib.Path, val_fraction: float = 0.25) -> dict:
    """A complete prepared folder of _CHUNKS (each chunk one document of 100 bytes)."""
    folder.mkdir()
    tokenizers.save_tokenizer(tokenizers.ByteTokenizer(), folder / shards.TOKENIZER)
    progress = {"fingerprint": "f", "shards": []}
    writer = shards.ShardWriter(folder, progress, "uint16", shard_tokens=10)
    for i, chunk in enumerate(_CHUNKS):
        writer.write(chunk, docs=1, nbytes=100, chunks_end=i + 1)
    writer.flush()
    return shards.write_meta(folder, progress, {
        "fingerprint": "f",
        "source": {"spec": "test", "description": "test", "fingerprint": {}},
        "tokenizer": {"spec": "byte", "name": "byte", "vocab_size": 256, "eot_id": None,
                      "sha256": shards.sha256_file(folder / shards.TOKENIZER)},
        "vocab_size": 256, "eot_id": None, "separator": [], "dtype": "uint16",
        "options": {"val_fraction": val_fraction},
    })


def test_shard_writer_round_trip(tmp_path):
    meta = _write_folder(tmp_path / "p")
    stream = np.concatenate(_CHUNKS)
    assert [s["file"] for s in meta["shards"]] == [shards.shard_name(i) for i in range(3)]
    assert [s["tokens"] for s in meta["shards"]] == _SHARD_SIZES
    assert [(s["docs"], s["bytes"]) for s in meta["shards"]] == [(2, 200), (2, 200), (1, 100)]
    assert all("chunks_end" not in s for s in meta["shards"])  # Resume state stays out.
    assert (meta["total_tokens"], meta["train_tokens"], meta["val_tokens"]) == (27, 20, 7)
    assert meta["source"]["docs"] == 5 and meta["source"]["bytes"] == 500
    assert not (tmp_path / "p" / shards.PROGRESS).exists()
    assert shards.read_meta(tmp_path / "p") == meta
    files = [np.fromfile(tmp_path / "p" / s["file"], np.uint16) for s in meta["shards"]]
    np.testing.assert_array_equal(np.concatenate(files), stream)
    p = shards.open_shards(tmp_path / "p")
    assert (p.num_train_tokens, p.num_val_tokens) == (20, 7) and p.dtype == np.uint16
    np.testing.assert_array_equal(np.concatenate(p.train), stream[:20])
    np.testing.assert_array_equal(np.concatenate(p.val), stream[20:])
    assert p.tokenizer.name == "byte" and p.eot_id is None
    shards.verify(tmp_path / "p")


def test_shard_writer_records_progress_after_each_shard(tmp_path):
    progress = {"shards": []}
    writer = shards.ShardWriter(tmp_path, progress, "uint32", shard_tokens=5)
    writer.write(np.arange(6), docs=0, nbytes=6, chunks_end=1)
    saved = json.loads((tmp_path / shards.PROGRESS).read_text())
    assert [s["chunks_end"] for s in saved["shards"]] == [1]
    writer.write(np.arange(2), docs=1, nbytes=2, chunks_end=2)
    assert not (tmp_path / shards.shard_name(1)).exists()  # Still open: under shard_tokens.
    writer.abandon()
    assert len(json.loads((tmp_path / shards.PROGRESS).read_text())["shards"]) == 1
    assert (tmp_path / shards.shard_name(0)).stat().st_size == 6 * 4


@pytest.mark.parametrize(("num_train", "train", "val"), [
    (7, [("a", 0, 5), ("b", 0, 2)], [("b", 2, 3), ("c", 0, 5)]),
    (5, [("a", 0, 5)], [("b", 0, 5), ("c", 0, 5)]),  # On a shard boundary.
    (0, [], [("a", 0, 5), ("b", 0, 5), ("c", 0, 5)]),
    (15, [("a", 0, 5), ("b", 0, 5), ("c", 0, 5)], []),
])
def test_split_ranges(num_train, train, val):
    records = [{"file": f, "tokens": 5} for f in "abc"]
    ranges = shards.split_ranges(records, num_train)

    def as_tuples(split):
        return [(r["file"], r["start"], r["tokens"]) for r in ranges[split]]

    assert (as_tuples("train"), as_tuples("val")) == (train, val)


def _flip_a_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF  # Same size: only the checksum can tell.
    path.write_bytes(bytes(data))


def test_verify_names_the_corrupted_shard(tmp_path):
    meta = _write_folder(tmp_path / "p")
    assert shards.verify(tmp_path / "p") == meta
    _flip_a_byte(tmp_path / "p" / shards.shard_name(1))
    shards.open_shards(tmp_path / "p")  # The cheap size check passes...
    with pytest.raises(ValueError, match=r"tokens_00001\.bin does not match its sha256 in "
                       r"meta\.json.*; delete .*p and prepare the data again, or prepare it "
                       "into a new --out") as e:
        shards.verify(tmp_path / "p")  # ...the checksums do not.
    assert "\n" not in str(e.value)


def test_verify_names_a_changed_tokenizer(tmp_path):
    _write_folder(tmp_path / "p")
    tokenizers.save_tokenizer(tokenizers.CharTokenizer("ab"), tmp_path / "p" / shards.TOKENIZER)
    with pytest.raises(ValueError, match=r"tokenizer\.json does not match its sha256"):
        shards.verify(tmp_path / "p")


@pytest.mark.parametrize(("damage", "words"), [
    (lambda path: path.unlink(), r"tokens_00002\.bin is missing"),
    (lambda path: path.write_bytes(b"\0"), r"tokens_00002\.bin is truncated: 1 bytes where "
                                           r"meta\.json lists 1 uint16 tokens \(2 bytes\)"),
    (lambda path: path.write_bytes(b"\0" * 6), r"tokens_00002\.bin is longer than meta\.json "
                                               "says: 6 bytes"),
])
def test_verify_and_open_name_a_missing_or_truncated_shard(tmp_path, damage, words):
    _write_folder(tmp_path / "p")
    damage(tmp_path / "p" / shards.shard_name(2))
    with pytest.raises(ValueError, match=words) as e:
        shards.verify(tmp_path / "p")
    assert "\n" not in str(e.value)
    # Opening checks sizes (a memmap of a short file would fault on reading): the same shard.
    with pytest.raises(ValueError, match=f"is damaged: .*{words}.*run the prepare command that "
                       "made it again") as e:
        shards.open_shards(tmp_path / "p")
    assert "\n" not in str(e.value)


def test_verify_of_what_is_not_a_complete_prepared_folder(tmp_path):
    with pytest.raises(ValueError, match="not a prepared data folder.*prepare the data first"):
        shards.verify(tmp_path / "missing")
    (tmp_path / shards.PROGRESS).write_text("{}")
    with pytest.raises(ValueError, match="interrupted prepare.*run its prepare command again"):
        shards.verify(tmp_path)


def test_read_meta_of_what_is_not_a_prepared_folder(tmp_path):
    (tmp_path / "file.txt").write_text("text")
    assert shards.read_meta(tmp_path / "file.txt") is None
    assert shards.read_meta(tmp_path / "missing") is None
    assert shards.read_meta(tmp_path) is None  # A folder without meta.json.
    (tmp_path / shards.META).write_text("{not json")
    assert shards.read_meta(tmp_path) is None
    (tmp_path / shards.META).write_text(json.dumps({"format": "other", "version": 1}))
    assert shards.read_meta(tmp_path) is None
    (tmp_path / shards.META).write_text(json.dumps({"format": shards.FORMAT, "version": 1}))
    assert shards.read_meta(tmp_path) == {"format": shards.FORMAT, "version": 1}


def test_complete_meta_needs_the_fingerprint_and_every_shard(tmp_path):
    meta = _write_folder(tmp_path / "p")
    assert shards.complete_meta(tmp_path / "p", "f") == meta
    assert shards.complete_meta(tmp_path / "p", "other settings") is None
    (tmp_path / "p" / shards.shard_name(0)).write_bytes(b"\0\0")  # Truncated.
    assert shards.complete_meta(tmp_path / "p", "f") is None


def test_open_shards_explains_a_folder_of_the_old_in_process_format(tmp_path):
    np.arange(9, dtype=np.uint16).tofile(tmp_path / "train.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"version": 1, "dtype": "uint16"}))
    with pytest.raises(ValueError, match="old train.bin/val.bin format; delete it") as e:
        shards.open_shards(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="not a prepared data folder"):
        shards.open_shards(tmp_path / "missing")


def test_token_dtype_is_the_narrowest_that_holds_the_vocab():
    assert shards.token_dtype(65536) == "uint16"  # Ids 0 … 65535.
    assert shards.token_dtype(65537) == "uint32"
