"""Tokenize a corpus once into train.bin / val.bin (nanoGPT's format), cached by content.

A prepared folder is `cache_dir/prepared/<key>/` holding train.bin, val.bin (flat little-endian
uint16 or uint32 token ids), tokenizer.json and meta.json. The key hashes everything the files
depend on, so a changed corpus, tokenizer or split gets a new folder and an unchanged one is reused.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np
from absl import logging

from gpt_jax.data import tokenizers
from gpt_jax.data.corpora import Corpus

# Bump when the prepared files' layout or tokenization changes, to invalidate old caches.
FORMAT_VERSION = 1
_UINT16_VOCAB = 1 << 16


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


def _token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= _UINT16_VOCAB else "uint32"


def _key(source_sha256: str, tokenizer_name: str, val_fraction: float) -> str:
    ident = json.dumps([FORMAT_VERSION, source_sha256, tokenizer_name, val_fraction])
    return f"{tokenizer_name}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _is_valid(folder: pathlib.Path, identity: dict[str, Any], tokenizer_name: str) -> bool:
    """Whether `folder` is a complete prepared folder of this identity and tokenizer."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if any(meta.get(k) != v for k, v in identity.items()):
        return False
    if meta["tokenizer"]["name"] != tokenizer_name:
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
           identity: dict[str, Any]) -> None:
    """Tokenizes `corpus` and writes every file of a prepared folder into `folder`."""
    tok = tokenizers.build_tokenizer(tokenizer_name, corpus.text)
    ids = tok.encode(corpus.text)
    dtype = _token_dtype(tok.vocab_size)
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


def prepare(corpus: Corpus, tokenizer_name: str, cache_dir: str, val_fraction: float) -> Prepared:
    """Returns the prepared token files of `corpus`, tokenizing it unless an up-to-date copy exists.

    The first (1 - val_fraction) of the token stream is the train split, the rest validation.
    Files are written into a temporary folder renamed into place, so an interrupted prepare never
    leaves a folder that looks complete.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    identity = {
        "version": FORMAT_VERSION,
        "source_sha256": corpus.sha256,
        "val_fraction": val_fraction,
    }
    root = pathlib.Path(cache_dir) / "prepared"
    final = root / _key(corpus.sha256, tokenizer_name, val_fraction)
    if _is_valid(final, identity, tokenizer_name):
        logging.info("Reusing prepared data in %s.", final)
        return load_prepared(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-"))
    try:
        _write(tmp, corpus, tokenizer_name, val_fraction, identity)
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
