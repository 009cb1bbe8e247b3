"""Tests for gpt_jax.data.prepare: the in-process cache, and the streaming CLI
(prepare_stream, sources, shards)."""

import errno
import functools
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


def test_up_to_date_output_is_reused_damaged_rebuilt_and_other_settings_refused(
        doc_file, tmp_path, caplog):
    out = tmp_path / "out"
    first = _prep(doc_file, out, tokenizer="byte")
    before, tokens = _files(out), _stream(first)  # Read now: first's memmaps see the damage.
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    with caplog.at_level("INFO", logger="absl"):
        again = _prep(doc_file, out, tokenizer="byte", num_workers=2)  # Workers do not matter.
    assert "Reusing the up-to-date prepared folder" in caplog.text
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == mtimes
    assert again.meta == first.meta
    # Other settings, or a changed source, would replace the data: refused, nothing touched.
    with pytest.raises(ValueError, match=r"already holds data prepared from file .*doc\.txt with "
                       r"the byte tokenizer.*choose another --out, or delete"):
        _prep(doc_file, out, tokenizer="byte", val_fraction=0.2)
    assert _files(out) == before
    (out / first.meta["shards"][0]["file"]).write_bytes(b"\0")  # Damaged: prepared again.
    with caplog.at_level("WARNING", logger="absl"):
        np.testing.assert_array_equal(_stream(_prep(doc_file, out, tokenizer="byte")), tokens)
    assert "Preparing" in caplog.text and _files(out) == before
    doc_file.write_text(_DOC + "more")  # A changed source is noticed (size, mtime)...
    with pytest.raises(ValueError, match="already holds data prepared"):
        _prep(doc_file, out, tokenizer="byte")
    assert _files(out) == before  # ...and refused too.
    changed = _prep(doc_file, tmp_path / "new", tokenizer="byte")
    assert changed.meta["total_tokens"] == len((_DOC + "more").encode()) + 1


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
    with pytest.raises(ValueError, match="--source is empty"):  # Not the current folder.
        _prep("", tmp_path / "o", tokenizer="byte")
    with pytest.raises(ValueError, match="--out is empty"):
        _prep(doc_file, "", tokenizer="byte")
    with pytest.raises(ValueError, match="--num_workers=0 must be ≥ 1"):
        _prep(doc_file, tmp_path / "o", tokenizer="byte", num_workers=0)
    with pytest.raises(ValueError, match="--bpe_sample_mb must be ≥ 1"):
        _prep(doc_file, tmp_path / "o", bpe_sample_bytes=0)
    with pytest.raises(ValueError, match="vocab_size of 256 is out of range"):
        _prep(doc_file, tmp_path / "o", vocab_size=256)  # Before any folder or training pass.
    with pytest.raises(ValueError, match="is inside --source"):
        _prep(doc_file.parent, doc_file.parent / "o", tokenizer="byte")
    assert not (tmp_path / "o").exists()


def test_an_unwritable_out_is_an_os_error_naming_it(doc_file, tmp_path, monkeypatch):
    """What a read-only parent folder gives where tests run as root (which may write there)."""
    from gpt_jax import cli

    def read_only(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    with pytest.raises(PermissionError) as e:
        _prep(doc_file, tmp_path / "ro" / "out", tokenizer="byte")
    assert cli.os_error(e.value) == (f"{tmp_path / 'ro' / 'out'}: Permission denied; check its "
                                     "permissions or choose another path.")
    assert not (tmp_path / "ro").exists()


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


# --- Bad invocations of the prepare CLI: one `error:` line, and nothing that was there before is
# changed, nor anything half-made left behind ---


class _Scene:
    """The paths the bad invocations name, each made in `root` on first use (a row pays only for
    its own); `scene[name]` is the path, so rows write "{name}" in their flags."""

    def __init__(self, root: pathlib.Path, corpus: pathlib.Path, request: pytest.FixtureRequest):
        self.root, self.corpus, self._request = root, corpus, request

    def __getitem__(self, name: str) -> pathlib.Path:
        return getattr(self, name)

    def _file(self, name: str, data: bytes) -> pathlib.Path:
        (self.root / name).write_bytes(data)
        return self.root / name

    def _folder(self, name: str, **files: bytes) -> pathlib.Path:
        (self.root / name).mkdir()
        for file, data in files.items():
            (self.root / name / file).write_bytes(data)
        return self.root / name

    @property
    def out(self) -> pathlib.Path:
        return self.root / "out"  # Not made: the rows check it is not left behind.

    @property
    def nested_out(self) -> pathlib.Path:
        return self.root / "new" / "deep" / "out"

    @property
    def new(self) -> pathlib.Path:
        return self.root / "new"

    @functools.cached_property
    def empty_file(self) -> pathlib.Path:
        return self._file("empty.txt", b"")

    @functools.cached_property
    def empty_dir(self) -> pathlib.Path:
        return self._folder("empty_dir")

    @functools.cached_property
    def garbage(self) -> pathlib.Path:
        return self._file("garbage.bin", bytes(range(256)) * 16)

    @functools.cached_property
    def bad_jsonl(self) -> pathlib.Path:
        return self._file("bad.jsonl", b'{"text": "fine"}\n{not json\n')

    @functools.cached_property
    def late_bad_jsonl(self) -> pathlib.Path:
        """1.2 MB of good records, then a bad one: shards are written before it is read."""
        good = json.dumps({"text": "x" * 1000}).encode() + b"\n"
        return self._file("late.jsonl", good * 1200 + b'{"text": 3}\n')

    @functools.cached_property
    def body_jsonl(self) -> pathlib.Path:
        return self._file("body.jsonl", b'{"body": "the text is here"}\n')

    @functools.cached_property
    def a_file(self) -> pathlib.Path:
        return self._file("a_file", b"not a folder")

    @functools.cached_property
    def notes(self) -> pathlib.Path:
        return self._folder("notes", **{"notes.txt": b"mine"})

    @functools.cached_property
    def empty_out(self) -> pathlib.Path:
        return self._folder("empty_out")

    @functools.cached_property
    def source_dir(self) -> pathlib.Path:
        return self._folder("source_dir", **{"a.txt": self.corpus.read_bytes()})

    @functools.cached_property
    def other_text(self) -> pathlib.Path:
        return self._file("other.txt", b"another corpus\n")

    @functools.cached_property
    def prepared(self) -> pathlib.Path:
        """A prepared folder of the corpus (byte), as the CLI makes it."""
        return _prep(self.corpus, self.root / "prepared", tokenizer="byte").dir

    @functools.cached_property
    def corrupted(self) -> pathlib.Path:
        folder = _prep(self.corpus, self.root / "corrupted", tokenizer="byte").dir
        shard = folder / shards.shard_name(0)
        data = bytearray(shard.read_bytes())
        data[5] ^= 0xFF
        shard.write_bytes(bytes(data))
        return folder

    @functools.cached_property
    def unreadable_meta(self) -> pathlib.Path:
        return self._folder("unreadable_meta", **{"meta.json": b"{trunc",
                                                  "tokens_00000.bin": b"\0\1"})

    @functools.cached_property
    def interrupted(self) -> pathlib.Path:
        """An interrupted prepare of other settings: its progress.json and tokenizer.json."""
        folder = self._folder("interrupted")
        tokenizers.save_tokenizer(tokenizers.ByteTokenizer(), folder / shards.TOKENIZER)
        shards.write_json_atomic(folder / shards.PROGRESS, {
            "fingerprint": "other", "shards": [],
            "tokenizer_sha256": shards.sha256_file(folder / shards.TOKENIZER)})
        return folder

    @functools.cached_property
    def workdir(self) -> pathlib.Path:
        """A copy of a finished training run: config.json, metrics.jsonl, tokenizer.json, …"""
        trained = self._request.getfixturevalue("trained_run")  # Trains once a session: slow.
        return pathlib.Path(shutil.copytree(trained, self.root / "workdir"))

    @functools.cached_property
    def workdir_files(self) -> pathlib.Path:
        """A training workdir's files (what `workdir` has, without training one)."""
        folder = self._folder("workdir_files", **{
            "config.json": b"{}", "metrics.jsonl": b'{"step": 1}\n',
            "tokenizer.json": json.dumps(tokenizers.ByteTokenizer().to_dict()).encode()})
        (folder / "checkpoints" / "2").mkdir(parents=True)
        return folder

    @functools.cached_property
    def read_only(self) -> pathlib.Path:
        folder = self._folder("read_only")
        folder.chmod(0o555)
        return folder


@pytest.fixture
def scene(tmp_path, corpus, request):
    s = _Scene(tmp_path, corpus, request)
    yield s
    if (tmp_path / "read_only").exists():
        (tmp_path / "read_only").chmod(0o755)  # So that pytest can remove tmp_path.


_SRC, _BYTE, _OUT = "--source={corpus}", "--tokenizer=byte", "--out={out}"


def _bad(id_: str, args: list[str], *words: str, protect: tuple[str, ...] = (),
         absent: tuple[str, ...] = ("out",), marks=()):
    """A row: the prepare flags (with {scene paths}), the words the error line must hold, the
    scene paths that must keep their bytes, and those that must not exist afterwards."""
    return pytest.param(args, words, protect, absent, id=id_, marks=marks)


_BAD_INVOCATIONS = [
    # Flags: absl's own errors are one line too.
    _bad("no-source", [_BYTE, _OUT], "missing --source", "--source=FILE"),
    _bad("no-tokenizer", [_SRC, _OUT], "missing --tokenizer", "--tokenizer=byte|char|bpe"),
    _bad("no-out", [_SRC, _BYTE], "missing --out", "--out=DIR"),
    _bad("empty-out", [_SRC, _BYTE, "--out="], "missing --out"),
    _bad("extra-argument", [_SRC, _BYTE, _OUT, "extra"], "unexpected arguments 'extra'",
         "only --flags"),
    _bad("unknown-flag", [_SRC, _BYTE, _OUT, "--vocab=300"], "unknown command line flag 'vocab'",
         "--helpshort"),
    _bad("not-an-int", [_SRC, _BYTE, _OUT, "--shard_tokens=many"], "--shard_tokens=many",
         "--helpshort"),
    # Sources.
    _bad("missing-source", ["--source={root}/nope.txt", _BYTE, _OUT], "nope.txt' does not exist",
         "give a text file, a folder"),
    _bad("empty-source", ["--source=", _BYTE, _OUT], "missing --source", "--source=FILE"),
    _bad("empty-file", ["--source={empty_file}", _BYTE, _OUT], "empty.txt' holds no text",
         "give a non-empty source"),
    _bad("empty-folder", ["--source={empty_dir}", _BYTE, _OUT], "matches no files",
         "check the path"),
    _bad("binary-file", ["--source={garbage}", _BYTE, _OUT], "garbage.bin' is not valid UTF-8",
         "convert it to UTF-8"),
    _bad("malformed-jsonl", ["--source={bad_jsonl}", _BYTE, _OUT], "line 2 of",
         "is not valid JSON", "fix or remove it"),
    _bad("jsonl-without-the-field", ["--source={body_jsonl}", _BYTE, _OUT],
         "no string field 'text'", "--text_field"),
    # A bad record after shards were written: what was made is removed, created parents too.
    _bad("malformed-jsonl-after-shards", ["--source={late_bad_jsonl}", _BYTE,
                                          "--out={nested_out}", "--shard_tokens=1000"],
         "line 1201 of", "no string field 'text'", absent=("new",)),
    _bad("char-tokenizer-of-binary-file", ["--source={garbage}", "--tokenizer=char", _OUT],
         "not valid UTF-8"),
    # Tokenizers and options.
    _bad("unknown-tokenizer", [_SRC, "--tokenizer=gpt3", _OUT], "unknown tokenizer 'gpt3'",
         "valid names: byte, char, bpe, gpt2"),
    _bad("hf-file-missing", [_SRC, "--tokenizer=hf:missing.json", _OUT],
         "'missing.json' does not exist", "--tokenizer=hf:PATH"),
    _bad("bpe-vocab-too-small", [_SRC, "--tokenizer=bpe", "--vocab_size=10", _OUT],
         "vocab_size of 10 is out of range", "≥ 257"),
    _bad("bpe-vocab-too-large", [_SRC, "--tokenizer=bpe", f"--vocab_size={1 << 32}", _OUT],
         f"vocab_size of {1 << 32} is out of range", "< 2**32"),
    _bad("vocab-size-of-byte", [_SRC, _BYTE, "--vocab_size=300", _OUT],
         "--vocab_size applies only to --tokenizer=bpe", "drop it"),
    _bad("val-fraction-0", [_SRC, _BYTE, "--val_fraction=0", _OUT], "--val_fraction=0.0",
         "must be in (0, 1)"),
    _bad("val-fraction-1", [_SRC, _BYTE, "--val_fraction=1", _OUT], "--val_fraction=1.0",
         "must be in (0, 1)"),
    _bad("val-fraction-negative", [_SRC, _BYTE, "--val_fraction=-0.1", _OUT],
         "--val_fraction=-0.1", "must be in (0, 1)"),
    _bad("shard-tokens-0", [_SRC, _BYTE, "--shard_tokens=0", _OUT], "--shard_tokens=0",
         "must be ≥ 1"),
    _bad("num-workers-0", [_SRC, _BYTE, "--num_workers=0", _OUT], "--num_workers=0",
         "must be ≥ 1"),
    # --out: what is there already is never replaced, removed or added to.
    _bad("out-is-a-file", [_SRC, _BYTE, "--out={a_file}"], "is a file", "give a folder",
         protect=("a_file",)),
    _bad("out-holds-other-files", [_SRC, _BYTE, "--out={notes}"], "holds other files (notes.txt)",
         "give a new or empty folder", protect=("notes",)),
    # Issue 13: this exited 0, writing its shards and tokenizer.json into the run's workdir.
    _bad("out-is-a-training-workdir", [_SRC, _BYTE, "--out={workdir_files}"],
         "is a training workdir", "config.json", "new or empty folder",
         protect=("workdir_files",)),
    _bad("out-is-a-trained-run", [_SRC, _BYTE, "--out={workdir}"], "is a training workdir",
         "new or empty folder", protect=("workdir",), marks=pytest.mark.slow),
    _bad("out-prepared-from-another-source", ["--source={other_text}", _BYTE, "--out={prepared}"],
         "already holds data prepared from file", "corpus.txt", "choose another --out, or delete",
         protect=("prepared",)),
    _bad("out-prepared-with-another-tokenizer", [_SRC, "--tokenizer=char", "--out={prepared}"],
         "already holds data prepared", "byte tokenizer", "choose another --out",
         protect=("prepared",)),
    # Issue 13: this deleted the folder's meta.json and first shard before reading the source.
    _bad("out-prepared-and-malformed-jsonl", ["--source={bad_jsonl}", _BYTE, "--out={prepared}"],
         "already holds data prepared", "choose another --out", protect=("prepared",)),
    _bad("out-prepared-files-without-meta", [_SRC, _BYTE, "--out={unreadable_meta}"],
         "holds prepared-data files", "no readable meta.json", "delete",
         protect=("unreadable_meta",)),
    _bad("out-interrupted-with-other-settings", [_SRC, _BYTE, "--out={interrupted}"],
         "interrupted prepare of another source", "run that command again to resume",
         protect=("interrupted",)),
    _bad("out-empty-folder-and-bad-source", ["--source={bad_jsonl}", _BYTE, "--out={empty_out}"],
         "not valid JSON", protect=("empty_out",)),
    _bad("out-inside-the-source-folder", ["--source={source_dir}", _BYTE,
                                          "--out={source_dir}/prepared"],
         "is inside --source", "choose an --out outside", protect=("source_dir",)),
    _bad("out-under-a-read-only-folder", [_SRC, _BYTE, "--out={read_only}/out"],
         "permission denied", "check its permissions", protect=("read_only",),
         marks=pytest.mark.not_as_root("root writes into read-only folders")),
    # --verify.
    _bad("verify-without-a-folder", ["--verify", "--out={root}/nothing"],
         "not a prepared data folder", "prepare the data first"),
    _bad("verify-a-changed-shard", ["--verify", "--out={corrupted}"],
         "tokens_00000.bin does not match its sha256", "prepare it into a new --out",
         protect=("corrupted",)),
]


@pytest.mark.parametrize(("args", "words", "protect", "absent"), _BAD_INVOCATIONS)
def test_bad_invocations_are_one_line_and_change_nothing(scene, bad_invocation, args, words,
                                                         protect, absent):
    argv = [sys.executable, "-m", "gpt_jax.data.prepare", "--noprogress", "--num_workers=1",
            *(a.format_map(scene) for a in args)]
    bad_invocation(argv, *words, protect=[scene[p] for p in protect],
                   absent=[scene[p] for p in absent], cwd=REPO)


def test_verify_flag_checks_an_existing_folder_and_a_prepared_one(scene):
    done = _cli("--verify", f"--out={scene.prepared}")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"{scene.prepared}: OK: 1 shard(s) ({scene.corpus.stat().st_size + 1:,} "
                           "tokens) and tokenizer.json match their sha256 in meta.json.\n")
    # With a prepare's flags: prepares (here reuses) the folder, then verifies it.
    both = _cli(f"--source={scene.corpus}", _BYTE, f"--out={scene.prepared}", "--verify",
                "--num_workers=1")
    assert both.returncode == 0, both.stderr
    assert "Reusing" in both.stderr and both.stdout.splitlines()[1].endswith("sha256 in meta.json.")


_WRITE = shards.ShardWriter.write


def _fail_writes(monkeypatch, error: BaseException, after_shards: int) -> None:
    """Makes the shard writer raise `error` once `after_shards` shards are complete."""

    def failing(writer, *args, **kwargs):
        if len(writer.shards) >= after_shards:
            raise error
        _WRITE(writer, *args, **kwargs)

    monkeypatch.setattr(shards.ShardWriter, "write", failing)


_SMALL = dict(chunk_bytes=1024, shard_tokens=2000)


@pytest.mark.parametrize(("error", "after_shards", "kept"), [
    (KeyboardInterrupt(), 2, True),  # Resumable: the shards so far stay.
    (OSError(28, "No space left on device"), 2, True),  # Free space, run again: it resumes.
    (ValueError("a bad record"), 2, False),  # The source must change: nothing to resume.
    (KeyboardInterrupt(), 0, True),  # progress.json and the trained tokenizer are saved.
])
def test_a_failed_prepare_keeps_only_what_resumes(doc_file, tmp_path, monkeypatch, caplog,
                                                  error, after_shards, kept):
    _fail_writes(monkeypatch, error, after_shards)
    out = tmp_path / "new" / "out"
    with pytest.raises(type(error)), caplog.at_level("WARNING", logger="absl"):
        _prep(doc_file, out, **_SMALL)
    if not kept:
        assert not (tmp_path / "new").exists()  # The folders it made are gone too.
        return
    progress = json.loads((out / shards.PROGRESS).read_text())
    assert len(progress["shards"]) == after_shards and not (out / shards.META).exists()
    assert ("Kept the 2 complete shard(s)" in caplog.text) == isinstance(error, OSError)
    monkeypatch.undo()
    resumed = _prep(doc_file, out, **_SMALL)
    assert _files(resumed.dir) == _files(_prep(doc_file, tmp_path / "whole", **_SMALL).dir)


def test_a_failure_before_any_progress_leaves_nothing(doc_file, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # While bpe trains: no progress.json yet.

    monkeypatch.setattr(prepare_stream, "_learn_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prep(doc_file, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyboardInterrupt):
        _prep(doc_file, tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []  # It was there before: kept, empty.


def test_a_failure_removes_only_its_own_files_and_empty_folders(doc_file, tmp_path, monkeypatch):
    """Files that appear beside --out, or in it, while a prepare runs (another prepare into a
    sibling folder, the user's notes) survive its failure; the folders it made go if empty."""
    out = tmp_path / "data" / "a"

    def others_arrive_then_a_bad_record(claim, *args, **kwargs):
        (tmp_path / "data" / "b").mkdir()
        (tmp_path / "data" / "b" / "meta.json").write_text("{}")
        (out / "notes.txt").write_text("mine")
        (out / shards.shard_name(0)).write_bytes(b"\0\0")
        raise ValueError("a bad record")

    monkeypatch.setattr(prepare_stream, "_prepare_into", others_arrive_then_a_bad_record)
    with pytest.raises(ValueError, match="a bad record"):
        _prep(doc_file, out)
    assert (tmp_path / "data" / "b" / "meta.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    monkeypatch.undo()
    (out / "notes.txt").unlink()
    monkeypatch.setattr(prepare_stream, "_prepare_into", lambda *a, **k: (_ for _ in ()).throw(
        ValueError("a bad record")))
    with pytest.raises(ValueError):
        _prep(doc_file, tmp_path / "fresh" / "deep" / "out")
    assert not (tmp_path / "fresh").exists()  # Every folder it made was empty: all gone.


def test_a_failed_resume_removes_nothing_that_was_there(doc_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fail_writes(monkeypatch, KeyboardInterrupt(), 1)
    with pytest.raises(KeyboardInterrupt):
        _prep(doc_file, out, **_SMALL)
    before = {name: data for name, data in _files(out).items() if name != shards.PROGRESS}
    _fail_writes(monkeypatch, ValueError("a bad record"), 2)
    with pytest.raises(ValueError, match="a bad record"):
        _prep(doc_file, out, **_SMALL)
    after = _files(out)
    assert {name: after.get(name) for name in before} == before
    assert shards.shard_name(1) in after  # This run's shard is there too: the source's fault.
