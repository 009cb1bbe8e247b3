"""The run's data: its tokenizer, the train split of one dataset or of a weighted mixture of
several, and the validation split it reports.

Every run reads prepared folders (shards.py's format) through `open_folders`: one made in
process from data.corpus / data.path (`prepare.prepare` returns it), or one or more made by the
prepare CLI (data.prepared). A mixture's folders must share one tokenizer (token ids mean the
same thing in each); val/loss is the first folder's val split.
"""

import dataclasses
import pathlib
from collections.abc import Sequence

from absl import logging

from gpt_jax.data import shards, tokenizers
from gpt_jax.data.pipeline import TokenStream

# Vocabularies fixed by the tokenizer's name, known without data (tools that only compile).
FIXED_VOCAB_SIZES = {"byte": tokenizers.ByteTokenizer.vocab_size, "gpt2": tokenizers.GPT2_VOCAB_SIZE}


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """What training reads: token streams (memmaps) and the tokenizer that made them."""

    tokenizer: tokenizers.Tokenizer
    names: list[str]  # One per dataset, for logs.
    train: list[TokenStream]  # One per dataset: several only for a mixture.
    weights: list[float] | None  # Normalised mixture weights, one per dataset; None for one.
    val: TokenStream  # The first dataset's val split.

    @property
    def eot_id(self) -> int | None:
        """The end-of-text id that ends documents (None for byte/char: no boundaries)."""
        return self.tokenizer.eot_id

    def train_tokens(self) -> TokenStream | list[TokenStream]:
        """pipeline.train_dataset's `tokens`: the one stream, or with `weights` one per dataset."""
        return self.train if self.weights is not None else self.train[0]

    def val_tokens(self) -> TokenStream:
        """The validation split evaluated (the first dataset's)."""
        return self.val


def open_folders(folders: Sequence[str], weights: Sequence[float] | None, *,
                 verify: bool = False) -> TrainingData:
    """Opens the prepared folders `folders` (data.prepared, or the one prepare.prepare returns)
    as one dataset or, if several, a mixture weighted by `weights` (None: proportional to their
    train tokens). Every shard's size is checked; with `verify` (data.verify_shards) also its
    sha256 against meta.json, which reads all the data once.

    Raises ValueError (or FileNotFoundError) with a one-line message naming the fix.
    """
    paths = [pathlib.Path(f).expanduser() for f in folders]
    if verify:
        for path in paths:
            shards.verify(path)
    opened = [shards.open_shards(path) for path in paths]
    first = opened[0]
    for folder, p in zip(folders[1:], opened[1:], strict=True):
        if p.tokenizer.to_dict() != first.tokenizer.to_dict():
            raise ValueError(
                f"data.prepared folders {folders[0]!r} ({_describe(first)}) and {folder!r} "
                f"({_describe(p)}) have different tokenizers; prepare every dataset of a "
                "mixture with the same tokenizer (e.g. --tokenizer=gpt2).")
    for folder, p in zip(folders, opened, strict=True):
        if not p.num_train_tokens:
            raise ValueError(f"the prepared data in {folder!r} has no train tokens; use a bigger "
                             "corpus or a lower val fraction (data.val_fraction, or the prepare "
                             "command's --val_fraction).")
    if weights is not None and len(weights) != len(folders):
        raise ValueError(f"data.mixture_weights has {len(weights)} weight(s) for {len(folders)} "
                         "data.prepared folder(s); give one weight per folder.")
    sizes = [p.num_train_tokens for p in opened]
    raw = list(weights) if weights is not None else sizes
    normalised = [w / sum(raw) for w in raw] if len(folders) > 1 else None
    data = TrainingData(first.tokenizer, list(folders), [TokenStream(p.train) for p in opened],
                        normalised, TokenStream(first.val))
    if normalised is None:
        logging.info("data: prepared folder %s: %s train and %s val tokens in %d shard(s); "
                     "tokenizer %s.", folders[0], f"{sizes[0]:,}", f"{first.num_val_tokens:,}",
                     data.train[0].num_parts, _describe(first))
    else:
        parts = ", ".join(f"{f} (weight {w:.3f}, {n:,} train tokens)"
                          for f, w, n in zip(folders, normalised, sizes, strict=True))
        logging.info("data: mixture of %d prepared folders: %s; val/loss on %s (%s tokens); "
                     "tokenizer %s.", len(folders), parts, folders[0],
                     f"{first.num_val_tokens:,}", _describe(first))
    return data


def _describe(p: shards.PreparedShards) -> str:
    eot = "no end-of-text" if p.eot_id is None else f"end-of-text {p.eot_id}"
    return f"{p.tokenizer.name}, vocab {p.tokenizer.vocab_size:,}, {eot}"


def prepared_vocab_size(folder: str) -> int | None:
    """The vocabulary size of the prepared folder `folder` from its meta.json alone (no token
    file opened), or None if it cannot be read."""
    from gpt_jax.data import pairs, sft  # Pairs and SFT folders record the model's vocab too.

    path = pathlib.Path(folder).expanduser()
    meta = shards.read_meta(path) or pairs.read_meta(path) or sft.read_meta(path)
    return None if meta is None else int(meta["vocab_size"])
