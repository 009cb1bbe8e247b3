"""Text sources for the prepare CLI, streamed as bounded pieces of documents.

`--source` is one of:
- a text file: one document;
- a folder (every file beneath it, in sorted relative-path order) or a glob (`'data/*.txt'`,
  `**` recursive; matches in sorted order): each file one document, except that
- a `.jsonl` file holds one document per line, the string under `text_field`;
- `hf:NAME[:CONFIG]`: a Hugging Face dataset, streamed (needs the optional `datasets` package
  and network access to the Hub), one document per example's `text_field`.

A text file is yielded as pieces of at most `max_bytes` UTF-8 bytes, so memory stays bounded
whatever the file sizes (a JSONL record or dataset example is one piece: it is read whole
anyway). A long document is cut after a newline that is followed by printable ASCII: byte-level
BPE never merges across such a point (GPT-2's pre-tokenizer splits there), so encoding the pieces
one by one gives the same tokens as encoding the whole document. Empty documents are dropped.
"""

import codecs
import dataclasses
import glob
import hashlib
import importlib.util
import json
import pathlib
from collections.abc import Iterator
from typing import Any

from absl import logging

HF_PREFIX = "hf:"
_GLOB_CHARS = frozenset("*?[")
_VALIDATE_BLOCK = 16 << 20


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of a document's text; `doc_end` marks its last piece; `nbytes` is how many bytes of
    the source it consumed (for progress: a JSONL line counts whole)."""

    text: str
    doc_end: bool
    nbytes: int


def _cut(buf: bytes) -> int:
    """Returns where to cut `buf` (a full block of a longer document): after its last newline
    between printable non-space ASCII characters, else after its last newline, else at its last
    UTF-8 character boundary. Never 0, so every cut makes progress."""
    # Search the second half only: an indented block with no such newline would cost a Python
    # loop over every line; a cut at or past the middle keeps pieces at least half full.
    start, end = len(buf) // 2, len(buf) - 1
    while (i := buf.rfind(b"\n", start, end)) > 0:
        # Printable non-space ASCII on both sides: whitespace runs ("\n\n", "  \n") would
        # otherwise be split into pre-tokens the whole document does not have.
        if 0x21 <= buf[i + 1] <= 0x7E and 0x21 <= buf[i - 1] <= 0x7E:
            return i + 1
        end = i
    last_newline = buf.rfind(b"\n", 0, len(buf) - 1)
    if last_newline > 0:
        return last_newline + 1
    i = len(buf) - 1
    while i > 0 and buf[i] & 0xC0 == 0x80:  # Back over continuation bytes to a character start.
        i -= 1
    return i if i > 0 else len(buf)


def _is_utf8(path: pathlib.Path) -> bool:
    """Whether the file at `path` is valid UTF-8, read in bounded blocks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            while block := f.read(_VALIDATE_BLOCK):
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _text_pieces(path: pathlib.Path, max_bytes: int, strict: bool) -> Iterator[Piece]:
    """Yields the pieces of the text file `path` as one document. A file that is not UTF-8 raises
    ValueError if `strict` (it was named), else is skipped with a warning (one file of a folder)."""
    size = path.stat().st_size
    if size == 0:
        return
    if size <= max_bytes:  # Most files: one read, one piece.
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            yield Piece(text, True, len(data))
            return
    elif _is_utf8(path):  # Checked first, so that a bad file yields no piece at all.
        yield from _stream_pieces(path, max_bytes)
        return
    if strict:
        raise ValueError(f"{str(path)!r} is not valid UTF-8 text; convert it to UTF-8.")
    logging.warning("Skipping %s: not valid UTF-8.", path)


def _stream_pieces(path: pathlib.Path, max_bytes: int) -> Iterator[Piece]:
    """Yields the UTF-8 file `path` as one document in pieces of at most `max_bytes` bytes."""
    with path.open("rb") as f:
        buf = b""
        while block := f.read(max_bytes - len(buf)):
            buf += block
            if len(buf) < max_bytes:
                continue  # The end of the file: the last piece follows the loop.
            cut = _cut(buf)
            yield Piece(buf[:cut].decode("utf-8"), False, cut)
            buf = buf[cut:]
        yield Piece(buf.decode("utf-8"), True, len(buf))


def _jsonl_pieces(path: pathlib.Path, text_field: str) -> Iterator[Piece]:
    """Yields one piece per non-empty document of the JSON-lines file `path`."""
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"line {number} of {path}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where} is not valid JSON ({e}); fix or remove it.") from e
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{where} has no string field {text_field!r}; name the field "
                                 "that holds the text with --text_field.")
            if text:
                yield Piece(text, True, len(line))


class FileSource:
    """Local files: a text file, a folder or a glob, with .jsonl files read as JSON lines."""

    def __init__(self, spec: str, text_field: str):
        """Finds the files of `spec` (see the module doc); FileNotFoundError if there are none."""
        self.spec, self.text_field = spec, text_field
        path = pathlib.Path(spec).expanduser()
        if _GLOB_CHARS.intersection(spec):
            matches = sorted(pathlib.Path(p) for p in glob.glob(str(path), recursive=True))
            files = [f for m in matches for f in (_folder_files(m) if m.is_dir() else [m])]
            what = f"glob {spec!r}"
        elif path.is_dir():
            files, what = _folder_files(path), f"folder {path.resolve()}"
        elif path.is_file():
            files, what = [path], f"file {path.resolve()}"
        else:
            raise FileNotFoundError(f"--source={spec!r} does not exist; give a text file, a "
                                    "folder, a glob, a .jsonl file or hf:DATASET.")
        if not files:
            raise FileNotFoundError(f"--source={spec!r} matches no files; check the path or glob.")
        self.files = files
        self.strict = len(files) == 1  # A single named file must be text; a folder may hold junk.
        self.description = f"{what} ({len(files)} files)" if len(files) > 1 else what
        self.total_bytes: int | None = sum(f.stat().st_size for f in files)

    def fingerprint(self) -> dict[str, Any]:
        """Identifies the files' current contents by path, size and modification time (cheap;
        hashing a large corpus would cost a full read on every reuse check)."""
        listing = []
        for f in self.files:
            stat = f.stat()
            listing.append((str(f.resolve()), stat.st_size, stat.st_mtime_ns))
        digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        return {"kind": "files", "files": len(self.files), "bytes": self.total_bytes,
                "listing_sha256": digest, "text_field": self.text_field}

    def pieces(self, max_bytes: int) -> Iterator[Piece]:
        """Yields every document's pieces, files in order."""
        for path in self.files:
            if path.suffix == ".jsonl":
                yield from _jsonl_pieces(path, self.text_field)
            else:
                yield from _text_pieces(path, max_bytes, self.strict)


def _folder_files(folder: pathlib.Path) -> list[pathlib.Path]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


class HFDatasetSource:
    """A Hugging Face dataset, streamed: `hf:NAME[:CONFIG]`, one document per example."""

    def __init__(self, spec: str, text_field: str, split: str):
        """Checks that `datasets` is installed; the dataset itself is opened when read."""
        name, _, config = spec.removeprefix(HF_PREFIX).partition(":")
        if not name:
            raise ValueError(f"--source={spec!r} names no dataset; use hf:NAME or hf:NAME:CONFIG.")
        if importlib.util.find_spec("datasets") is None:  # Optional: only this source needs it.
            raise ValueError(f"--source={spec!r} needs the Hugging Face datasets package: "
                             "pip install datasets")
        self.spec, self.name, self.config = spec, name, config or None
        self.text_field, self.split = text_field, split
        self.description = f"Hugging Face dataset {spec} (split {split})"
        self.total_bytes: int | None = None  # Unknown until streamed.

    def fingerprint(self) -> dict[str, Any]:
        """Identifies the dataset by name, config, split and field: a dataset updated on the Hub
        under the same name is not noticed."""
        return {"kind": "hf", "name": self.name, "config": self.config, "split": self.split,
                "text_field": self.text_field}

    def pieces(self, max_bytes: int) -> Iterator[Piece]:
        """Yields one piece per non-empty example (examples are small; `max_bytes` is unused)."""
        del max_bytes
        import datasets

        stream = datasets.load_dataset(self.name, self.config, split=self.split,
                                             streaming=True)
        for example in stream:
            text = example.get(self.text_field)
            if not isinstance(text, str):
                raise ValueError(f"{self.spec} has no string field {self.text_field!r}; name "
                                 "the field that holds the text with --text_field.")
            if text:
                yield Piece(text, True, len(text.encode("utf-8")))


Source = FileSource | HFDatasetSource


def open_source(spec: str, text_field: str = "text", split: str = "train") -> Source:
    """Returns the source `spec` (see the module doc)."""
    if not spec.strip():  # "" would name the current folder: everything beneath it.
        raise ValueError("--source is empty; give a text file, a folder, a glob, a .jsonl file "
                         "or hf:DATASET.")
    if spec.startswith(HF_PREFIX):
        return HFDatasetSource(spec, text_field, split)
    return FileSource(spec, text_field)
