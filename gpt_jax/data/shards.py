"""The one prepared-folder format: what the prepare CLI writes (`--out=DIR`), what training's
in-process path writes into its cache (prepare.prepare), and what training reads (`open_shards`).

```
DIR/
  meta.json           written last: its presence (with every shard's size right) marks DIR complete
  tokenizer.json      the tokenizer (tokenizers.save_tokenizer's JSON), so runs encode and decode
  tokens_00000.bin    flat little-endian token ids, uint16 if the vocab fits (≤ 65536) else uint32
  tokens_00001.bin    …
  progress.json       only while a prepare is running or was interrupted (resume state)
```

The shards hold one token stream: the documents in source order, each followed by `separator`
(the end-of-text token where the tokenizer has one, else the tokens of "\\n"). A shard holds
whole chunks of ~1 MB of text, closed once it reaches `shard_tokens`, so documents run across
shard boundaries: a reader concatenates the shards. The train/val split is of that stream, as
nanoGPT's and `data.val_fraction`: the first floor(total · (1 − val_fraction)) tokens train, the
rest validate. Splits are (file, start, tokens) ranges, so the split shard is not copied.

Opening a folder checks every shard's size against meta.json (a missing or truncated shard is
refused, by name); `verify` also compares every file's sha256, a full read, which changed bytes
need: `python -m gpt_jax.data.prepare --verify --out=DIR`, or data.verify_shards for a run.

The in-process writer (prepare.prepare) tokenizes its corpus whole, as one document with
nothing appended: its "separator" is [], its source "fingerprint" the text's sha256, and the
document and source bytes are counted in the last shard.

meta.json:
```
{"format": "gpt_jax.shards", "version": 1,
 "fingerprint": sha256 of (source fingerprint, tokenizer, options): what "up to date" means,
 "source": {"spec", "description", "fingerprint": {...}, "bytes", "docs"},
 "tokenizer": {"spec": "bpe", "name": "bpe", "vocab_size", "eot_id", "sha256" (of tokenizer.json)},
 "vocab_size", "eot_id" (null for byte/char: no document boundaries), "separator": [ids],
 "dtype": "uint16" | "uint32",
 "options": {"val_fraction", "chunk_bytes", "shard_tokens", "bpe_sample_bytes", ...},
 "shards": [{"file", "tokens", "docs" (documents ending in it), "bytes" (source bytes), "sha256"}],
 "total_tokens", "total_docs", "train_tokens", "val_tokens",
 "splits": {"train": [{"file", "start", "tokens"}, …], "val": […]}}
```
"""

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

import numpy as np
from absl import logging

from gpt_jax import cli
from gpt_jax.data import tokenizers

FORMAT = "gpt_jax.shards"
VERSION = 1
META, PROGRESS, TOKENIZER = "meta.json", "progress.json", "tokenizer.json"
_UINT16_VOCAB = 1 << 16


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds ids below `vocab_size` (uint16 or uint32)."""
    return "uint16" if vocab_size <= _UINT16_VOCAB else "uint32"


def shard_name(index: int) -> str:
    """The file name of shard `index`."""
    return f"tokens_{index:05d}.bin"


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    """Writes `obj` to `path` through a temporary file and a rename: readers never see half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def sha256_file(path: pathlib.Path) -> str:
    """The sha256 of the file at `path` (read in bounded blocks by hashlib)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def shards_intact(folder: pathlib.Path, shards: list[dict[str, Any]], dtype: str) -> int:
    """How many of `shards`, from the first, exist in `folder` with the size their token count
    says (a cheap check; `verify` compares checksums)."""
    for i, shard in enumerate(shards):
        if _size_problem(folder, shard, dtype) is not None:
            return i
    return len(shards)


def _size_problem(folder: pathlib.Path, shard: dict[str, Any], dtype: str) -> str | None:
    """What is wrong with the file of `shard` (a record of meta.json) by its size alone, or None."""
    path = folder / shard["file"]
    if not path.is_file():
        return f"{path} is missing"
    size, want = path.stat().st_size, shard["tokens"] * np.dtype(dtype).itemsize
    if size != want:
        what = "truncated" if size < want else "longer than meta.json says"
        return (f"{path} is {what}: {size:,} bytes where meta.json lists {shard['tokens']:,} "
                f"{dtype} tokens ({want:,} bytes)")
    return None


class ShardWriter:
    """Appends chunks of tokens to shards, each written to a temporary file and renamed into
    place once full, then recorded in progress.json with the chunk count it covers, so an
    interrupted prepare resumes after its last complete shard."""

    def __init__(self, folder: pathlib.Path, progress: dict[str, Any], dtype: str,
                 shard_tokens: int):
        """Continues after the shards already listed in `progress` (a dict with "shards")."""
        self._folder, self._progress = folder, progress
        self._dtype, self._shard_tokens = np.dtype(dtype), shard_tokens
        self._file = None

    @property
    def shards(self) -> list[dict[str, Any]]:
        """The complete shards' records."""
        return self._progress["shards"]

    def write(self, tokens: np.ndarray, docs: int, nbytes: int, chunks_end: int) -> None:
        """Appends one chunk's tokens (`docs` documents ending in it, `nbytes` source bytes);
        `chunks_end` is the number of chunks read so far, the resume point."""
        if self._file is None:
            name = shard_name(len(self.shards))
            self._tmp = self._folder / f".{name}.tmp"
            self._file = self._tmp.open("wb")
            self._digest = hashlib.sha256()
            self._current = {"file": name, "tokens": 0, "docs": 0, "bytes": 0}
        data = np.ascontiguousarray(tokens, dtype=self._dtype).tobytes()
        self._file.write(data)
        self._digest.update(data)
        c = self._current
        c["tokens"] += len(tokens)
        c["docs"] += docs
        c["bytes"] += nbytes
        c["chunks_end"] = chunks_end
        if c["tokens"] >= self._shard_tokens:
            self.flush()

    def flush(self) -> None:
        """Closes the current shard, if any, renames it into place and records it."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        os.replace(self._tmp, self._folder / self._current["file"])
        self.shards.append({**self._current, "sha256": self._digest.hexdigest()})
        write_json_atomic(self._folder / PROGRESS, self._progress)

    def abandon(self) -> None:
        """Closes the current shard's temporary file, leaving it for a resume to overwrite."""
        if self._file is not None:
            self._file.close()
            self._file = None


def split_ranges(shards: list[dict[str, Any]], num_train: int
                 ) -> dict[str, list[dict[str, Any]]]:
    """The train and val ranges of the shards' token stream split after `num_train` tokens."""
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    offset = 0
    for shard in shards:
        start, stop = offset, offset + shard["tokens"]
        cut = min(max(num_train, start), stop)
        if cut > start:
            splits["train"].append({"file": shard["file"], "start": 0, "tokens": cut - start})
        if stop > cut:
            splits["val"].append({"file": shard["file"], "start": cut - start,
                                  "tokens": stop - cut})
        offset = stop
    return splits


@dataclasses.dataclass(frozen=True)
class PreparedShards:
    """An opened prepared folder: each split a list of read-only 1-D memmaps, in stream order."""

    dir: pathlib.Path
    meta: dict[str, Any]
    tokenizer: tokenizers.Tokenizer
    eot_id: int | None
    dtype: np.dtype
    train: list[np.ndarray]
    val: list[np.ndarray]

    @property
    def num_train_tokens(self) -> int:
        """Tokens in the train split."""
        return sum(len(a) for a in self.train)

    @property
    def num_val_tokens(self) -> int:
        """Tokens in the val split."""
        return sum(len(a) for a in self.val)


def _memmaps(folder: pathlib.Path, ranges: list[dict[str, Any]], dtype: np.dtype
             ) -> list[np.ndarray]:
    # A memmap at an offset (not a slice of one) pickles as its file coordinates: see
    # pipeline.WindowSource.__getstate__. mmap cannot map an empty range, so none are listed.
    return [np.memmap(folder / r["file"], dtype=dtype, mode="r", offset=r["start"] * dtype.itemsize,
                      shape=(r["tokens"],)) for r in ranges if r["tokens"]]


def write_meta(folder: pathlib.Path, progress: dict[str, Any], fields: dict[str, Any]
               ) -> dict[str, Any]:
    """Writes meta.json (`fields` + the shards of `progress`, their totals and the train/val
    split), the mark of a complete folder, removes progress.json, and returns the meta.

    `fields` holds the schema's entries from "fingerprint" to "options"; its "source" gets
    "bytes" and "docs" here.
    """
    records = [{k: v for k, v in s.items() if k != "chunks_end"} for s in progress["shards"]]
    total = sum(s["tokens"] for s in records)
    num_docs = sum(s["docs"] for s in records)
    fields["source"].update(bytes=sum(s["bytes"] for s in records), docs=num_docs)
    num_train = int(total * (1 - fields["options"]["val_fraction"]))  # nanoGPT's split.
    meta = {"format": FORMAT, "version": VERSION, **fields, "shards": records,
            "total_tokens": total, "total_docs": num_docs, "train_tokens": num_train,
            "val_tokens": total - num_train, "splits": split_ranges(records, num_train)}
    write_json_atomic(folder / META, meta)
    (folder / PROGRESS).unlink()
    return meta


def read_meta(folder: str | pathlib.Path) -> dict[str, Any] | None:
    """meta.json of `folder` if it is a readable file of this format, else None."""
    meta = cli.json_object(pathlib.Path(folder) / META)
    return meta if meta is not None and meta.get("format") == FORMAT else None


def complete_meta(folder: pathlib.Path, fingerprint: str) -> dict[str, Any] | None:
    """meta.json of `folder` if it is complete (tokenizer.json and every shard of the right size
    present) and made with `fingerprint` (same source, tokenizer and options), else None."""
    meta = read_meta(folder)
    if (meta is None or meta.get("fingerprint") != fingerprint
            or not (folder / TOKENIZER).is_file()
            or shards_intact(folder, meta["shards"], meta["dtype"]) < len(meta["shards"])):
        return None
    return meta


def open_shards(folder: str | pathlib.Path) -> PreparedShards:
    """Opens a prepared folder (made by the prepare CLI or by training's in-process prepare):
    each split as read-only memmaps of its shard ranges, with the folder's tokenizer."""
    folder = pathlib.Path(folder)
    meta = read_meta(folder)
    if meta is None and (folder / "train.bin").is_file():
        # Written by the in-process prepare of gpt_jax before it wrote this format.
        raise ValueError(f"{str(folder)!r} is a prepared folder in the old train.bin/val.bin "
                         "format; delete it and prepare the data again (training re-prepares "
                         "data.corpus / data.path by itself).")
    if meta is None:
        raise FileNotFoundError(f"{str(folder)!r} is not a prepared data folder (no {FORMAT} "
                                "meta.json); run python -m gpt_jax.data.prepare --out=DIR first.")
    if meta["version"] != VERSION:
        raise ValueError(f"prepared folder {str(folder)!r} has {FORMAT} version {meta['version']}, "
                         f"this code reads version {VERSION}; prepare the data again.")
    dtype = np.dtype(meta["dtype"])
    for shard in meta["shards"]:  # Sizes only: a memmap of a short file would fail or misread.
        if problem := _size_problem(folder, shard, meta["dtype"]):
            raise ValueError(f"prepared folder {str(folder)!r} is damaged: {problem}; run the "
                             "prepare command that made it again (same flags): it rebuilds the "
                             "folder.")
    tokenizer = tokenizers.load_tokenizer(folder / TOKENIZER)
    return PreparedShards(folder, meta, tokenizer, meta["eot_id"], dtype,
                          _memmaps(folder, meta["splits"]["train"], dtype),
                          _memmaps(folder, meta["splits"]["val"], dtype))


def verify(folder: str | pathlib.Path) -> dict[str, Any]:
    """Checks every shard and tokenizer.json of the prepared folder `folder` against its sha256
    in meta.json (a full read of the data); returns the meta.

    Raises ValueError, in one line naming the first file that differs and the fix. The sizes
    that `open_shards` checks catch a truncated file; only the checksums catch changed bytes.
    """
    folder = pathlib.Path(folder)
    meta = read_meta(folder)
    if meta is None:
        interrupted = (folder / PROGRESS).is_file()
        raise ValueError(
            f"{str(folder)!r} holds an interrupted prepare (progress.json, no meta.json); run its "
            "prepare command again to finish it." if interrupted else
            f"{str(folder)!r} is not a prepared data folder (no {FORMAT} meta.json); prepare the "
            "data first with python -m gpt_jax.data.prepare --out=DIR.")
    # A changed file is not rebuilt by running prepare again (its size still matches, so the
    # folder looks up to date): the fix is a fresh folder.
    fix = f"delete {folder} and prepare the data again, or prepare it into a new --out."
    for shard in meta["shards"]:
        if problem := _size_problem(folder, shard, meta["dtype"]):
            raise ValueError(f"{problem}; {fix}")
    files = [(s["file"], s["sha256"]) for s in meta["shards"]]
    files.append((TOKENIZER, meta["tokenizer"]["sha256"]))
    for name, want in files:
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path} is missing; {fix}")
        if sha256_file(path) != want:
            raise ValueError(f"{path} does not match its sha256 in meta.json (its bytes changed "
                             f"after prepare wrote it); {fix}")
    logging.info("Verified %s: %d shard(s) and %s match their sha256 in meta.json.", folder,
                 len(meta["shards"]), TOKENIZER)
    return meta
