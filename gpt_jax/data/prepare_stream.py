"""Streams a text source through a tokenizer into a sharded prepared folder (format: shards.py).

The main process reads the source in chunks of ~1 MB of text and writes shards; worker processes
tokenize the chunks. Results are written in chunk order and at most two chunks per worker are in
flight, so the output does not depend on the worker count (parallel equals serial byte for byte)
and memory stays bounded whatever the corpus size. A tokenizer that learns its vocabulary reads
the source first: bpe its first `bpe_sample_bytes`, char all of it.

Resume: every shard is renamed into place once complete and listed in progress.json with the
number of chunks it covers, under a fingerprint of (source, tokenizer, options). A run that
finds progress.json with its fingerprint keeps those shards and the saved tokenizer, reads past
the chunks they cover, and tokenizes the rest; one that finds meta.json with its fingerprint
and every shard in place reuses the folder as it is.

What `--out` may be, checked before anything is written: a new or empty folder; the same
prepare's folder (reused, resumed, or rebuilt if a shard is missing or truncated). Anything else
is refused and left as it is: a file, a folder of other files (a training workdir), data
prepared from another source, tokenizer or options, or a folder inside the source folder. A
prepare that fails leaves nothing it made behind, except an interrupted or I/O-failed one that
had saved its progress (progress.json): that is kept, to resume.
"""

import collections
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import pathlib
import re
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tqdm
from absl import logging

from gpt_jax import cli
from gpt_jax.data import shards, sources, tokenizers

CHUNK_BYTES = 1 << 20  # Text per task: large enough to amortise pickling, small for balance.
SHARD_TOKENS = 1 << 26  # ~67M tokens (128 MiB as uint16) per shard, nanoGPT fineweb's order.
_PENDING_PER_WORKER = 2  # Chunks in flight per worker: keeps workers busy, memory bounded.
_TRAIN_HERE_BYTES = 16 << 20  # Smaller sources train bpe in this process: a child costs ~0.5 s.

# Per worker process, set once by the pool's initializer: the tokenizer is rebuilt there from
# its dict rather than pickled with every chunk.
_worker: dict[str, Callable[[list[sources.Piece]], np.ndarray]] = {}


def encode_chunk(tok: tokenizers.Tokenizer, separator: np.ndarray, dtype: str,
                 chunk: list[sources.Piece]) -> np.ndarray:
    """Returns the tokens of `chunk`'s pieces, `separator` after each document's last piece."""
    parts = []
    for piece in chunk:
        parts.append(tok.encode(piece.text))
        if piece.doc_end:
            parts.append(separator)
    return np.concatenate(parts).astype(dtype)


def _init_worker(tok_dict: dict[str, Any], separator: np.ndarray, dtype: str) -> None:
    # Ctrl-C reaches the whole process group: the main process alone handles it (it terminates
    # the pool), instead of every worker printing a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tok = tokenizers.tokenizer_from_dict(tok_dict)
    _worker["encode"] = functools.partial(encode_chunk, tok, separator, dtype)


def _encode_in_worker(chunk: list[sources.Piece]) -> np.ndarray:
    return _worker["encode"](chunk)


def _chunks(pieces: Iterable[sources.Piece], chunk_bytes: int) -> Iterator[list[sources.Piece]]:
    """Groups pieces into chunks of at least `chunk_bytes` source bytes (the last may be less)."""
    chunk, size = [], 0
    for piece in pieces:
        chunk.append(piece)
        size += piece.nbytes
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded(chunks: Iterable[list[sources.Piece]], encode: Callable, num_workers: int,
             init_args: tuple) -> Iterator[tuple[list[sources.Piece], np.ndarray]]:
    """Yields (chunk, tokens) in chunk order, tokenized by `num_workers` processes (or here)."""
    if num_workers <= 1:
        for chunk in chunks:
            yield chunk, encode(chunk)
        return
    # spawn, not fork: forking a process whose Rust or tqdm threads hold locks can deadlock.
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_workers, initializer=_init_worker, initargs=init_args) as pool:
        pending = collections.deque()
        # Pool.imap would read the whole source ahead into its task queue: submit by hand.
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_encode_in_worker, (chunk,))))
            if len(pending) >= _PENDING_PER_WORKER * num_workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


def _fingerprint(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


# The files a prepare writes into --out: shards.py's, and the temporary files they are written
# through (ShardWriter's, write_json_atomic's, _save_tokenizer's and save_tokenizer's).
_OURS = re.compile(r"(meta|progress|tokenizer)\.json|tokens_\d+\.bin"
                   r"|\.+(meta\.json|progress\.json|tokenizer\.json|tokens_\d+\.bin)\.tmp.*")
# A training workdir's files: its tokenizer.json is the run's, never to be replaced.
_WORKDIR_FILES = ("config.json", "metrics.jsonl", "checkpoints")


@dataclasses.dataclass
class _Claim:
    """--out, taken by this prepare: where to start, and what to remove if it fails."""

    out: pathlib.Path
    progress: dict[str, Any] | None  # An interrupted prepare's state to resume, else None.
    # The folders this prepare created: --out, then its missing parents (innermost first).
    made: list[pathlib.Path] = dataclasses.field(default_factory=list)
    was_empty: bool = False  # --out existed and was empty before this prepare.

    def roll_back(self) -> None:
        """Removes what this prepare wrote in --out (only its own files: others may have
        appeared there since) and the folders it created if they are left empty: a parent may
        meanwhile hold someone else's files, and those stay."""
        if not (self.made or self.was_empty):
            return
        try:  # The cleanup never replaces the error that caused it.
            for path in self.out.iterdir():
                if _OURS.fullmatch(path.name) and (path.is_file() or path.is_symlink()):
                    path.unlink(missing_ok=True)
        except OSError:
            pass
        cli.remove_empty(self.made)  # Not one holding someone else's files.


def _listing(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")


def _check_out(out: pathlib.Path, src: sources.Source) -> None:
    """Refuses an --out inside a folder --source reads: its files would join the source (and
    change its fingerprint, so the next run would not find its own folder up to date)."""
    if not isinstance(src, sources.FileSource):
        return
    root = pathlib.Path(src.spec).expanduser()
    if root.is_dir() and out.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"--out={str(out)!r} is inside --source={src.spec!r}, whose every file "
                         "is read as text; choose an --out outside the source folder.")


def _claim(out: pathlib.Path, fingerprint: str) -> _Claim:
    """Takes `out` for the prepare of `fingerprint` (whose up-to-date folder, if any, was already
    reused): creates it, or finds it empty, or finds this prepare interrupted (resume) or damaged
    (rebuilt). Raises ValueError, having changed nothing, for any other `out`."""
    if not out.exists():
        made = cli.missing_folders(out)  # Removed again if the prepare fails and they are empty.
        out.mkdir(parents=True)
        return _Claim(out, None, made=made)
    if not out.is_dir():
        raise ValueError(f"--out={str(out)!r} is a file; give a folder (a new one, or a prepared "
                         "folder to reuse or resume).")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return _Claim(out, None, was_empty=True)
    if workdir := [n for n in _WORKDIR_FILES if n in names]:
        raise ValueError(f"--out={str(out)!r} is a training workdir ({', '.join(workdir)}); "
                         "prepare into a new or empty folder (that workdir's tokenizer.json is "
                         "its run's).")
    if other := [n for n in names if not _OURS.fullmatch(n)]:
        raise ValueError(f"--out={str(out)!r} holds other files ({_listing(other)}) and is no "
                         "prepared folder; give a new or empty folder.")
    progress = cli.json_object(out / shards.PROGRESS)
    if progress is not None and progress.get("fingerprint") == fingerprint:
        return _Claim(out, progress)
    meta = shards.read_meta(out)
    fix = f"choose another --out, or delete {out} to prepare it again"
    if meta is not None and meta.get("fingerprint") != fingerprint:
        source = (meta.get("source") or {}).get("description", "?")
        tok = (meta.get("tokenizer") or {}).get("name", "?")
        raise ValueError(f"--out={str(out)!r} already holds data prepared from {source} with the "
                         f"{tok} tokenizer, and this command's source, tokenizer or options "
                         f"differ (preparing would replace it); {fix}.")
    if meta is None and progress is not None:
        raise ValueError(f"--out={str(out)!r} holds an interrupted prepare of another source, "
                         "tokenizer or options; run that command again to resume it, or "
                         f"{fix}.")
    if meta is None:
        raise ValueError(f"--out={str(out)!r} holds prepared-data files ({_listing(names)}) but "
                         f"no readable meta.json or progress.json; {fix}.")
    # This prepare's own folder with a shard missing or truncated: the same data, rebuilt.
    logging.warning("Preparing %s again: a shard is missing or truncated (same source, "
                    "tokenizer and options).", out)
    (out / shards.META).unlink(missing_ok=True)  # First: no moment looks complete.
    for name in names:
        (out / name).unlink(missing_ok=True)
    return _Claim(out, None, was_empty=True)  # Emptied: what a failure leaves is removed.


def _resume_point(out: pathlib.Path, progress: dict[str, Any], dtype: str) -> None:
    """Keeps progress's leading shards that are intact, deleting any shard file past them (left
    by an interrupted run, or made with another tokenizer)."""
    kept = shards.shards_intact(out, progress["shards"], dtype)
    if kept < len(progress["shards"]):
        logging.warning("Shard %s of %s is missing or truncated: redoing it and those after it.",
                        progress["shards"][kept]["file"], out)
        del progress["shards"][kept:]
    if progress["shards"]:
        logging.info("Resuming %s after %d complete shards.", out, len(progress["shards"]))
    listed = {s["file"] for s in progress["shards"]}
    for path in [*out.glob("tokens_*.bin"), *out.glob(".tokens_*.tmp")]:
        if path.name not in listed:
            path.unlink()


def _learn_tokenizer(src: sources.Source, name: str, vocab_size: int | None, chunk_bytes: int,
                     bpe_sample_bytes: int) -> tokenizers.Tokenizer:
    """Learns tokenizer `name` (char: from the whole source; bpe: from its first
    `bpe_sample_bytes`)."""
    if name == "char":
        logging.info("Collecting the char vocabulary of %s (a full pass).", src.description)
        return tokenizers.build_tokenizer(name, _char_texts(src, chunk_bytes))
    vocab_size = vocab_size or tokenizers.DEFAULT_BPE_VOCAB
    logging.info("Training a bpe tokenizer (vocab %d) on up to the first %.0f MiB of %s.",
                 vocab_size, bpe_sample_bytes / 2**20, src.description)
    start = time.perf_counter()
    args = (src, chunk_bytes, bpe_sample_bytes, vocab_size)
    if src.total_bytes is not None and src.total_bytes <= _TRAIN_HERE_BYTES:
        tok_json = _train_bpe(*args)
    else:
        # Training holds several times its sample in memory and the allocator keeps it
        # afterwards: in a child process, it goes back to the OS before tokenizing starts.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            tok_json = pool.apply(_train_bpe, args)
    tok = tokenizers.BPETokenizer(tok_json)
    logging.info("Trained bpe (vocab %d) in %.1f s.", tok.vocab_size, time.perf_counter() - start)
    return tok


def _train_bpe(src: sources.Source, chunk_bytes: int, sample_bytes: int, vocab_size: int) -> str:
    """The tokenizer.json of a bpe trained on the first `sample_bytes` of `src`."""
    texts = _head(src.pieces(chunk_bytes), sample_bytes)
    return tokenizers.BPETokenizer.train(texts, vocab_size).tokenizer_json


def _char_texts(src: sources.Source, chunk_bytes: int) -> Iterator[str]:
    yield "\n"  # The document separator of tokenizers without an end-of-text token.
    for piece in src.pieces(chunk_bytes):
        yield piece.text


def _head(pieces: Iterable[sources.Piece], max_bytes: int) -> Iterator[str]:
    """The texts of the first pieces, until they reach `max_bytes` source bytes."""
    total = 0
    for piece in pieces:
        yield piece.text
        total += piece.nbytes
        if total >= max_bytes:
            return


def _save_tokenizer(tok: tokenizers.Tokenizer, out: pathlib.Path) -> str:
    """Writes tokenizer.json atomically; returns its sha256."""
    tmp = out / f".{shards.TOKENIZER}.tmp"
    tokenizers.save_tokenizer(tok, tmp)
    os.replace(tmp, out / shards.TOKENIZER)
    return shards.sha256_file(out / shards.TOKENIZER)


def _resumed_tokenizer(out: pathlib.Path, progress: dict[str, Any]) -> tokenizers.Tokenizer | None:
    path = out / shards.TOKENIZER
    if path.is_file() and shards.sha256_file(path) == progress.get("tokenizer_sha256"):
        return tokenizers.load_tokenizer(path)
    return None


def prepare_folder(
    source: str,
    tokenizer: str,
    out: str | pathlib.Path,
    *,
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    num_workers: int | None = None,
    text_field: str = "text",
    split: str = "train",
    shard_tokens: int = SHARD_TOKENS,
    chunk_bytes: int = CHUNK_BYTES,
    bpe_sample_bytes: int = tokenizers.BPE_SAMPLE_BYTES,
    show_progress: bool = True,
) -> shards.PreparedShards:
    """Tokenizes `source` (see sources.py) with `tokenizer` (see tokenizers.py) into the prepared
    folder `out`, resuming an interrupted run and reusing an up-to-date folder; returns it opened.

    `num_workers` tokenizing processes (default: one per CPU; 1 tokenizes in this process).
    Raises ValueError or OSError with a one-line message; what `out` may be, and what a failure
    leaves there: the module doc.
    """
    tokenizers.check_name(tokenizer)
    if vocab_size is not None:
        if tokenizer != "bpe":
            raise ValueError(f"--vocab_size applies only to --tokenizer=bpe; the {tokenizer} "
                             "tokenizer's vocabulary is fixed or follows the data: drop it.")
        tokenizers.check_bpe_vocab_size(vocab_size)
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction={val_fraction} must be in (0, 1): the last fraction of "
                         "the tokens that validates, e.g. 0.1.")
    if shard_tokens < 1:
        raise ValueError(f"--shard_tokens={shard_tokens} must be ≥ 1, e.g. {SHARD_TOKENS} (the "
                         "default).")
    if bpe_sample_bytes < 1:
        raise ValueError(f"--bpe_sample_mb must be ≥ 1 (the MiB of the source that bpe trains "
                         f"on), e.g. {tokenizers.BPE_SAMPLE_BYTES >> 20} (the default).")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes={chunk_bytes} must be ≥ 1, e.g. {CHUNK_BYTES}.")
    num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    if num_workers < 1:
        raise ValueError(f"--num_workers={num_workers} must be ≥ 1 (1 tokenizes in this "
                         "process).")
    if not str(out).strip():  # "" would be the current folder.
        raise ValueError("--out is empty; give the prepared folder to write.")
    out = pathlib.Path(out).expanduser()
    src = sources.open_source(source, text_field, split)
    _check_out(out, src)

    # A fixed vocabulary is built now: the fingerprint holds it (a changed hf: file is noticed).
    fixed = None if tokenizers.learns_vocab(tokenizer) else tokenizers.build_tokenizer(tokenizer, "")
    options = {"val_fraction": val_fraction, "chunk_bytes": chunk_bytes,
               "shard_tokens": shard_tokens}
    if tokenizer == "bpe":
        options["bpe_sample_bytes"] = bpe_sample_bytes
        options["vocab_size"] = vocab_size or tokenizers.DEFAULT_BPE_VOCAB
    tok_ident = tokenizer if fixed is None else json.dumps(fixed.to_dict(), sort_keys=True)
    fingerprint = _fingerprint({"format": shards.FORMAT, "version": shards.VERSION,
                                "source": src.fingerprint(), "tokenizer": tok_ident,
                                "options": options})

    if meta := shards.complete_meta(out, fingerprint):
        logging.info("Reusing the up-to-date prepared folder %s (%d tokens; same source, "
                     "tokenizer and options).", out, meta["total_tokens"])
        return shards.open_shards(out)

    claim = _claim(out, fingerprint)
    try:
        _prepare_into(claim, src, tokenizer, fixed, fingerprint, options, source,
                      vocab_size=vocab_size, num_workers=num_workers, chunk_bytes=chunk_bytes,
                      shard_tokens=shard_tokens, bpe_sample_bytes=bpe_sample_bytes,
                      show_progress=show_progress)
    except BaseException as e:
        # Bad input (a ValueError: a malformed record, an empty source) makes what was written
        # useless: fixing the source changes its fingerprint. An interruption or an I/O error
        # (a full disk) once progress.json exists leaves a resumable folder: kept.
        if isinstance(e, ValueError) or not (out / shards.PROGRESS).is_file():
            claim.roll_back()
        elif not isinstance(e, KeyboardInterrupt):  # The CLI says so itself on an interruption.
            logging.warning("Kept the %d complete shard(s) in %s: run the same command again to "
                            "resume.", len((cli.json_object(out / shards.PROGRESS) or {})
                                            .get("shards", [])), out)
        raise
    return shards.open_shards(out)


def _prepare_into(claim: _Claim, src: sources.Source, tokenizer: str,
                  fixed: tokenizers.Tokenizer | None, fingerprint: str, options: dict[str, Any],
                  source: str, *, vocab_size: int | None, num_workers: int, chunk_bytes: int,
                  shard_tokens: int, bpe_sample_bytes: int, show_progress: bool) -> None:
    """Writes the prepared folder `claim.out`: the tokenizer, the shards and meta.json."""
    out, progress = claim.out, claim.progress
    tok = _resumed_tokenizer(out, progress) if progress else None
    if tok is None:
        tok = fixed or _learn_tokenizer(src, tokenizer, vocab_size, chunk_bytes, bpe_sample_bytes)
        progress = {"fingerprint": fingerprint, "tokenizer_sha256": _save_tokenizer(tok, out),
                    "shards": []}
        shards.write_json_atomic(out / shards.PROGRESS, progress)
    dtype = shards.token_dtype(tok.vocab_size)
    _resume_point(out, progress, dtype)
    separator = (np.array([tok.eot_id]) if tok.eot_id is not None else tok.encode("\n")
                 ).astype(np.int32)
    _stream(src, tok, out, progress, separator, dtype, num_workers, chunk_bytes, shard_tokens,
            show_progress)
    _write_meta(out, progress, {
        "fingerprint": fingerprint,
        "source": {"spec": source, "description": src.description,
                   "fingerprint": src.fingerprint()},
        "tokenizer": {"spec": tokenizer, "name": tok.name, "vocab_size": tok.vocab_size,
                      "eot_id": tok.eot_id, "sha256": progress["tokenizer_sha256"]},
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "separator": separator.tolist(),
        "dtype": dtype,
        "options": options,
    })


def _write_meta(out: pathlib.Path, progress: dict[str, Any], fields: dict[str, Any]) -> None:
    """Writes meta.json, the mark of a complete folder (shards.write_meta), refusing an empty
    source."""
    if not any(s["tokens"] for s in progress["shards"]):
        raise ValueError(f"--source={fields['source']['spec']!r} holds no text; give a "
                         "non-empty source.")
    shards.write_meta(out, progress, fields)


def _stream(src: sources.Source, tok: tokenizers.Tokenizer, out: pathlib.Path,
            progress: dict[str, Any], separator: np.ndarray, dtype: str, num_workers: int,
            chunk_bytes: int, shard_tokens: int, show_progress: bool) -> None:
    """Tokenizes the chunks after those `progress` covers into shards, with a progress bar."""
    done = progress["shards"][-1]["chunks_end"] if progress["shards"] else 0
    skipped = {"chunks": 0, "bytes": 0}

    def todo() -> Iterator[list[sources.Piece]]:
        for chunk in _chunks(src.pieces(chunk_bytes), chunk_bytes):
            if skipped["chunks"] < done:  # Read past what complete shards already hold.
                skipped["chunks"] += 1
                skipped["bytes"] += sum(p.nbytes for p in chunk)
                continue
            yield chunk

    if src.total_bytes is not None:  # No more workers than whole chunks: each costs a start.
        num_workers = min(num_workers, max(1, src.total_bytes // chunk_bytes))
    writer = shards.ShardWriter(out, progress, dtype, shard_tokens)
    encode = functools.partial(encode_chunk, tok, separator, dtype)
    # The postfix carries the rates (MB/s of source text, tokens/s), so tqdm's own rate is left out.
    layout = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}"
              if src.total_bytes else "{desc}: {n_fmt}B [{elapsed}") + "{postfix}]"
    bar = tqdm.tqdm(total=src.total_bytes, unit="B", unit_scale=True, desc="tokenizing",
                    disable=not show_progress, mininterval=0.5, bar_format=layout)
    start, nbytes, ntokens, index = time.perf_counter(), 0, 0, done
    try:
        for chunk, tokens in _encoded(todo(), encode, num_workers, (tok.to_dict(), separator, dtype)):
            index += 1
            size = sum(p.nbytes for p in chunk)
            writer.write(tokens, sum(p.doc_end for p in chunk), size, index)
            nbytes, ntokens = nbytes + size, ntokens + len(tokens)
            if bar.n == 0 and skipped["bytes"]:
                bar.update(skipped["bytes"])
            bar.update(size)
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{nbytes / 1e6 / elapsed:.2f} MB/s, "
                                f"{ntokens / elapsed / 1e3:.0f}k tokens/s", refresh=False)
        writer.flush()
    finally:
        writer.abandon()
        bar.close()
    elapsed = time.perf_counter() - start
    logging.info("Tokenized %.1f MB into %d tokens in %.1f s with %d worker(s): %.2f MB/s, "
                 "%.0f tokens/s.", nbytes / 1e6, ntokens, elapsed, max(num_workers, 1),
                 nbytes / 1e6 / max(elapsed, 1e-9), ntokens / max(elapsed, 1e-9))
