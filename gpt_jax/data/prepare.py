"""Tokenize a corpus once into token files: in-process for training, or from the command line.

In process (`prepare`, what training does with data.corpus / data.path): the whole corpus in
memory → `cache_dir/prepared/<key>/` holding train.bin, val.bin (nanoGPT's format: flat
little-endian uint16 or uint32 token ids), tokenizer.json and meta.json. The key hashes
everything the files depend on, so a changed corpus, tokenizer or split gets a new folder and an
unchanged one is reused.

Command line, for corpora of any size (streamed, parallel, resumable; format in shards.py):

    python -m gpt_jax.data.prepare --source=FILE|FOLDER|GLOB|FILE.jsonl|hf:NAME[:CONFIG]
        --tokenizer=byte|char|bpe|gpt2|hf:tokenizer.json [--vocab_size=N] --out=DIR
        [--val_fraction=0.1 --num_workers=N --text_field=text --split=train]

`open_prepared(DIR)` opens either kind of folder as memmaps.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any

import numpy as np
from absl import app, flags, logging

from gpt_jax.data import prepare_stream, shards, tokenizers
from gpt_jax.data.corpora import Corpus

# Bump when the prepared files' layout or tokenization changes, to invalidate old caches.
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A prepared folder: token files, their metadata and the tokenizer that made them."""

    dir: pathlib.Path
    train_path: pathlib.Path
    val_path: pathlib.Path
    meta: dict[str, Any]
    tokenizer: tokenizers.Tokenizer

    def train_tokens(self) -> np.ndarray:
        """Returns the train split's token ids as a read-only memmap."""
        return _open_tokens(self.train_path, self.meta["dtype"], self.meta["train_tokens"])

    def val_tokens(self) -> np.ndarray:
        """Returns the validation split's token ids as a read-only memmap."""
        return _open_tokens(self.val_path, self.meta["dtype"], self.meta["val_tokens"])


def _open_tokens(path: pathlib.Path, dtype: str, count: int) -> np.ndarray:
    if count == 0:
        # mmap cannot map an empty file; an empty split is still a valid (useless) split.
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def _key(source_sha256: str, tokenizer_name: str, val_fraction: float,
         tokenizer_options: dict[str, Any]) -> str:
    parts: list[Any] = [FORMAT_VERSION, source_sha256, tokenizer_name, val_fraction]
    if tokenizer_options:  # Only where they exist (bpe, hf:): byte and char keys stay as they were.
        parts.append(tokenizer_options)
    kind = tokenizer_name.partition(":")[0]  # hf:PATH → hf: a path is no folder name.
    return f"{kind}-{hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]}"


def _is_valid(folder: pathlib.Path, identity: dict[str, Any], tokenizer_name: str) -> bool:
    """Whether `folder` is a complete prepared folder of this identity and tokenizer."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if any(meta.get(k) != v for k, v in identity.items()):
        return False
    if meta["tokenizer"]["name"] != tokenizer_name.partition(":")[0]:
        return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    # A truncated token file means a damaged cache, whatever meta.json says.
    return all(
        (folder / f"{split}.bin").is_file()
        and (folder / f"{split}.bin").stat().st_size == meta[f"{split}_tokens"] * itemsize
        for split in ("train", "val")
    )


def load_prepared(folder: str | pathlib.Path) -> Prepared:
    """Returns the prepared folder `folder` (made by `prepare`, e.g. named by data.prepared)."""
    folder = pathlib.Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a prepared data folder (no meta.json); point data.prepared "
            "at a folder made by the prepare step."
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta["version"] != FORMAT_VERSION:
        raise ValueError(
            f"prepared folder {str(folder)!r} has format version {meta['version']}, this code "
            f"reads version {FORMAT_VERSION}; prepare the data again."
        )
    tokenizer = tokenizers.load_tokenizer(folder / "tokenizer.json")
    max_id = np.iinfo(np.dtype(meta["dtype"])).max
    if tokenizer.vocab_size - 1 > max_id:
        raise ValueError(
            f"prepared folder {str(folder)!r} stores tokens as {meta['dtype']} (ids up to {max_id}) "
            f"but its tokenizer has {tokenizer.vocab_size} ids; prepare the data again."
        )
    return Prepared(
        dir=folder,
        train_path=folder / "train.bin",
        val_path=folder / "val.bin",
        meta=meta,
        tokenizer=tokenizer,
    )


def _write(folder: pathlib.Path, corpus: Corpus, tokenizer_name: str, val_fraction: float,
           identity: dict[str, Any], vocab_size: int | None) -> None:
    """Tokenizes `corpus` and writes every file of a prepared folder into `folder`."""
    # bpe trains on a bounded head of the corpus, as the CLI does (tokenizers.BPE_SAMPLE_BYTES,
    # here in characters).
    sample = corpus.text[: tokenizers.BPE_SAMPLE_BYTES] if tokenizer_name == "bpe" else corpus.text
    tok = tokenizers.build_tokenizer(tokenizer_name, sample, vocab_size)
    ids = tok.encode(corpus.text)
    dtype = shards.token_dtype(tok.vocab_size)
    # nanoGPT's split: the first part of the token stream trains, the tail validates.
    num_train = int(len(ids) * (1 - val_fraction))
    ids = ids.astype(dtype)
    ids[:num_train].tofile(folder / "train.bin")
    ids[num_train:].tofile(folder / "val.bin")
    tokenizers.save_tokenizer(tok, folder / "tokenizer.json")
    meta = {
        **identity,
        "source": corpus.description,
        "tokenizer": tok.to_dict(),
        "dtype": dtype,
        "train_tokens": num_train,
        "val_tokens": len(ids) - num_train,
    }
    # meta.json last: its presence is what marks a folder complete.
    (folder / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1),
                                      encoding="utf-8")
    logging.info("Prepared %s: %d train and %d val tokens (%s, vocab %d).", corpus.description,
                 num_train, len(ids) - num_train, dtype, tok.vocab_size)


def prepare(corpus: Corpus, tokenizer_name: str, cache_dir: str, val_fraction: float,
            vocab_size: int | None = None) -> Prepared:
    """Returns the prepared token files of `corpus`, tokenizing it unless an up-to-date copy exists.

    The first (1 - val_fraction) of the token stream is the train split, the rest validation.
    `vocab_size` is bpe's (default tokenizers.DEFAULT_BPE_VOCAB). Files are written into a
    temporary folder renamed into place, so an interrupted prepare never leaves a folder that
    looks complete.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    tokenizers.check_name(tokenizer_name)
    tokenizer_options = {}
    if tokenizer_name == "bpe":
        vocab_size = vocab_size or tokenizers.DEFAULT_BPE_VOCAB
        tokenizer_options["vocab_size"] = vocab_size
    elif tokenizer_name.startswith(tokenizers.HF_PREFIX):  # The file's contents, not its name.
        path = pathlib.Path(tokenizer_name.removeprefix(tokenizers.HF_PREFIX))
        if path.is_file():
            tokenizer_options["tokenizer_sha256"] = shards.sha256_file(path)
    identity = {
        "version": FORMAT_VERSION,
        "source_sha256": corpus.sha256,
        "val_fraction": val_fraction,
        **tokenizer_options,
    }
    root = pathlib.Path(cache_dir) / "prepared"
    final = root / _key(corpus.sha256, tokenizer_name, val_fraction, tokenizer_options)
    if _is_valid(final, identity, tokenizer_name):
        logging.info("Reusing prepared data in %s.", final)
        return load_prepared(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-"))
    try:
        _write(tmp, corpus, tokenizer_name, val_fraction, identity, vocab_size)
        if _is_valid(final, identity, tokenizer_name):
            # Another process (e.g. a second host on a shared disk) finished first: use its copy.
            return load_prepared(final)
        if final.exists():
            logging.warning("Replacing incomplete or stale prepared folder %s.", final)
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            # Lost a race to another process's rename: fine if its folder is complete.
            if not _is_valid(final, identity, tokenizer_name):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(final)


def open_prepared(folder: str | pathlib.Path) -> shards.PreparedShards:
    """Opens a prepared folder of either kind (the CLI's shards, or the in-process train.bin /
    val.bin) as lists of read-only memmaps per split, with its tokenizer and end-of-text id."""
    folder = pathlib.Path(folder)
    if shards.read_meta(folder) is not None:
        return shards.open_shards(folder)
    p = load_prepared(folder)  # Raises the "not a prepared folder" error if it is neither.
    train, val = p.train_tokens(), p.val_tokens()
    return shards.PreparedShards(folder, p.meta, p.tokenizer, p.tokenizer.eot_id,
                                 np.dtype(p.meta["dtype"]), [train] if len(train) else [],
                                 [val] if len(val) else [])


def _define_flags() -> None:
    """The CLI's flags; defined only when run as a program, so importers get no flags."""
    flags.DEFINE_string("source", None, "A text file, a folder or glob of files (.jsonl files: "
                        "one JSON document per line), or hf:NAME[:CONFIG] (needs `datasets`).")
    flags.DEFINE_string("tokenizer", None, "byte | char | bpe | gpt2 | hf:PATH/tokenizer.json.")
    flags.DEFINE_integer("vocab_size", None, "bpe's vocabulary size, end-of-text token included "
                         f"(default {tokenizers.DEFAULT_BPE_VOCAB}).")
    flags.DEFINE_string("out", None, "The prepared folder to write (created; resumed if "
                        "interrupted; reused if up to date).")
    flags.DEFINE_float("val_fraction", 0.1, "The last fraction of the token stream that "
                       "validates (as data.val_fraction).")
    flags.DEFINE_integer("num_workers", os.cpu_count(), "Tokenizing processes; 1 tokenizes in "
                         "the main process.")
    flags.DEFINE_string("text_field", "text", "The field holding the text in JSONL records and "
                        "Hugging Face examples.")
    flags.DEFINE_string("split", "train", "The Hugging Face dataset split to read.")
    flags.DEFINE_integer("shard_tokens", prepare_stream.SHARD_TOKENS, "Tokens per shard (a shard "
                         "closes at the first chunk boundary past this).")
    flags.DEFINE_integer("bpe_sample_mb", tokenizers.BPE_SAMPLE_BYTES >> 20, "bpe trains on the "
                         "first this many MiB of the source.")
    flags.DEFINE_bool("progress", True, "Show a progress bar (MB/s, tokens/s) on stderr.")
    flags.mark_flags_as_required(["source", "tokenizer", "out"])


def main(argv: list[str]) -> None:
    """Prepares --source into --out and prints a one-line summary."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    try:
        prepared = prepare_stream.prepare_folder(
            f.source, f.tokenizer, f.out, vocab_size=f.vocab_size, val_fraction=f.val_fraction,
            num_workers=f.num_workers, text_field=f.text_field, split=f.split,
            shard_tokens=f.shard_tokens, bpe_sample_bytes=f.bpe_sample_mb << 20,
            show_progress=f.progress)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print(f"interrupted: run the same command again to resume {f.out}.", file=sys.stderr)
        sys.exit(130)
    m = prepared.meta
    eot = ("no end-of-text token: documents end with a newline" if m["eot_id"] is None
           else f"end-of-text id {m['eot_id']}")
    print(f"{prepared.dir}: {m['total_tokens']:,} tokens ({m['train_tokens']:,} train, "
          f"{m['val_tokens']:,} val) in {len(m['shards'])} shard(s) of {m['dtype']}, from "
          f"{m['total_docs']:,} document(s), {m['source']['bytes'] / 1e6:.1f} MB of "
          f"{m['source']['description']}; tokenizer {m['tokenizer']['name']} (vocab "
          f"{m['vocab_size']:,}, {eot}).")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
