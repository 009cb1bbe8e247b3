"""Tokenizers: text ⇄ int32 token ids, serialisable to JSON so a workdir can decode samples.

Both tokenizers are vectorised with numpy: the offline corpora are ~12 MB, and a Python loop per
character would make preparing them take tens of seconds.
"""

import json
import pathlib
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

TOKENIZERS = ("byte", "char")


class Tokenizer(Protocol):
    """What the data pipeline, trainer and sampler need from a tokenizer."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """Returns the token ids of `text` as a 1-D int32 array."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of the token ids `ids`."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable description, including "name"."""
        ...


def _code_points(text: str) -> np.ndarray:
    """Returns the Unicode code points of `text` as uint32, without a Python loop."""
    # UTF-32-LE without a BOM is exactly one little-endian uint32 per code point.
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def _as_ids(ids: Sequence[int] | np.ndarray, vocab_size: int, name: str) -> np.ndarray:
    """Returns `ids` as a 1-D int64 array, checked to lie in [0, vocab_size)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0]
        # A padded model vocab (model.vocab_multiple) can emit ids the tokenizer never made.
        raise ValueError(
            f"token id {bad} is outside the {name} tokenizer's vocab of {vocab_size}; "
            "mask padded vocab entries out before sampling."
        )
    return ids


class ByteTokenizer:
    """UTF-8 bytes as tokens: a fixed vocab of 256 that can encode any text."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """Returns the UTF-8 bytes of `text` as int32 ids."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of byte ids; sampled byte runs may be invalid UTF-8, so replace."""
        ids = _as_ids(ids, self.vocab_size, self.name)
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        """Returns {"name": "byte"}: the vocab is fixed, so nothing else is needed."""
        return {"name": self.name}


class CharTokenizer:
    """One token per distinct character of the training corpus, in sorted order (nanoGPT's)."""

    name = "char"

    def __init__(self, chars: str):
        """Builds the tokenizer from its vocab: distinct characters in sorted order."""
        codes = _code_points(chars)
        if codes.size == 0:
            raise ValueError("the char tokenizer needs a non-empty vocab (an empty corpus?)")
        if np.any(np.diff(codes.astype(np.int64)) <= 0):
            raise ValueError("char vocab must be distinct characters in sorted order")
        self.chars = chars
        self.vocab_size = len(chars)
        # Code point → id lookup table; -1 marks characters outside the vocab.
        self._table = np.full(int(codes[-1]) + 1, -1, dtype=np.int32)
        self._table[codes] = np.arange(len(codes), dtype=np.int32)
        self._id_to_char = np.array(list(chars), dtype=object)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """Returns a tokenizer whose vocab is the sorted distinct characters of `text`."""
        # bincount is O(n) where np.unique sorts; on intp it avoids a slow safe-cast path.
        codes = np.flatnonzero(np.bincount(_code_points(text).astype(np.intp)))
        return cls(codes.astype("<u4").tobytes().decode("utf-32-le"))

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of the characters of `text`; unknown characters raise ValueError."""
        codes = _code_points(text)
        # Code points past the table's end are unknown too: clip them onto a -1 entry.
        ids = self._table[np.minimum(codes, self._table.size - 1)]
        ids[codes >= self._table.size] = -1
        unknown = np.flatnonzero(ids < 0)
        if unknown.size:
            char = chr(int(codes[unknown[0]]))
            raise ValueError(
                f"character {char!r} (U+{ord(char):04X}) is not in the char tokenizer's vocab of "
                f"{self.vocab_size}; the char vocab comes from the training corpus, so use only "
                "characters that occur in it (or the byte tokenizer)."
            )
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of char ids."""
        ids = _as_ids(ids, self.vocab_size, self.name)
        return "".join(self._id_to_char[ids])

    def to_dict(self) -> dict[str, Any]:
        """Returns {"name": "char", "chars": vocab in id order}."""
        return {"name": self.name, "chars": self.chars}


def build_tokenizer(name: str, text: str) -> Tokenizer:
    """Returns the tokenizer `name`; vocabularies learned from data are learned from `text`."""
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        return CharTokenizer.from_text(text)
    raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZERS)}")


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Returns the tokenizer described by `d` (the output of `Tokenizer.to_dict`)."""
    name = d.get("name")
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        return CharTokenizer(d["chars"])
    raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZERS)}")


def save_tokenizer(tok: Tokenizer, path: str | pathlib.Path) -> None:
    """Writes `tok` as JSON to `path`."""
    pathlib.Path(path).write_text(json.dumps(tok.to_dict(), ensure_ascii=False), encoding="utf-8")


def load_tokenizer(path: str | pathlib.Path) -> Tokenizer:
    """Reads a tokenizer written by `save_tokenizer`."""
    return tokenizer_from_dict(json.loads(pathlib.Path(path).read_text(encoding="utf-8")))
