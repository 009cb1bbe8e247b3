"""Loss, perplexity and bits per byte of a trained model on held-out text.

What is read (`read_splits`):
- nothing given: the run's own validation split, read as training reads it (the same prepared
  folder), so the loss equals training's final `full` val loss bitwise;
- a prepared folder (meta.json, from `gpt_jax.data.prepare`): its train and val splits; its
  tokenizer must be the run's;
- a text file or a folder of text files (read as training reads data.path: files in sorted
  order, joined by newlines): encoded with the run's tokenizer and split as training splits a
  corpus (the first 1 − data.val_fraction of the tokens train, nanoGPT's split);
- a .jsonl file: the `text_field` of each line, one document each, joined by the tokenizer's
  end-of-text token if it has one, else by a newline; split likewise.

Scoring (`evaluate_split`) is the standard sliding-window protocol: windows of seq_len + 1
tokens every `stride` tokens, each token predicted once, after the first window with at least
seq_len − stride tokens of context (scoring.text_batches), summed by training's own eval step.
Bits per byte divide the summed loss by ln 2 and by the split's UTF-8 bytes (the decoded tokens),
so byte, character and BPE models compare.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np

from gpt_jax.data import corpora, pipeline, sft, shards, tokenizers, training_data
from gpt_jax.data.pipeline import TokenStream
from gpt_jax.eval import scoring
from gpt_jax.eval.loaded import EvalError, LoadedRun
from gpt_jax.parallel import sharding
from gpt_jax.training import build, loop

SPLITS = ("all", "train", "val")  # --split: all = both splits' rows and their total.


@dataclasses.dataclass(frozen=True)
class TextSplit:
    """One split's token ids and the UTF-8 bytes of the text they encode."""

    name: str
    tokens: np.ndarray | TokenStream  # A prepared split stays on disk (memory-mapped).
    num_bytes: int


def _num_bytes(tokenizer: tokenizers.Tokenizer, tokens: np.ndarray | TokenStream,
               chunk: int = 1 << 20) -> int:
    """UTF-8 bytes of the text the tokens encode, a chunk at a time (a split can be billions of
    tokens; a BPE character cut at a chunk's edge can miscount by a few bytes per chunk).
    End-of-text tokens separate documents: they are no text, and count no bytes."""
    tokens = pipeline.as_stream(tokens)
    total = 0
    for i in range(0, len(tokens), chunk):
        ids = np.asarray(tokens.read(i, i + chunk))
        if tokenizer.eot_id is not None:
            ids = ids[ids != tokenizer.eot_id]
        total += len(tokenizer.decode(ids).encode("utf-8"))
    return total


def _jsonl_documents(path: pathlib.Path, text_field: str) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)[text_field]
            except (ValueError, KeyError, TypeError) as e:
                raise EvalError(f"{path}:{n}: not a JSON object with a {text_field!r} field "
                                f"({type(e).__name__}); fix the line or pass --text_field.") from e
            if not isinstance(doc, str):
                raise EvalError(f"{path}:{n}: {text_field!r} is a {type(doc).__name__}, not "
                                "text; fix the line or pass --text_field.")
            docs.append(doc)
    if not docs:
        raise EvalError(f"{path} holds no documents; give a file with JSON lines.")
    return docs


def _encode(tokenizer: tokenizers.Tokenizer, text: str, data: str) -> np.ndarray:
    try:
        return tokenizer.encode(text)
    except ValueError as e:
        raise EvalError(f"--data={data}: the run's {tokenizer.name} tokenizer cannot encode it "
                        f"({e}); give text in the run's alphabet.") from e


def _tokens(tokenizer: tokenizers.Tokenizer, path: pathlib.Path, data: str, text_field: str
            ) -> np.ndarray:
    """The token stream of a text file or folder, or of a .jsonl file's documents: each
    encoded apart and separated by the end-of-text token, as the prepare step does (a newline
    for a tokenizer without one)."""
    if path.suffix == ".jsonl" and path.is_file():
        docs = [_encode(tokenizer, d, data) for d in _jsonl_documents(path, text_field)]
        sep = (np.array([tokenizer.eot_id]) if tokenizer.eot_id is not None
               else _encode(tokenizer, "\n", data))
        parts = [docs[0]]
        for doc in docs[1:]:
            parts += [sep.astype(doc.dtype), doc]
        return np.concatenate(parts)
    try:
        text = corpora.load_corpus(None, str(path), "").text
    except (OSError, ValueError) as e:
        raise EvalError(str(e).replace("data.path", "--data").replace(
            "set --config.--data", "give --data")) from e
    return _encode(tokenizer, text, data)


def read_splits(loaded: LoadedRun, data: str | None, split: str, text_field: str = "text"
                ) -> list[TextSplit]:
    """The splits (train, val, or both for `all`) of `data` as the module docstring says."""
    if split not in SPLITS:
        raise EvalError(f"--split={split!r}: use one of {', '.join(SPLITS)}.")
    tok = loaded.tokenizer
    names = ("train", "val") if split == "all" else (split,)
    if data is None:  # The run's own data, as training prepared it.
        try:
            d = build.load_data(loaded.config)
        except ValueError as e:
            raise EvalError(f"the run's own data cannot be read ({e}); give --data.") from e
        if isinstance(d, sft.SftData):  # Examples, not a token stream: no windows to slide.
            raise EvalError(f"the run fine-tuned on the SFT folder {d.folder}, whose val split "
                            "is examples, not text (training logged its val/loss); score them "
                            f"with --task={d.task_file}, or give --data.")
        streams = {"train": d.train[0], "val": d.val}
        return [TextSplit(n, streams[n], _num_bytes(tok, streams[n])) for n in names]
    path = pathlib.Path(data).expanduser()
    if path.is_dir() and shards.read_meta(path) is not None:
        opened = training_data.open_folders([str(path)], None)
        if opened.tokenizer.to_dict() != tok.to_dict():
            raise EvalError(f"--data={data} was prepared with another tokenizer "
                            f"({opened.tokenizer.name}, vocab {opened.tokenizer.vocab_size}) than "
                            f"the run's ({tok.name}, vocab {tok.vocab_size}); prepare it with the "
                            "run's tokenizer.")
        streams = {"train": opened.train[0], "val": opened.val}
        return [TextSplit(n, streams[n], _num_bytes(tok, streams[n])) for n in names]
    ids = _tokens(tok, path, data, text_field)
    num_train = int(len(ids) * (1 - loaded.config.data.val_fraction))  # As shards.py splits.
    parts = {"train": ids[:num_train], "val": ids[num_train:]}
    return [TextSplit(n, parts[n], _num_bytes(tok, parts[n])) for n in names]


def evaluate_split(loaded: LoadedRun, split: TextSplit, stride: int | None = None) -> dict:
    """{"split", "loss", "ppl", "bits_per_byte", "tokens", "bytes"} of one split: the mean loss
    over its predicted tokens (all but the first), windows of the loaded seq_len every `stride`
    tokens (None: seq_len, non-overlapping)."""
    r = loaded.run
    seq_len, batch_size = r.config.data.seq_len, r.config.train.batch_size
    if stride is not None and not 0 < stride <= seq_len:
        raise EvalError(f"--stride={stride}: give 1 to --seq_len ({seq_len}).")
    if len(split.tokens) < 2:
        raise EvalError(f"the {split.name} split has {len(split.tokens)} token(s); a loss needs "
                        "at least 2.")
    eot_id = loaded.tokenizer.eot_id if r.config.data.document_mask else None
    batch_sh = build.batch_sharding(r)
    with sharding.activation_context(r.mesh, r.rules):
        _, eval_step = build.compile_steps(r, eot_id)
        batches = scoring.text_batches(split.tokens, seq_len, batch_size, stride)
        m = loop.evaluate(eval_step, loaded.params, (
            {k: sharding.put_replicated_host(v, batch_sh) for k, v in b.items()}
            for b in batches))
    loss, count = m["val/loss"], m["val/tokens"]
    return {"split": split.name, "loss": loss, "ppl": m["val/ppl"],
            "bits_per_byte": scoring.bits_per_byte(loss * count, split.num_bytes),
            "tokens": count, "bytes": split.num_bytes}


def total_row(rows: list[dict]) -> dict:
    """The token-weighted total of several splits' rows (their windows are scored apart)."""
    tokens = sum(r["tokens"] for r in rows)
    nats = sum(r["loss"] * r["tokens"] for r in rows)
    num_bytes = sum(r["bytes"] for r in rows)
    loss = nats / tokens
    return {"split": "all", "loss": loss, "ppl": math.exp(min(loss, 80.0)),
            "bits_per_byte": scoring.bits_per_byte(nats, num_bytes), "tokens": tokens,
            "bytes": num_bytes}
