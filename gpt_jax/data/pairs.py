"""Sequence pairs for `model.arch=seq2seq`: JSONL or a built-in task (tasks.py) → a prepared
folder → Grain batches of padded sources and teacher-forced targets.

A prepared pairs folder:

    meta.json          {"format": "gpt_jax.pairs", "version", "tokenizer", "vocab_size" (the
                       model's: the tokenizer's plus an end-of-sequence id for tokenizers without
                       an end-of-text token), "eos_id", "dtype", "source" (where the pairs came
                       from), "fields", "fingerprint", "splits": {"train"|"val": {"examples",
                       "source_tokens", "target_tokens"}}}
    tokenizer.json     the tokenizer (data/tokenizers.py), shared by both sides
    {split}.source.bin, {split}.target.bin   every example's ids, concatenated (dtype)
    {split}.offsets.npy  int64 [examples + 1, 2]: where each example's source and target start
                         (so lengths are recorded without reading the tokens)

It is written to a temporary folder and renamed into place, so an interrupted prepare leaves
nothing half-written, and an up-to-date folder (same fingerprint) is reused.

The batch (gpt_jax/data/batch.py's dict, plus the source): `source` [B, S] ids right-padded with
0 and `source_mask` [B, S] (1 on real tokens); `inputs` [B, T] = EOS + target (EOS doubles as
the decoder's start token, as in T5 and Marian), `targets` [B, T] = target + EOS, `weights` 1 on
the target tokens and the EOS, 0 on padding: the loss is on target tokens only. S =
data.source_len, T = data.seq_len. Sources longer than S are cut to S; examples whose target
does not fit T (target + EOS) are left out, and both counts are logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from gpt_jax import cli
from gpt_jax.data import pipeline, shards, tokenizers

FORMAT, VERSION = "gpt_jax.pairs", 1
SPLITS = ("train", "val")
Record = dict[str, str]


def read_meta(folder: str | pathlib.Path) -> dict[str, Any] | None:
    """meta.json of `folder` if it is a readable pairs folder's, else None."""
    meta = cli.json_object(pathlib.Path(folder).expanduser() / shards.META)
    return meta if meta is not None and meta.get("format") == FORMAT else None


def read_jsonl(path: str | pathlib.Path, source_field: str, target_field: str) -> list[Record]:
    """The pairs of a JSONL file: one object per line with two text fields. A line that is no
    JSON object, or lacks a field, is a ValueError naming the line and the fix."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"the pairs file {str(path)!r} does not exist; give a JSONL file "
                                "of objects with source and target text fields.")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not JSON ({e.msg}); give one JSON object "
                                 "per line.") from None
            for field in (source_field, target_field):
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise ValueError(
                        f"{path}:{number} has no text field {field!r}; name the fields with "
                        "--source_field / --target_field (data.source_field, data.target_field).")
            records.append({"source": obj[source_field], "target": obj[target_field]})
    if not records:
        raise ValueError(f"{path} holds no pairs; give at least one JSON object per line.")
    return records


def split_records(records: list[Record], val_fraction: float) -> tuple[list[Record], list[Record]]:
    """The last `val_fraction` of the records validate (at least one, and one left to train)."""
    if len(records) < 2:
        raise ValueError(f"{len(records)} pair(s) cannot make a train and a val split; give more.")
    n_val = min(max(1, round(len(records) * val_fraction)), len(records) - 1)
    return records[:-n_val], records[-n_val:]


def eos_and_vocab(tok: tokenizers.Tokenizer) -> tuple[int, int]:
    """(end-of-sequence id, the model's vocabulary size): the tokenizer's end-of-text token where
    it has one, else one id past its vocabulary."""
    if tok.eot_id is not None:
        return tok.eot_id, tok.vocab_size
    return tok.vocab_size, tok.vocab_size + 1


def prepare(train: list[Record], val: list[Record], tokenizer_name: str, out: str | pathlib.Path,
            description: str, vocab_size: int | None = None) -> pathlib.Path:
    """Tokenizes both sides of both splits into the folder `out` (see the module docstring) and
    returns it; an existing folder prepared from the same pairs and tokenizer is kept as it is.
    A folder that holds anything else is refused, never overwritten."""
    out = pathlib.Path(out).expanduser()
    fingerprint = _fingerprint(train, val, tokenizer_name, vocab_size)
    meta = read_meta(out)
    if meta is not None and meta.get("fingerprint") == fingerprint:
        return out
    if out.exists() and any(out.iterdir()):
        what = "other pairs" if meta is not None else "files"
        raise FileExistsError(f"{out} already holds {what}; give an empty or new --out folder "
                              "(nothing there was changed).")
    # A learned vocabulary covers both splits, as the language-model path's whole corpus does.
    texts = [r[side] for r in train + val for side in ("source", "target")]
    tok = tokenizers.build_tokenizer(tokenizer_name, texts if tokenizers.learns_vocab(
        tokenizer_name) else [], vocab_size)
    eos_id, model_vocab = eos_and_vocab(tok)
    dtype = shards.token_dtype(model_vocab)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        splits = {}
        for name, records in (("train", train), ("val", val)):
            splits[name] = _write_split(tmp, name, records, tok, dtype)
        tokenizers.save_tokenizer(tok, tmp / shards.TOKENIZER)
        shards.write_json_atomic(tmp / shards.META, {
            "format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
            "tokenizer": tok.to_dict() | {"spec": tokenizer_name}, "vocab_size": model_vocab,
            "eos_id": eos_id, "dtype": dtype, "source": description,
            "splits": splits})
        if out.exists():
            out.rmdir()  # Empty (checked above).
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _fingerprint(train: list[Record], val: list[Record], tokenizer_name: str,
                 vocab_size: int | None) -> str:
    """What the prepared folder depends on: every pair, the split, the tokenizer."""
    digest = hashlib.sha256()
    for split in (train, val):
        for r in split:
            digest.update(json.dumps([r["source"], r["target"]]).encode())
        digest.update(b"|")
    tokenizer_file = None  # hf:PATH names a file whose contents may change.
    if tokenizer_name.startswith(tokenizers.HF_PREFIX):
        path = pathlib.Path(tokenizer_name.removeprefix(tokenizers.HF_PREFIX)).expanduser()
        tokenizer_file = shards.sha256_file(path) if path.is_file() else None
    return hashlib.sha256(json.dumps([FORMAT, VERSION, digest.hexdigest(), tokenizer_name,
                                      tokenizer_file, vocab_size]).encode()).hexdigest()


def _write_split(folder: pathlib.Path, name: str, records: list[Record],
                 tok: tokenizers.Tokenizer, dtype: str) -> dict[str, int]:
    sources = [tok.encode(r["source"]) for r in records]
    targets = [tok.encode(r["target"]) for r in records]
    offsets = np.zeros((len(records) + 1, 2), np.int64)
    offsets[1:, 0] = np.cumsum([len(s) for s in sources])
    offsets[1:, 1] = np.cumsum([len(t) for t in targets])
    for side, ids in (("source", sources), ("target", targets)):
        joined = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        joined.astype(dtype).tofile(folder / f"{name}.{side}.bin")
    np.save(folder / f"{name}.offsets.npy", offsets)
    return {"examples": len(records), "source_tokens": int(offsets[-1, 0]),
            "target_tokens": int(offsets[-1, 1])}


@dataclasses.dataclass(frozen=True)
class PairSplit:
    """One split's examples: memory-mapped ids and their offsets."""

    source: np.ndarray
    target: np.ndarray
    offsets: np.ndarray  # [examples + 1, 2]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(source ids, target ids) of example i."""
        (s0, t0), (s1, t1) = self.offsets[i], self.offsets[i + 1]
        return np.asarray(self.source[s0:s1]), np.asarray(self.target[t0:t1])


@dataclasses.dataclass(frozen=True)
class PairData:
    """A run's sequence pairs: the tokenizer, the eos id, the model's vocabulary and the splits."""

    tokenizer: tokenizers.Tokenizer
    eos_id: int
    vocab_size: int
    train: PairSplit
    val: PairSplit
    folder: str

    eot_id = None  # TrainingData's field: no documents to mask inside a pair.

    def encode(self, text: str) -> np.ndarray:
        """A source text's ids (the tokenizer's; no EOS is added to sources)."""
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of target ids, cut at the first EOS."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tokenizer.decode(np.asarray(ids, np.int32))


def open_folder(folder: str | pathlib.Path) -> PairData:
    """Opens a prepared pairs folder; a ValueError names what is wrong with it."""
    folder = pathlib.Path(folder).expanduser()
    meta = read_meta(folder)
    if meta is None:
        raise ValueError(f"{folder} is no prepared pairs folder (no {shards.META} of format "
                         f"{FORMAT}); make one with `python -m gpt_jax.data.prepare --pairs "
                         "--source=FILE.jsonl --tokenizer=char --out=DIR`.")
    splits = {}
    for name in SPLITS:
        try:
            offsets = np.load(folder / f"{name}.offsets.npy")
            arrays = [np.memmap(folder / f"{name}.{side}.bin", dtype=meta["dtype"], mode="r")
                      if offsets[-1, k] else np.zeros(0, meta["dtype"])
                      for k, side in enumerate(("source", "target"))]
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder}'s {name} split cannot be read ({e}); prepare the folder "
                             "again.") from None
        if arrays[0].size != offsets[-1, 0] or arrays[1].size != offsets[-1, 1]:
            raise ValueError(f"{folder}'s {name} split is truncated; prepare the folder again.")
        splits[name] = PairSplit(arrays[0], arrays[1], offsets)
    tok = tokenizers.load_tokenizer(folder / shards.TOKENIZER)
    return PairData(tok, int(meta["eos_id"]), int(meta["vocab_size"]), splits["train"],
                    splits["val"], str(folder))


class PairSource(grain.sources.RandomAccessDataSource):
    """Examples of a split that fit, as padded arrays (see the module docstring)."""

    def __init__(self, split: PairSplit, eos_id: int, source_len: int, target_len: int,
                 what: str):
        """Keeps the examples of `split` whose target and EOS fit `target_len`; `what` names
        the split in the log line that counts what was left out or cut."""
        lengths = np.diff(split.offsets, axis=0)
        self._keep = np.flatnonzero(lengths[:, 1] + 1 <= target_len)
        dropped, cut = len(split) - len(self._keep), int(np.sum(lengths[:, 0] > source_len))
        if dropped or cut:
            logging.info("%s: %d of %d examples left out (target + EOS longer than data.seq_len="
                         "%d); %d sources cut to data.source_len=%d.", what, dropped, len(split),
                         target_len, cut, source_len)
        if not len(self._keep):
            raise ValueError(f"no example of {what} has a target that fits data.seq_len="
                             f"{target_len} (with its EOS); raise data.seq_len.")
        self._split, self._eos = split, eos_id
        self._S, self._T = source_len, target_len

    def __len__(self) -> int:
        return len(self._keep)

    def ids(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(source ids cut to the source length, target ids) of example `index`."""
        source, target = self._split.example(int(self._keep[index]))
        return source[:self._S], target

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return pad_example(*self.ids(index), self._eos, self._S, self._T)

    def __repr__(self) -> str:
        return f"PairSource({len(self)} examples, S={self._S}, T={self._T})"


def pad_example(source: np.ndarray, target: np.ndarray, eos_id: int, source_len: int,
                target_len: int) -> dict[str, np.ndarray]:
    """One example's arrays (the batch's rows; see the module docstring)."""
    row = {"source": np.zeros(source_len, np.int32), "source_mask": np.zeros(source_len, np.int32),
           "inputs": np.zeros(target_len, np.int32), "targets": np.zeros(target_len, np.int32),
           "weights": np.zeros(target_len, np.float32)}
    n, m = len(source), len(target)
    row["source"][:n], row["source_mask"][:n] = source, 1
    row["inputs"][0], row["inputs"][1:m + 1] = eos_id, target
    row["targets"][:m], row["targets"][m] = target, eos_id
    row["weights"][:m + 1] = 1.0
    return row


def batch_spec(batch_size: int, target_len: int, source_len: int
               ) -> dict[str, tuple[tuple[int, int], np.dtype]]:
    """(shape, dtype) of each array of a pair batch."""
    t, s = (batch_size, target_len), (batch_size, source_len)
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    return {"inputs": (t, i32), "targets": (t, i32), "weights": (t, f32), "source": (s, i32),
            "source_mask": (s, i32)}


def train_dataset(data: PairData, source_len: int, target_len: int, batch_size: int, seed: int,
                  shard_index: int, shard_count: int, num_threads: int, prefetch: int
                  ) -> grain.IterDataset:
    """An endless stream of this process's rows of each global batch: every epoch a fresh
    seeded permutation of the train examples; global batch b is the same whatever the number of
    processes (each reads rows [shard_index·b, (shard_index+1)·b) of it). `iter()` of it has
    get_state/set_state, so a resumed run continues with the batch it would have drawn."""
    pipeline.check_shard(batch_size, shard_index, shard_count)
    source = PairSource(data.train, data.eos_id, source_len, target_len, "the train split")
    ds = grain.MapDataset.source(source).shuffle(seed=pipeline.shuffle_seed(seed)).repeat(None)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return pipeline.local_batches(ds, batch_size, shard_index, shard_count).to_iter_dataset(read)


def val_source(data: PairData, source_len: int, target_len: int) -> PairSource:
    """The val examples that fit (made once per run: it logs what it leaves out)."""
    return PairSource(data.val, data.eos_id, source_len, target_len, "the val split")


def eval_batches(source: PairSource, batch_size: int, num_batches: int | None
                 ) -> Iterator[dict[str, np.ndarray]]:
    """The examples of `source` in order, `num_batches` batches of them (None: all), the last
    padded with rows of weight 0, so Σ w·loss / Σ w is the exact mean over the target tokens."""
    total = -(-len(source) // batch_size)
    for b in range(total if num_batches is None else min(num_batches, total)):
        rows = [source[i] for i in range(b * batch_size, min((b + 1) * batch_size, len(source)))]
        empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
        rows += [empty] * (batch_size - len(rows))
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def examples(source: PairSource, limit: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(source ids as the model reads them, target ids) of the first `limit` examples of
    `source` (None: all)."""
    n = len(source) if limit is None else min(limit, len(source))
    return [source.ids(i) for i in range(n)]


def load(task: str | None, path: str | None, prepared: str | None, tokenizer_name: str,
         cache_dir: str, val_fraction: float, task_examples: int, task_seed: int,
         source_field: str, target_field: str, vocab_size: int | None) -> PairData:
    """The run's pairs from data.prepared, data.task or data.path (a JSONL file), prepared into
    `cache_dir/pairs/<hash>` unless already prepared."""
    if prepared:
        return open_folder(prepared)
    from gpt_jax.data import tasks  # The docsig task parses the stdlib: only when asked.

    if task:
        train, val = tasks.make(task, task_examples, task_seed)
        description = f"task {task} ({task_examples} examples, seed {task_seed})"
    elif path:
        train, val = split_records(read_jsonl(path, source_field, target_field), val_fraction)
        description = f"{path} ({source_field} → {target_field})"
    else:
        raise ValueError("model.arch=seq2seq reads sequence pairs: set data.task (addition | "
                         "sort | docsig), data.path to a JSONL file, or data.prepared to a pairs "
                         "folder.")
    key = _fingerprint(train, val, tokenizer_name, vocab_size)[:16]
    folder = pathlib.Path(cache_dir).expanduser() / "pairs" / key
    if read_meta(folder) is None and folder.exists():
        shutil.rmtree(folder)  # A cache entry left without its meta.json is incomplete.
    return open_folder(prepare(train, val, tokenizer_name, folder, description, vocab_size))


def describe(data: PairData) -> str:
    """One line about the pairs, for the log."""
    return (f"{len(data.train):,} train and {len(data.val):,} val pairs in {data.folder}; "
            f"tokenizer {data.tokenizer.name} (model vocab {data.vocab_size}, EOS id "
            f"{data.eos_id})")
