"""Tokenizers: text ⇄ int32 token ids, serialisable to JSON so a workdir can decode samples.

- `byte`: UTF-8 bytes, vocab 256.
- `char`: the sorted distinct characters of the training corpus (nanoGPT's shakespeare_char).
- `bpe`: byte-level BPE (GPT-2's scheme) trained locally with Hugging Face `tokenizers`, with an
  `<|endoftext|>` special token (id 0). Training is deterministic: the same texts and vocab size
  give the same tokenizer.json, whatever the thread count. Encoding runs on tiktoken's BPE
  built from the trained vocabulary, ~15× faster than `tokenizers`' own encoder; the two merge
  by slightly different rules (tiktoken ranks the merged token, HF the merged pair), so they
  may segment a rare word differently, but both decode to the same text, and one tokenizer
  always encodes the same way.
- `gpt2`: tiktoken's GPT-2 encoding (vocab 50257, `<|endoftext|>` = 50256). tiktoken downloads
  its BPE files once into a cache; offline, point TIKTOKEN_CACHE_DIR at a folder holding them.
- `hf:PATH`: any Hugging Face tokenizer.json, encoded with `tokenizers` (no special tokens
  added). Its end-of-text token is the first of `_EOT_NAMES` that it has, if any.

`byte` and `char` are vectorised with numpy: the offline corpora are ~12 MB, and a Python loop
per character would make preparing them take tens of seconds. Every tokenizer's `to_dict` holds
what rebuilds it offline (for `bpe` and `hf:` the whole tokenizer.json), except `gpt2`, which
needs tiktoken's cache as when it was made.
"""

import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import tiktoken
import tokenizers as hf

# The names build_tokenizer takes; a Hugging Face tokenizer.json is named "hf:PATH".
TOKENIZERS = ("byte", "char", "bpe", "gpt2")
HF_PREFIX = "hf:"
EOT = "<|endoftext|>"
DEFAULT_BPE_VOCAB = 4096  # 1 MB of text → 4096 tokens trains in well under a second.
# BPE trains on at most this much text (the first N bytes of the corpus): training time and
# memory grow with the text, while the merges of a large corpus settle long before its end.
BPE_SAMPLE_BYTES = 64 << 20
# End-of-text names, most specific first, for tokenizer.json files from elsewhere.
_EOT_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>")
# GPT-2's pre-tokenizer regex: tiktoken's r50k pattern, the split HF's ByteLevel(use_regex) makes.
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_VOCAB_SIZE = 50257  # OpenAI's BPE; its last id, 50256, is <|endoftext|>.


class Tokenizer(Protocol):
    """What the data pipeline, trainer and sampler need from a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int | None  # The end-of-text token that separates documents, if the vocab has one.

    def encode(self, text: str) -> np.ndarray:
        """Returns the token ids of `text` as a 1-D int32 array (special tokens are plain text)."""
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
    eot_id = None

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
    eot_id = None

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
        return cls.from_texts([text])

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
        """Returns a tokenizer whose vocab is the sorted distinct characters of all `texts`."""
        seen = np.zeros(0, dtype=bool)
        for text in texts:
            # bincount is O(n) where np.unique sorts; on intp it avoids a slow safe-cast path.
            counts = np.bincount(_code_points(text).astype(np.intp))
            if counts.size > seen.size:
                seen = np.pad(seen, (0, counts.size - seen.size))
            seen[: counts.size] |= counts > 0
        return cls(np.flatnonzero(seen).astype("<u4").tobytes().decode("utf-32-le"))

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


class _TiktokenTokenizer:
    """Encoding and decoding shared by the tokenizers that run on a tiktoken.Encoding."""

    name: str

    def __init__(self, encoding: tiktoken.Encoding, vocab_size: int, eot_id: int | None):
        self._encoding = encoding
        self.vocab_size = vocab_size
        self.eot_id = eot_id

    def encode(self, text: str) -> np.ndarray:
        """Returns the token ids of `text`; "<|endoftext|>" inside `text` is ordinary text."""
        # encode_ordinary: a document quoting the special token must not end itself early.
        return np.asarray(self._encoding.encode_ordinary(text), dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of `ids`; a sampled id run may cut a UTF-8 character, so replace."""
        ids = _as_ids(ids, self.vocab_size, self.name)
        return self._encoding.decode_bytes(ids.tolist()).decode("utf-8", errors="replace")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (HF ByteLevel vocab entries) → byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + i) for i, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


class BPETokenizer(_TiktokenTokenizer):
    """Byte-level BPE trained locally with HF `tokenizers`, encoded by tiktoken (module doc)."""

    name = "bpe"

    def __init__(self, tokenizer_json: str):
        """Builds the tokenizer from the tokenizer.json that `train` made."""
        spec = json.loads(tokenizer_json)
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
            raise ValueError("a bpe tokenizer needs a byte-level BPE tokenizer.json; load other "
                             "Hugging Face tokenizers with --tokenizer=hf:PATH.")
        self.tokenizer_json = tokenizer_json
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t["special"]}
        to_byte = _byte_level_alphabet()
        ranks = {bytes(to_byte[c] for c in token): i for token, i in model["vocab"].items()
                 if token not in specials}
        encoding = tiktoken.Encoding("gpt_jax_bpe", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=specials)
        super().__init__(encoding, len(ranks) + len(specials), specials.get(EOT))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Trains a byte-level BPE of at most `vocab_size` tokens (fewer if `texts` run out of
        pairs to merge): EOT is id 0, the 256 bytes ids 1-256, then merges in order."""
        check_bpe_vocab_size(vocab_size)
        tok = hf.Tokenizer(hf.models.BPE())
        tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = hf.decoders.ByteLevel()
        trainer = hf.trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
            # Every byte in the vocab, whatever the sample holds: any text stays encodable.
            initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return cls(tok.to_str())

    def to_dict(self) -> dict[str, Any]:
        """Returns {"name": "bpe", "tokenizer_json": the HF tokenizer.json as a string}."""
        return {"name": self.name, "tokenizer_json": self.tokenizer_json}


class GPT2Tokenizer(_TiktokenTokenizer):
    """tiktoken's GPT-2 encoding: needs its BPE files online or in TIKTOKEN_CACHE_DIR."""

    name = "gpt2"

    def __init__(self):
        """Loads tiktoken's "gpt2" encoding; offline without its cached files, a ValueError."""
        try:
            encoding = tiktoken.get_encoding("gpt2")
        except (OSError, ValueError) as e:  # requests' errors are OSErrors.
            raise ValueError(
                f"the gpt2 tokenizer needs tiktoken's GPT-2 BPE files, which could not be loaded "
                f"({type(e).__name__}); run once with network access, or set TIKTOKEN_CACHE_DIR "
                "to a folder holding tiktoken's cached gpt2 files (vocab.bpe and encoder.json "
                "saved under the sha1 of their URLs), or use --tokenizer=bpe."
            ) from e
        super().__init__(encoding, GPT2_VOCAB_SIZE, encoding.eot_token)

    def to_dict(self) -> dict[str, Any]:
        """Returns {"name": "gpt2"}: the vocab is tiktoken's, fixed."""
        return {"name": self.name}


class HFTokenizer:
    """Any Hugging Face tokenizer.json, encoded and decoded by `tokenizers`."""

    name = "hf"

    def __init__(self, tokenizer_json: str):
        """Builds the tokenizer from the contents of a tokenizer.json."""
        self.tokenizer_json = tokenizer_json
        try:
            self._tok = hf.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # The Rust binding raises a bare Exception.
            raise ValueError(f"not a Hugging Face tokenizer.json ({e}); give --tokenizer=hf: the "
                             "tokenizer.json of a Hugging Face tokenizer.") from e
        # Special tokens in a document's text are text, as with encode_ordinary above.
        self._tok.encode_special_tokens = True
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eot_id = next((self._tok.token_to_id(t) for t in _EOT_NAMES
                            if self._tok.token_to_id(t) is not None), None)

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> "HFTokenizer":
        """Reads a tokenizer.json file."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist; give "
                                    "--tokenizer=hf:PATH the path of a Hugging Face tokenizer.json.")
        return cls(path.read_text(encoding="utf-8"))

    def encode(self, text: str) -> np.ndarray:
        """Returns the token ids of `text`, without the post-processor's BOS/EOS/CLS additions."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of `ids`, special tokens included."""
        ids = _as_ids(ids, self.vocab_size, self.name)
        return self._tok.decode(ids.tolist(), skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        """Returns {"name": "hf", "tokenizer_json": the tokenizer.json as a string}."""
        return {"name": self.name, "tokenizer_json": self.tokenizer_json}


def decode_known(tokenizer: Tokenizer, ids: list[int]) -> tuple[str, int]:
    """(text, count) of `ids` with each id the tokenizer lacks shown as U+FFFD, and how many
    there were. A model's vocab may exceed its tokenizer's (model.vocab_size set above it, or an
    imported model with spare embedding rows); training gives those ids almost no probability,
    but sampling can still draw one, and that is no reason to lose the sample."""
    pieces, known, unknown = [], [], 0
    for i in ids:
        if i < tokenizer.vocab_size:
            known.append(i)
            continue
        pieces.append(tokenizer.decode(known) + "\ufffd")
        known, unknown = [], unknown + 1
    return "".join(pieces) + tokenizer.decode(known), unknown


def check_name(name: str) -> None:
    """Raises ValueError unless `name` is one of TOKENIZERS or "hf:PATH"."""
    if name not in TOKENIZERS and not (name.startswith(HF_PREFIX) and len(name) > len(HF_PREFIX)):
        raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZERS)}, "
                         f"or {HF_PREFIX}PATH for a Hugging Face tokenizer.json")


def check_bpe_vocab_size(vocab_size: int) -> None:
    """Raises ValueError unless bpe can have `vocab_size` tokens: the 256 bytes and end-of-text
    at least, ids that fit prepared shards' widest dtype (uint32) at most. Callers check it
    before any work, so a bad size costs no folder and no training pass."""
    if not 257 <= vocab_size < 1 << 32:
        raise ValueError(f"a bpe vocab_size of {vocab_size} is out of range: it needs 256 byte "
                         "tokens + 1 end-of-text token, and ids that fit in uint32, so use "
                         f"≥ 257 and < 2**32 (e.g. {DEFAULT_BPE_VOCAB}).")


def learns_vocab(name: str) -> bool:
    """Whether tokenizer `name` learns its vocabulary from the corpus (char, bpe)."""
    return name in ("char", "bpe")


def build_tokenizer(name: str, text: str | Iterable[str], vocab_size: int | None = None
                    ) -> Tokenizer:
    """Returns the tokenizer `name`; vocabularies learned from data are learned from `text` (one
    string, or an iterable of documents, read once and only for char and bpe). `vocab_size` is
    bpe's (default DEFAULT_BPE_VOCAB); the other vocabularies are fixed or follow the data."""
    check_name(name)
    if vocab_size is not None and name != "bpe":
        raise ValueError(f"a vocab size ({vocab_size}) applies only to the bpe tokenizer: the "
                         f"{name} tokenizer's vocabulary is fixed or follows the data; drop it.")
    texts = [text] if isinstance(text, str) else text
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        return CharTokenizer.from_texts(texts)
    if name == "bpe":
        return BPETokenizer.train(texts, vocab_size or DEFAULT_BPE_VOCAB)
    if name == "gpt2":
        return GPT2Tokenizer()
    return HFTokenizer.from_file(name.removeprefix(HF_PREFIX))


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Returns the tokenizer described by `d` (the output of `Tokenizer.to_dict`)."""
    name = d.get("name")
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        return CharTokenizer(d["chars"])
    if name == "bpe":
        return BPETokenizer(d["tokenizer_json"])
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "hf":
        return HFTokenizer(d["tokenizer_json"])
    raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZERS)}, hf")


def save_tokenizer(tok: Tokenizer, path: str | pathlib.Path) -> None:
    """Writes `tok` as JSON to `path`, atomically: other processes of a run read the file while
    process 0 writes it, and must see the old or the new content, never an empty file."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(tok.to_dict(), ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def load_tokenizer(path: str | pathlib.Path) -> Tokenizer:
    """Reads a tokenizer written by `save_tokenizer`."""
    return tokenizer_from_dict(json.loads(pathlib.Path(path).read_text(encoding="utf-8")))
