"""Tests for gpt_jax.data.prepare: the in-process cache, and the streaming CLI
(prepare_stream, sources, shards)."""

import hashlib
import importlib.machinery
import json
import pathlib
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from gpt_jax.data import prepare as prepare_lib
from gpt_jax.data import prepare_stream, shards, sources, tokenizers
from gpt_jax.data.corpora import Corpus

REPO = pathlib.Path(__file__).resolve().parent.parent


def _corpus(text: str) -> Corpus:
    return Corpus(text=text, description="test", sha256=hashlib.sha256(text.encode()).hexdigest())


_TEXT = "".join(chr(ord("a") + (i * 7) % 26) for i in range(1000))


def _prepare(text: str, tokenizer: str, cache_dir: pathlib.Path, val_fraction: float = 0.1,
             vocab_size: int | None = None, **kwargs) -> shards.PreparedShards:
    folder = prepare_lib.prepare(_corpus(text), tokenizer, str(cache_dir), val_fraction,
                                 vocab_size, **kwargs)
    return shards.open_shards(folder)


def test_char_split_counts_dtype_and_files(tmp_path):
    prepared = _prepare(_TEXT, "char", tmp_path)
    assert prepared.dir.parent == tmp_path / "prepared"
    assert sorted(p.name for p in prepared.dir.iterdir()) == [
        "meta.json", "tokenizer.json", "tokens_00000.bin"
    ]
    meta = json.loads((prepared.dir / "meta.json").read_text())
    assert meta == prepared.meta
    assert meta["format"] == "gpt_jax.shards" and meta["dtype"] == "uint16"
    assert (meta["train_tokens"], meta["val_tokens"]) == (900, 100)
    assert meta["source"]["fingerprint"] == {"kind": "text", "sha256": _corpus(_TEXT).sha256}
    assert (meta["source"]["bytes"], meta["source"]["docs"]) == (1000, 1)
    assert meta["tokenizer"]["name"] == "char" and meta["vocab_size"] == 26
    assert meta["eot_id"] is None and meta["separator"] == []  # Nothing appended in process.
    assert meta["options"]["val_fraction"] == 0.1
    train, val = prepared.train, prepared.val
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in train + val)
    assert train[0].dtype == np.uint16 and train[0].shape == (900,)
    shards.verify(prepared.dir)
    # The split is of the token stream: concatenated, it is the whole encoded text.
    np.testing.assert_array_equal(np.concatenate(train + val), prepared.tokenizer.encode(_TEXT))
    assert prepared.tokenizer.decode(val[0]) == _TEXT[900:]


def test_byte_split_is_of_tokens_not_characters(tmp_path):
    text = "é" * 50 + "a" * 50  # 150 bytes: a character split would differ.
    prepared = _prepare(text, "byte", tmp_path)
    assert (prepared.meta["train_tokens"], prepared.meta["val_tokens"]) == (135, 15)
    assert np.all(np.concatenate(prepared.val) == ord("a"))


def test_large_vocab_uses_uint32(tmp_path):
    text = "".join(chr(0x10000 + i) for i in range(65537)) * 2
    prepared = _prepare(text, "char", tmp_path, val_fraction=0.5)
    assert prepared.meta["dtype"] == "uint32"
    assert prepared.val[-1][-1] == 65536


def test_small_shards_hold_the_same_stream(tmp_path):
    whole = _prepare(_TEXT, "char", tmp_path / "a")
    cut = _prepare(_TEXT, "char", tmp_path / "b", shard_tokens=300)
    assert [s["tokens"] for s in cut.meta["shards"]] == [300, 300, 300, 100]
    assert cut.meta["splits"]["val"] == [{"file": "tokens_00003.bin", "start": 0, "tokens": 100}]
    assert cut.meta["shards"][-1]["docs"] == 1 and cut.meta["shards"][0]["bytes"] == 0
    np.testing.assert_array_equal(np.concatenate(cut.train), np.concatenate(whole.train))
    np.testing.assert_array_equal(np.concatenate(cut.val), np.concatenate(whole.val))


def test_reuses_up_to_date_folder(tmp_path, caplog):
    first = _prepare(_TEXT, "char", tmp_path)
    mtimes = {f.name: f.stat().st_mtime_ns for f in first.dir.iterdir()}
    with caplog.at_level("INFO", logger="absl"):
        second = _prepare(_TEXT, "char", tmp_path)
    assert second.dir == first.dir
    assert {f.name: f.stat().st_mtime_ns for f in first.dir.iterdir()} == mtimes
    assert "Reusing" in caplog.text


def test_reprepares_when_source_or_settings_change(tmp_path):
    first = _prepare(_TEXT, "char", tmp_path)
    changed = _prepare(_TEXT + "z", "char", tmp_path)
    other_split = _prepare(_TEXT, "char", tmp_path, val_fraction=0.2)
    other_tok = _prepare(_TEXT, "byte", tmp_path)
    assert len({first.dir, changed.dir, other_split.dir, other_tok.dir}) == 4
    assert changed.meta["total_tokens"] == 1001


def test_damaged_folder_is_rewritten(tmp_path, caplog):
    first = _prepare(_TEXT, "char", tmp_path)
    expected = np.concatenate(first.train)
    (first.dir / "tokens_00000.bin").write_bytes(b"\x00" * 10)  # Truncated.
    with caplog.at_level("INFO", logger="absl"):
        again = _prepare(_TEXT, "char", tmp_path)
    assert again.dir == first.dir and "Preparing" in caplog.text
    np.testing.assert_array_equal(np.concatenate(again.train), expected)


def _old_format_folder(folder: pathlib.Path) -> None:
    """What the in-process prepare wrote before format 2: train.bin, val.bin, its own meta.json."""
    shutil.rmtree(folder)
    folder.mkdir()
    np.arange(90, dtype=np.uint16).tofile(folder / "train.bin")
    np.arange(10, dtype=np.uint16).tofile(folder / "val.bin")
    (folder / "tokenizer.json").write_text(json.dumps({"name": "byte"}))
    (folder / "meta.json").write_text(json.dumps({
        "version": 1, "source_sha256": "0" * 64, "val_fraction": 0.1, "source": "test",
        "tokenizer": {"name": "byte"}, "dtype": "uint16", "train_tokens": 90, "val_tokens": 10}))


def test_old_format_folder_at_the_key_is_prepared_again_with_one_log_line(tmp_path, caplog):
    folder = _prepare(_TEXT, "byte", tmp_path).dir
    _old_format_folder(folder)
    with caplog.at_level("WARNING", logger="absl"):
        again = _prepare(_TEXT, "byte", tmp_path)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "older format" in caplog.records[0].getMessage()
    assert again.dir == folder and not (folder / "train.bin").exists()
    np.testing.assert_array_equal(np.concatenate(again.train + again.val),
                                  np.frombuffer(_TEXT.encode(), np.uint8))


def test_a_cache_of_the_old_format_is_prepared_again_with_one_line_and_kept(tmp_path, caplog):
    # Format 1 kept a corpus at byte-<hash of [1, sha, name, val_fraction]> as train.bin/val.bin.
    old = json.dumps([1, _corpus(_TEXT).sha256, "byte", 0.1])
    legacy = tmp_path / "prepared" / f"byte-{hashlib.sha256(old.encode()).hexdigest()[:16]}"
    legacy.mkdir(parents=True)
    _old_format_folder(legacy)
    before = {p.name: p.read_bytes() for p in legacy.iterdir()}
    with caplog.at_level("INFO", logger="absl"):
        new = _prepare(_TEXT, "byte", tmp_path)
    lines = [r.getMessage() for r in caplog.records if str(legacy) in r.getMessage()]
    assert len(lines) == 1 and "current format" in lines[0]
    assert new.dir != legacy and prepare_lib.FORMAT_VERSION == 2
    assert {p.name: p.read_bytes() for p in legacy.iterdir()} == before  # Nothing lost.


def test_interrupted_prepare_leaves_no_folder(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_lib.shards, "write_meta", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_lib.prepare(_corpus(_TEXT), "char", str(tmp_path), val_fraction=0.1)
    assert list((tmp_path / "prepared").iterdir()) == []


def test_a_folder_another_process_finished_first_is_used(tmp_path, monkeypatch):
    write_meta, calls = shards.write_meta, []

    def racing_write_meta(folder, *args, **kwargs):
        meta = write_meta(folder, *args, **kwargs)
        calls.append(folder)
        if len(calls) == 1:  # Another process prepares and renames its copy meanwhile.
            theirs = prepare_lib.prepare(_corpus(_TEXT), "char", str(tmp_path), 0.1)
            calls.append(theirs.stat().st_ino)
        return meta

    monkeypatch.setattr(shards, "write_meta", racing_write_meta)
    folder = prepare_lib.prepare(_corpus(_TEXT), "char", str(tmp_path), 0.1)
    ours, theirs, theirs_inode = calls
    assert ours != theirs  # Two temporary folders...
    assert folder.stat().st_ino == theirs_inode  # ...and the first one renamed into place kept.
    assert list((tmp_path / "prepared").iterdir()) == [folder]  # Ours was dropped.
    shards.verify(folder)


def test_val_fraction_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_lib.prepare(_corpus(_TEXT), "char", str(tmp_path), val_fraction=1.0)


# --- The in-process path with learned BPE vocabularies ---


def test_in_process_bpe_keys_on_vocab_size(tmp_path):
    text = _TEXT + " the cat sat on the mat\n" * 50
    small = _prepare(text, "bpe", tmp_path, 0.1, vocab_size=300)
    large = _prepare(text, "bpe", tmp_path, 0.1, vocab_size=320)
    assert small.dir != large.dir and small.meta["options"]["vocab_size"] == 300
    assert small.tokenizer.vocab_size == 300 and small.meta["dtype"] == "uint16"
    assert small.meta["eot_id"] == 0 and small.meta["separator"] == []
    tokens = np.concatenate(small.train + small.val)
    assert small.tokenizer.decode(tokens) == text
    assert _prepare(text, "bpe", tmp_path, 0.1, 300).dir == small.dir


# --- The prepare CLI: sources, shards, parallelism, resume, reuse ---

# A multi-line document long enough for several 2 KB pieces, with indented lines (cuts after
# "\n" followed by a space would change BPE tokens) and non-ASCII text.
_DOC = "".join(f"Line {i}: the {i % 5} quick foxes → {'東京' * (i % 3)}\n    indented {i}\n"
               for i in range(400))


def _prep(source, out, tokenizer="bpe", **kwargs) -> shards.PreparedShards:
    kwargs.setdefault("num_workers", 1)
    if tokenizer == "bpe":
        kwargs.setdefault("vocab_size", 300)
    return prepare_stream.prepare_folder(str(source), tokenizer, out, show_progress=False,
                                         **kwargs)


def _stream(p: shards.PreparedShards) -> np.ndarray:
    return np.concatenate(p.train + p.val)


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.fixture
def doc_file(tmp_path) -> pathlib.Path:
    path = tmp_path / "doc.txt"
    path.write_text(_DOC, encoding="utf-8")
    return path


def test_single_file_bpe_format_and_split(doc_file, tmp_path):
    # Small pieces and shards: the document is cut into ~19 pieces over several shards.
    p = _prep(doc_file, tmp_path / "out", chunk_bytes=2048, shard_tokens=1500, val_fraction=0.1)
    assert sorted(f.name for f in p.dir.iterdir())[:3] == ["meta.json", "tokenizer.json",
                                                           "tokens_00000.bin"]
    m = p.meta
    assert m["format"] == "gpt_jax.shards" and m["dtype"] == "uint16" and m["eot_id"] == 0
    assert m["vocab_size"] == 300 and m["separator"] == [0] and m["total_docs"] == 1
    assert m["source"]["bytes"] == len(_DOC.encode()) and len(m["shards"]) > 2
    assert not (p.dir / "progress.json").exists()
    # Cut at newlines before printable ASCII, the pieces encode exactly as the whole document.
    tokens = _stream(p)
    np.testing.assert_array_equal(tokens, np.append(p.tokenizer.encode(_DOC), 0))
    assert p.tokenizer.decode(tokens[:-1]) == _DOC
    # nanoGPT's split of the token stream, as ranges over the shards.
    assert (m["train_tokens"], m["val_tokens"]) == (int(len(tokens) * 0.9),
                                                    len(tokens) - int(len(tokens) * 0.9))
    assert (p.num_train_tokens, p.num_val_tokens) == (m["train_tokens"], m["val_tokens"])
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in p.train + p.val)
    first_val = m["splits"]["val"][0]
    assert p.val[0].offset == first_val["start"] * 2  # A memmap at an offset, not a slice.
    for shard in m["shards"]:
        assert shard["sha256"] == shards.sha256_file(p.dir / shard["file"])
    shards.verify(p.dir)
    assert shards.open_shards(p.dir).meta == m


def test_folder_and_glob_sources(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "b.txt").write_text("second document\n")
    (data / "a.txt").write_text("first document")
    (data / "sub" / "c.txt").write_text("third, nested")
    (data / "junk.bin").write_bytes(b"\xff\xfe not utf-8")  # Skipped with a warning.
    (data / "empty.txt").write_text("")  # No document at all.
    p = _prep(data, tmp_path / "folder", tokenizer="byte")
    assert p.meta["total_docs"] == 3 and p.meta["eot_id"] is None
    # Sorted relative paths; without an end-of-text token, "\n" follows each document.
    assert p.tokenizer.decode(_stream(p)) == "first document\nsecond document\n\nthird, nested\n"
    g = _prep(f"{data}/*.txt", tmp_path / "glob", tokenizer="char")
    assert g.meta["total_docs"] == 2 and g.meta["separator"] == g.tokenizer.encode("\n").tolist()
    assert g.tokenizer.decode(_stream(g)) == "first document\nsecond document\n\n"
    r = _prep(f"{data}/**/*.txt", tmp_path / "recursive", tokenizer="byte")
    assert r.meta["total_docs"] == 3
    with pytest.raises(FileNotFoundError, match="matches no files"):
        _prep(f"{data}/*.md", tmp_path / "none", tokenizer="byte")
    with pytest.raises(ValueError, match="not valid UTF-8"):  # A file named alone must be text.
        _prep(data / "junk.bin", tmp_path / "junk", tokenizer="byte")


def test_jsonl_source(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [{"text": "alpha beta", "id": 1}, {"text": ""}, {"text": "gamma\ndelta"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    p = _prep(path, tmp_path / "out", vocab_size=260)
    assert p.meta["total_docs"] == 2  # The empty document is dropped.
    tokens = _stream(p)
    assert list(np.flatnonzero(tokens == 0)) == [len(p.tokenizer.encode("alpha beta")),
                                                 len(tokens) - 1]
    assert p.tokenizer.decode(tokens) == "alpha beta<|endoftext|>gamma\ndelta<|endoftext|>"
    other = tmp_path / "body.jsonl"
    other.write_text(json.dumps({"body": "text here"}) + "\n")
    assert _prep(other, tmp_path / "body", tokenizer="byte", text_field="body").meta[
        "total_tokens"] == len("text here\n")
    with pytest.raises(ValueError, match=r"line 1 of .*'text'.*--text_field"):
        _prep(other, tmp_path / "bad", tokenizer="byte")


def test_parallel_output_equals_serial_byte_for_byte(doc_file, tmp_path, monkeypatch):
    options = dict(chunk_bytes=1024, shard_tokens=2000)
    serial = _prep(doc_file, tmp_path / "serial", num_workers=1, **options)
    # bpe trains in a child process too here, as for large sources: the same tokenizer.json.
    monkeypatch.setattr(prepare_stream, "_TRAIN_HERE_BYTES", 0)
    parallel = _prep(doc_file, tmp_path / "parallel", num_workers=2, **options)
    assert len(serial.meta["shards"]) > 2
    assert _files(serial.dir) == _files(parallel.dir)


def test_interrupted_prepare_resumes_to_the_same_output(doc_file, tmp_path, monkeypatch, caplog):
    options = dict(chunk_bytes=1024, shard_tokens=2000)
    whole = _prep(doc_file, tmp_path / "whole", **options)
    flush, flushed = shards.ShardWriter.flush, []

    def interrupted_after_two_shards(writer):
        flush(writer)
        flushed.append(writer.shards[-1]["file"])
        if len(flushed) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(shards.ShardWriter, "flush", interrupted_after_two_shards)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _prep(doc_file, out, **options)
    monkeypatch.setattr(shards.ShardWriter, "flush", flush)
    assert not (out / "meta.json").exists() and (out / "progress.json").exists()
    done = {name: (out / name).stat().st_mtime_ns for name in flushed}
    with caplog.at_level("INFO", logger="absl"):
        resumed = _prep(doc_file, out, **options)
    assert "after 2 complete shards" in caplog.text and "Training" not in caplog.text
    assert {name: (out / name).stat().st_mtime_ns for name in flushed} == done  # Not redone.
    assert _files(resumed.dir) == _files(whole.dir)


def test_up_to_date_output_is_reused_and_changed_settings_redo_it(doc_file, tmp_path, caplog):
    out = tmp_path / "out"
    first = _prep(doc_file, out, tokenizer="byte")
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    with caplog.at_level("INFO", logger="absl"):
        again = _prep(doc_file, out, tokenizer="byte", num_workers=2)  # Workers do not matter.
    assert "Reusing the up-to-date prepared folder" in caplog.text
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == mtimes
    assert again.meta == first.meta
    other = _prep(doc_file, out, tokenizer="byte", val_fraction=0.2)
    assert other.meta["options"]["val_fraction"] == 0.2
    assert "Replacing the prepared data" in caplog.text
    (out / other.meta["shards"][0]["file"]).write_bytes(b"\0")  # Damaged: prepared again.
    np.testing.assert_array_equal(_stream(_prep(doc_file, out, tokenizer="byte",
                                                val_fraction=0.2)), _stream(first))
    doc_file.write_text(_DOC + "more")  # A changed source is noticed (size, mtime).
    assert _prep(doc_file, out, tokenizer="byte").meta["total_tokens"] == len(
        (_DOC + "more").encode()) + 1


def test_out_folder_of_other_files_is_refused(doc_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        _prep(doc_file, out, tokenizer="byte")


def test_option_errors(doc_file, tmp_path):
    with pytest.raises(ValueError, match="only to --tokenizer=bpe"):
        _prep(doc_file, tmp_path / "o", tokenizer="byte", vocab_size=512)
    with pytest.raises(ValueError, match="val_fraction"):
        _prep(doc_file, tmp_path / "o", tokenizer="byte", val_fraction=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _prep(tmp_path / "missing.txt", tmp_path / "o", tokenizer="byte")


def test_hf_dataset_source(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install datasets"):
        sources.open_source("hf:user/corpus")
    monkeypatch.undo()
    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "one"}, {"text": ""}, {"text": "two"}])

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    p = _prep("hf:user/corpus:en", tmp_path / "out", tokenizer="byte", split="validation")
    assert calls == [("user/corpus", "en", "validation", True)]
    assert p.meta["total_docs"] == 2 and p.tokenizer.decode(_stream(p)) == "one\ntwo\n"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt_jax.data.prepare", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_acceptance_shape(doc_file, tmp_path):
    out = tmp_path / "shk_bpe"
    args = [f"--source={doc_file}", "--tokenizer=bpe", "--vocab_size=300", f"--out={out}"]
    done = _cli(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{out}: ") and "vocab 300, end-of-text id 0" in done.stdout
    assert "MB/s" in done.stderr and "tokens/s" in done.stderr  # The progress bar.
    p = shards.open_shards(out)
    assert p.tokenizer.decode(_stream(p)) == _DOC + "<|endoftext|>"
    again = _cli(*args)
    assert again.returncode == 0 and "Reusing the up-to-date" in again.stderr
    bad = _cli(f"--source={doc_file}", "--tokenizer=gpt3", f"--out={tmp_path / 'x'}")
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: unknown tokenizer 'gpt3'")


def test_gpt2_offline_error_reaches_the_cli(doc_file, tmp_path, monkeypatch):
    def offline():
        raise ValueError("the gpt2 tokenizer needs tiktoken's GPT-2 BPE files ...")

    monkeypatch.setattr(tokenizers, "GPT2Tokenizer", offline)
    with pytest.raises(ValueError, match="gpt2 tokenizer needs"):
        _prep(doc_file, tmp_path / "out", tokenizer="gpt2")
    assert not (tmp_path / "out").exists()  # Nothing written before the tokenizer exists.


def test_long_line_without_newlines_is_cut_between_characters(tmp_path):
    text = "東京🙂abc" * 3000  # 39 KB, no newline: cuts fall back to character boundaries.
    (tmp_path / "line.txt").write_text(text, encoding="utf-8")
    p = _prep(tmp_path / "line.txt", tmp_path / "out", tokenizer="byte", chunk_bytes=1000)
    assert p.tokenizer.decode(_stream(p)) == text + "\n"


def test_in_process_hf_tokenizer_keys_on_the_file_contents(tmp_path):
    text = _TEXT + " the cat sat on the mat\n" * 50
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizers.build_tokenizer("bpe", text, 280).tokenizer_json)
    first = _prepare(text, f"hf:{path}", tmp_path)
    assert first.tokenizer.name == "hf" and first.tokenizer.vocab_size == 280
    assert _prepare(text, f"hf:{path}", tmp_path).dir == first.dir
    path.write_text(tokenizers.build_tokenizer("bpe", text, 290).tokenizer_json)
    second = _prepare(text, f"hf:{path}", tmp_path)
    assert second.dir != first.dir and second.tokenizer.vocab_size == 290


def test_long_documents_are_cut_where_pieces_encode_like_the_whole():
    """Cuts fall after a newline between printable non-space characters only: a piece ending in
    a whitespace run ("\\n\\n", "  \\n") would pre-tokenize differently from the whole document."""
    buf = b"a" * 40 + b"\n\n" + b"The end\nof it  \n  x" + b"b" * 10
    cut = sources._cut(buf)
    assert buf[cut - 4:cut] == b"end\n"  # Not inside "\n\n" nor after "  \n".
    tok = tokenizers.build_tokenizer("bpe", ["para one\n\n  x\n\nThe end\n"] * 200, 300)
    text = ("para one\n\n  x\n\nThe end\n" * 50).encode()
    pieces, rest = [], text
    while len(rest) > 64:
        i = sources._cut(rest[:64])
        pieces.append(rest[:i])
        rest = rest[i:]
    pieces.append(rest)
    ids = np.concatenate([tok.encode(p.decode()) for p in pieces])
    np.testing.assert_array_equal(ids, tok.encode(text.decode()))
