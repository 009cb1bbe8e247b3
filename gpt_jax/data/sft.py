"""Supervised fine-tuning data: prompt/completion or chat records → a prepared SFT folder →
Grain batches whose loss is on the completion tokens only (through the batch's `weights`).

Records (JSONL, one object per line; field names are the prepare command's flags):
- prompt/completion: {"prompt": TEXT, "completion": TEXT}, both non-empty;
- chat: {"messages": [{"role": ROLE, "content": TEXT}, …]} with at least one message whose role
  is "assistant". Template: every message is rendered "ROLE: CONTENT\\n". The loss is on each
  assistant message's " CONTENT\\n" (its "assistant:" is context); messages after the last
  assistant one are dropped (they carry no loss, and a causal model's earlier losses do not see
  them).
A record is chat if it has the messages field, else prompt/completion.

The end marker, so that a model learns to stop: the tokenizer's end-of-text token (bpe, gpt2,
an hf: tokenizer that has one) after the completion or the conversation, with loss; a tokenizer
without one (byte, char) gets a newline appended to the completion text instead (a chat's last
message already ends with one). The newline marks the end of single-line completions only: a
multi-line completion's own newlines are text like any other, so a model sampled from such data
cannot tell its end from a line break (prefer a tokenizer with end-of-text for those).

Tokenization: the text is cut into pieces (context text, loss text), a context piece's trailing
whitespace moved to the front of the loss piece after it (as lm-eval's encode_pair moves a
context's trailing whitespace into the scored continuation, so that training and the task
harness put the boundary in the same place: prompt "Q: " + completion "4" trains " 4"). Each
piece is tokenized on its own and the ids joined, so the loss boundary falls exactly between
tokens: an example's tokens x = prompt ++ completion (++ end); the batch's targets are x[1:], of
weight 1 exactly where the target is a completion or end token.

Built-in tasks (`--task`, from gpt_jax/data/tasks.py's offline seq2seq tasks, its own val split),
written as prompts a byte-level model can learn:
  addition  "4821+397="                    → "5218"
  sort      "sort k 42 07 r 93 p 15="      → "07 15 42 93"
  docsig    "# Return the number of items." → "\\ndef count(self, value)"

A prepared SFT folder:

    meta.json          {"format": "gpt_jax.sft", "kind": "sft", "version", "fingerprint",
                       "tokenizer": {"spec", "name", "vocab_size", "eot_id", "sha256"},
                       "vocab_size", "eot_id", "end": "eot" | "newline", "dtype", "source"
                       (where the records came from), "splits": {"train"|"val": {"examples",
                       "tokens", "loss_tokens"}}, "task": {"file", "test", "train",
                       "excluded"}}
    tokenizer.json     the tokenizer (data/tokenizers.py): training uses the folder's
    {split}.tokens.bin   every example's ids, concatenated (dtype)
    {split}.weights.bin  uint8, one per token: 1 if predicting that token is in the loss
    {split}.offsets.npy  int64 [examples + 1]: where each example starts
    task.jsonl         the val examples as a completion task (gpt_jax/eval/tasks.py's format:
                       header {"task": "sft", "delimiter": ""}, each val example's context and
                       target; a few train examples with "split": "train" for k-shot), so
                       `python -m gpt_jax.evaluate --workdir=W --task=FOLDER/task.jsonl` gives
                       the exact match of greedy completions. With an end-of-text tokenizer the
                       target is the completion alone (a token is no text). A val example is
                       left out ("excluded", counted in the log) when the harness's tokens of
                       its target (encode_pair's, the whole text tokenized at once) are not the
                       ones training trained (each piece on its own): a BPE merge across the
                       prompt/completion boundary, or a completion merged into the prompt; so
                       exact match is only ever computed on trained tokens (prepare refuses
                       records that leave fewer than 2: the task's standard error needs 2).

It is written to a temporary folder renamed into place (cli.staged_folder: an interrupted
prepare leaves nothing half-written); an up-to-date folder (same fingerprint) is reused.

Batches (gpt_jax/data/batch.py's dict; data.sft_packing):
- padded: one example per row, cut to T + 1 tokens (counted in the log), the rest padding of
  weight 0;
- packed: whole examples one after another in a row (greedy, in a seeded order fixed for the run;
  an example longer than the row is cut), `segment_ids` numbering them (padding is a segment of
  its own) so attention stays inside each, `positions` restarting at 0 at each. Examples in a
  row never interact, so packing once changes only which examples share a batch, and the rows
  are shuffled afresh every epoch; the val loss is padded's (up to float rounding).
Examples with no completion token within their first T + 1 tokens are left out (counted), so
every row has weight and no batch divides by zero. Shapes: B rows, T = data.seq_len, T1 = T + 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import zlib
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
from absl import logging

from gpt_jax import cli
from gpt_jax.data import pairs, pipeline, shards, tokenizers
from gpt_jax.eval import tasks as eval_tasks

FORMAT, KIND, VERSION = "gpt_jax.sft", "sft", 1
SPLITS = ("train", "val")
PACKINGS = ("padded", "packed")
ASSISTANT = "assistant"
TASK_FILE = "task.jsonl"
TASK_NAME = "sft"
FEWSHOT_POOL = 8  # Train examples written to task.jsonl for k-shot prompts.
Record = dict[str, Any]  # {"prompt", "completion"} or {"messages": [{"role", "content"}, …]}.
Piece = tuple[str, bool]  # (text, whether its tokens are in the loss)


# ---- Records ---------------------------------------------------------------------------------

def read_jsonl(path: str | pathlib.Path, prompt_field: str = "prompt",
               completion_field: str = "completion", messages_field: str = "messages"
               ) -> list[Record]:
    """The records of a JSONL file (the module docstring's two kinds). A bad line is a
    ValueError naming FILE:LINE and the fix."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"the SFT file {str(path)!r} does not exist; give a JSONL file of "
                         "prompt/completion or chat records.")
    records = []
    # Bytes, each line decoded on its own: a bad byte is then reported at its line.
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{number} is not UTF-8 ({e.reason} at byte {e.start} "
                                 "of the line); fix or drop it.") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not JSON ({e.msg}); give one JSON object "
                                 "per line.") from None
            problem = _problem(obj, prompt_field, completion_field, messages_field)
            if problem:
                raise ValueError(f"{path}:{number} {problem}.")
            record = ({"messages": obj[messages_field]} if messages_field in obj else
                      {"prompt": obj[prompt_field], "completion": obj[completion_field]})
            if (bad := _not_unicode(record)) is not None:
                raise ValueError(f"{path}:{number} holds {bad!r}, no Unicode text (a lone "
                                 "surrogate \\u escape); fix or drop it.")
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records; give one JSON object per line.")
    return records


def _problem(obj: Any, prompt_field: str, completion_field: str, messages_field: str
             ) -> str | None:
    """What is wrong with one JSONL record, with the fix; None if it is good."""
    if not isinstance(obj, dict):
        return "is no JSON object; give one object per line"
    if messages_field in obj:
        messages = obj[messages_field]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"]
                and isinstance(m.get("content"), str) for m in messages):
            return (f"has a {messages_field!r} field that is not a list of {{\"role\": TEXT, "
                    "\"content\": TEXT}} objects; write each message so")
        if not any(m["role"] == ASSISTANT for m in messages):
            return (f"has no message of role {ASSISTANT!r}: the loss is on assistant messages; "
                    "add one or leave the record out")
        return None
    for field in (prompt_field, completion_field):
        if not isinstance(obj.get(field), str) or not obj[field]:
            return (f"has no non-empty text field {field!r} (nor a {messages_field!r} list); "
                    "name the fields with --prompt_field / --completion_field or "
                    "--messages_field")
    return None


def _texts(record: Record) -> list[str]:
    """Every text of a record."""
    if "messages" in record:
        return [t for m in record["messages"] for t in (m["role"], m["content"])]
    return [record["prompt"], record["completion"]]


def _not_unicode(record: Record) -> str | None:
    """The record's first text that is no Unicode (a lone surrogate, which JSON's \\u escapes
    allow and no tokenizer encodes), else None."""
    for text in _texts(record):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return text[max(0, e.start - 10):e.end + 10]
    return None


def split_records(records: list[Record], val_fraction: float
                  ) -> tuple[list[Record], list[Record]]:
    """The last `val_fraction` of the records validate: at least 2 (the task's standard error
    needs two), and at least one left to train."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction={val_fraction} must be in (0, 1).")
    if len(records) < 3:
        raise ValueError(f"{len(records)} record(s) cannot make a train split and a val split of "
                         "at least 2; give at least 3.")
    n_val = min(max(2, round(len(records) * val_fraction)), len(records) - 1)
    return records[:-n_val], records[-n_val:]


def task_records(name: str, num_train: int, seed: int) -> tuple[list[Record], list[Record]]:
    """Built-in task `name` (gpt_jax/data/tasks.py) as prompt/completion records (formats: the
    module docstring), with the task's own val split."""
    from gpt_jax.data import tasks  # docsig parses the stdlib: only when asked.

    train, val = tasks.make(name, num_train, seed)
    prompt = {"addition": "{}=", "sort": "sort {}=", "docsig": "# {}"}[name]
    completion = "\n{}" if name == "docsig" else "{}"

    def convert(split: list[dict[str, str]]) -> list[Record]:
        return [{"prompt": prompt.format(r["source"]),
                 "completion": completion.format(r["target"])} for r in split]

    return convert(train), convert(val)


def pieces(record: Record, newline_end: bool) -> list[Piece]:
    """The record's text as (text, in the loss) pieces, adjacent pieces of one kind joined, a
    context piece's trailing whitespace moved to the front of the loss piece after it (the
    module docstring says why; a context that is all whitespace is then no piece);
    `newline_end`: the tokenizer has no end-of-text token, so a completion ends with "\\n"."""
    if "messages" not in record:
        parts = [(record["prompt"], False),
                 (record["completion"] + ("\n" if newline_end else ""), True)]
    else:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == ASSISTANT)
        parts = []
        for m in messages[:last + 1]:
            if m["role"] == ASSISTANT:
                parts += [(f"{m['role']}:", False), (f" {m['content']}\n", True)]
            else:
                parts.append((f"{m['role']}: {m['content']}\n", False))
    out: list[Piece] = []
    for text, loss in parts:
        if out and out[-1][1] == loss:
            out[-1] = (out[-1][0] + text, loss)
            continue
        if loss and out:  # lm-eval's encode_pair: the context's trailing whitespace is target.
            context = out[-1][0].rstrip()
            text = out[-1][0][len(context):] + text
            if context:
                out[-1] = (context, False)
            else:
                out.pop()
        out.append((text, loss))
    return out


def encode(tok: tokenizers.Tokenizer, record: Record) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [N] int32, loss mask [N] uint8) of one record: each piece tokenized on its own,
    then the end-of-text token (in the loss) where the tokenizer has one."""
    ids, mask = [], []
    for text, loss in pieces(record, tok.eot_id is None):
        piece = tok.encode(text)
        ids.append(piece)
        mask.append(np.full(len(piece), loss, np.uint8))
    if tok.eot_id is not None:
        ids.append(np.array([tok.eot_id], np.int32))
        mask.append(np.ones(1, np.uint8))
    return np.concatenate(ids).astype(np.int32), np.concatenate(mask)


def task_example(record: Record, newline_end: bool) -> dict[str, str]:
    """The record as a completion-task example: everything before its last loss piece is the
    context, that piece the target."""
    parts = pieces(record, newline_end)
    return {"context": "".join(text for text, _ in parts[:-1]), "target": parts[-1][0]}


def harness_agrees(tok: tokenizers.Tokenizer, record: Record, ids: np.ndarray) -> bool:
    """Whether the task harness (eval/tasks.py's encode_pair: the whole text tokenized at once)
    scores exactly the tokens that training trains as the record's task target: `ids` (encode's,
    each piece on its own) at the target piece, less the end-of-text token the target text
    cannot hold. Not so when a BPE merge crosses the context/target boundary, the target is
    merged into the context, or there is no context to predict its first token from."""
    example = task_example(record, tok.eot_id is None)
    if not example["context"]:
        return False
    end = len(ids) - (tok.eot_id is not None)
    trained = ids[end - len(tok.encode(example["target"])):end]
    try:
        _, scored = eval_tasks.encode_pair(tok, example["context"], example["target"],
                                           "an SFT example")
    except ValueError:  # The target merged into the context: no tokens of its own.
        return False
    return np.array_equal(scored, trained)


# ---- The prepared folder ---------------------------------------------------------------------

def read_meta(folder: str | pathlib.Path) -> dict[str, Any] | None:
    """meta.json of `folder` if it is a readable SFT folder's, else None."""
    meta = cli.json_object(pathlib.Path(folder).expanduser() / shards.META)
    return meta if meta is not None and meta.get("format") == FORMAT else None


def base_tokenizer_file(path: str | pathlib.Path) -> pathlib.Path:
    """The tokenizer.json of the run at `path` (its workdir, checkpoints/ or one step's folder):
    a fine-tuning run must use its base's tokenizer."""
    p = pathlib.Path(path).expanduser()
    if (p / "state").is_dir():  # One step's folder: WORKDIR/checkpoints/STEP.
        p = p.parent
    if p.name == "checkpoints":
        p = p.parent
    file = p / shards.TOKENIZER
    if not file.is_file():
        raise ValueError(f"--tokenizer_from={path}: {file} does not exist; give the base run's "
                         "workdir (training writes its tokenizer.json there).")
    return file


def prepare(train: list[Record], val: list[Record], out: str | pathlib.Path, description: str,
            tokenizer_name: str | None = None, tokenizer_from: str | None = None,
            vocab_size: int | None = None) -> pathlib.Path:
    """Tokenizes the records into the folder `out` (the module docstring's format) and returns
    it; an existing folder made from the same records and tokenizer is kept as it is, a folder
    holding anything else refused. The tokenizer is `tokenizer_name` (built; char and bpe learn
    from the records) or the one of the run `tokenizer_from` (exactly one of the two)."""
    if (tokenizer_name is None) == (tokenizer_from is None):
        raise ValueError("give one of --tokenizer=NAME or --tokenizer_from=WORKDIR (the base run "
                         "whose tokenizer a fine-tuning run must use).")
    if tokenizer_from is not None and vocab_size is not None:
        raise ValueError("--vocab_size trains a bpe tokenizer; --tokenizer_from takes the base "
                         "run's tokenizer as it is: drop --vocab_size.")
    _check_unicode({"train": train, "val": val})
    out = pathlib.Path(out).expanduser()
    if tokenizer_from is not None:
        base_file = base_tokenizer_file(tokenizer_from)
        spec, key = f"from:{tokenizer_from}", shards.sha256_file(base_file)
    else:
        tokenizers.check_name(tokenizer_name)
        spec, key = tokenizer_name, _tokenizer_file_sha(tokenizer_name)
    fingerprint = _fingerprint(train, val, [spec if tokenizer_from is None else "from", key,
                                            vocab_size])
    meta = read_meta(out)
    if meta is not None and meta.get("fingerprint") == fingerprint:
        return out
    if out.exists() and any(out.iterdir()):
        what = "other SFT data" if meta is not None else "files"
        raise FileExistsError(f"{out} already holds {what}; give an empty or new --out folder "
                              "(nothing there was changed).")
    if tokenizer_from is not None:
        tok = tokenizers.load_tokenizer(base_file)
    else:  # A learned vocabulary covers every text the model reads, both splits.
        texts = [t for r in train + val for t, _ in pieces(r, True)] + ["\n"]
        tok = tokenizers.build_tokenizer(tokenizer_name, texts if tokenizers.learns_vocab(
            tokenizer_name) else [], vocab_size)
    dtype = shards.token_dtype(tok.vocab_size)
    # Everything that can fail on the records happens before the folder is staged.
    encoded = {name: _encode_split(tok, name, records)
               for name, records in (("train", train), ("val", val))}
    task_text, task = _task(tok, train, val, encoded["val"], description)
    with cli.staged_folder(out) as tmp:  # Renamed to `out` only once whole.
        splits = {name: _write_split(tmp, name, encoded[name], dtype) for name in SPLITS}
        (tmp / TASK_FILE).write_text(task_text, encoding="utf-8")
        tokenizers.save_tokenizer(tok, tmp / shards.TOKENIZER)
        shards.write_json_atomic(tmp / shards.META, {
            "format": FORMAT, "kind": KIND, "version": VERSION, "fingerprint": fingerprint,
            "tokenizer": {"spec": spec, "name": tok.name, "vocab_size": tok.vocab_size,
                          "eot_id": tok.eot_id,
                          "sha256": shards.sha256_file(tmp / shards.TOKENIZER)},
            "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "end": "newline" if tok.eot_id is None else "eot", "dtype": dtype,
            "source": description, "splits": splits, "task": task})
    return out


def _tokenizer_file_sha(name: str) -> str | None:
    """hf:PATH names a file whose contents may change: they are part of the fingerprint."""
    if not name.startswith(tokenizers.HF_PREFIX):
        return None
    path = pathlib.Path(name.removeprefix(tokenizers.HF_PREFIX)).expanduser()
    return shards.sha256_file(path) if path.is_file() else None


def _fingerprint(train: list[Record], val: list[Record], tokenizer_key: list[Any]) -> str:
    """What the prepared folder depends on: every record, the split, the tokenizer."""
    digest = hashlib.sha256()
    for split in (train, val):
        for r in split:
            digest.update(json.dumps(r, sort_keys=True).encode())
        digest.update(b"|")
    return hashlib.sha256(json.dumps([FORMAT, VERSION, digest.hexdigest(), tokenizer_key]
                                     ).encode()).hexdigest()


def _bad_record(split: str, index: int, record: Record, problem: str, fix: str) -> ValueError:
    """prepare's one-line error about one record: which (split, index, its first 40
    characters), what is wrong, the fix."""
    text = "".join(t for t, _ in pieces(record, False))
    return ValueError(f"the {split} split's record {index} ({text[:40]!r}) {problem}; {fix}.")


def _check_unicode(splits: dict[str, list[Record]]) -> None:
    """Raises _bad_record's error for a text that is no Unicode (a lone surrogate): no tokenizer
    encodes it, and a learned vocabulary fails on it before any record is named."""
    for split, records in splits.items():
        for i, r in enumerate(records):
            if (bad := _not_unicode(r)) is not None:
                raise _bad_record(split, i, r, f"holds {bad!r}, no Unicode text (a lone "
                                  "surrogate)", "fix or drop the record")


def _encode_split(tok: tokenizers.Tokenizer, name: str, records: list[Record]
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """encode() of each record of split `name`; a record the tokenizer cannot encode (a
    character outside a char vocabulary) is a ValueError naming it."""
    out = []
    for i, r in enumerate(records):
        try:
            out.append(encode(tok, r))
        except ValueError as e:  # UnicodeError is one.
            problem = str(e).split(";")[0].rstrip(".")  # The tokenizer's fix is not ours.
            raise _bad_record(name, i, r, f"cannot be tokenized ({problem})",
                              "drop or fix the record (or, with --tokenizer, use one that "
                              "encodes it: byte encodes any text)") from None
    return out


def _write_split(folder: pathlib.Path, name: str, encoded: list[tuple[np.ndarray, np.ndarray]],
                 dtype: str) -> dict[str, int]:
    """Writes split `name`'s files (the module docstring's) and returns its meta entry."""
    offsets = np.zeros(len(encoded) + 1, np.int64)
    offsets[1:] = np.cumsum([len(ids) for ids, _ in encoded])
    ids = np.concatenate([ids for ids, _ in encoded])
    mask = np.concatenate([mask for _, mask in encoded])
    ids.astype(dtype).tofile(folder / f"{name}.tokens.bin")
    mask.tofile(folder / f"{name}.weights.bin")
    np.save(folder / f"{name}.offsets.npy", offsets)
    return {"examples": len(encoded), "tokens": int(offsets[-1]), "loss_tokens": int(mask.sum())}


def _task(tok: tokenizers.Tokenizer, train: list[Record], val: list[Record],
          val_encoded: list[tuple[np.ndarray, np.ndarray]], description: str
          ) -> tuple[str, dict[str, Any]]:
    """task.jsonl's text and meta entry: the val records on whose target the harness agrees
    with training (harness_agrees), the others counted as excluded."""
    newline_end = tok.eot_id is None
    tests = [task_example(r, newline_end) for r, (ids, _) in zip(val, val_encoded, strict=True)
             if harness_agrees(tok, r, ids)]
    excluded = len(val) - len(tests)
    if len(tests) < 2:
        raise ValueError(f"only {len(tests)} of {len(val)} val records are tokenized by the task "
                         "harness as training tokenizes them (a BPE merge across the prompt/"
                         "completion boundary), and the folder's task needs 2; end prompts with "
                         "a space, newline or punctuation, or give more val records.")
    if excluded:
        logging.warning("%s: %d of %d val examples left out: the task harness would score their "
                        "target as other tokens than training trains (a BPE merge across the "
                        "prompt/completion boundary).", TASK_FILE, excluded, len(val))
    header = {"task": TASK_NAME, "description": f"SFT: {description}", "delimiter": ""}
    shots = [task_example(r, newline_end) | {"split": "train"} for r in train[:FEWSHOT_POOL]]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in [header, *shots, *tests])
    return text, {"file": TASK_FILE, "test": len(tests), "train": len(shots),
                  "excluded": excluded}


@dataclasses.dataclass(frozen=True)
class SftSplit:
    """One split's examples: memory-mapped ids and loss masks, and their offsets."""

    tokens: np.ndarray
    weights: np.ndarray  # uint8, 1 where predicting the token is in the loss.
    offsets: np.ndarray  # [examples + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32, loss mask uint8) of example i."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return np.asarray(self.tokens[a:b], np.int32), np.asarray(self.weights[a:b])


@dataclasses.dataclass(frozen=True)
class SftData:
    """A run's SFT data: the folder's tokenizer, the splits and the folder's task file."""

    tokenizer: tokenizers.Tokenizer
    train: SftSplit
    val: SftSplit
    folder: str

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: the tokenizer's (the end marker is one of its tokens)."""
        return self.tokenizer.vocab_size

    @property
    def eot_id(self) -> int | None:
        """TrainingData's field: the tokenizer's end-of-text id (the end marker), if any."""
        return self.tokenizer.eot_id

    @property
    def task_file(self) -> str:
        """FOLDER/task.jsonl: the val examples as a completion task."""
        return str(pathlib.Path(self.folder) / TASK_FILE)


def open_folder(folder: str | pathlib.Path) -> SftData:
    """Opens a prepared SFT folder; a ValueError names what is wrong with it."""
    folder = pathlib.Path(folder).expanduser()
    meta = read_meta(folder)
    if meta is None:
        raise ValueError(f"{folder} is no prepared SFT folder (no {shards.META} of format "
                         f"{FORMAT}); make one with `python -m gpt_jax.data.prepare --sft "
                         "--source=FILE.jsonl --tokenizer_from=WORKDIR --out=DIR`.")
    if meta.get("version") != VERSION:
        raise ValueError(f"{folder} is SFT format version {meta.get('version')}, this code reads "
                         f"{VERSION}; prepare the folder again.")
    splits = {}
    for name in SPLITS:
        try:
            offsets = np.load(folder / f"{name}.offsets.npy")
            tokens = np.memmap(folder / f"{name}.tokens.bin", dtype=meta["dtype"], mode="r")
            weights = np.memmap(folder / f"{name}.weights.bin", dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder}'s {name} split cannot be read ({e}); prepare the folder "
                             "again.") from None
        if not tokens.size == weights.size == offsets[-1]:
            raise ValueError(f"{folder}'s {name} split is truncated; prepare the folder again.")
        splits[name] = SftSplit(tokens, weights, offsets)
    if not (folder / TASK_FILE).is_file():
        raise ValueError(f"{folder} has no {TASK_FILE}; prepare the folder again.")
    tok = tokenizers.load_tokenizer(folder / shards.TOKENIZER)
    return SftData(tok, splits["train"], splits["val"], str(folder))


def describe(data: SftData) -> str:
    """One line about the SFT data, for the log."""
    end = ("a newline" if data.eot_id is None else f"end-of-text id {data.eot_id}")
    return (f"{len(data.train):,} train and {len(data.val):,} val examples in {data.folder}; "
            f"tokenizer {data.tokenizer.name} (vocab {data.vocab_size}); completions end with "
            f"{end}")


# ---- Batches ---------------------------------------------------------------------------------

class SftRows(grain.sources.RandomAccessDataSource):
    """A split's rows: one example each (padded) or packed examples (see the module docstring)."""

    def __init__(self, split: SftSplit, seq_len: int, packing: str, what: str,
                 seed: int | None = None):
        """Rows of seq_len + 1 tokens; `seed` orders the examples before packing (None: in
        order); `what` names the split in the log line that counts cut and left-out examples."""
        if packing not in PACKINGS:
            raise ValueError(f"data.sft_packing={packing!r} is not one of {PACKINGS}.")
        T1 = seq_len + 1
        lengths = np.diff(split.offsets)
        self._cut = np.minimum(lengths, T1)
        # Loss tokens among tokens 1 … cut-1 (token 0 is never a target).
        loss_cumsum = np.concatenate([[0], np.cumsum(split.weights, dtype=np.int64)])
        loss = loss_cumsum[split.offsets[:-1] + self._cut] - loss_cumsum[split.offsets[:-1] + 1]
        keep = np.flatnonzero(loss > 0)
        cut, dropped = int(np.sum(lengths > T1)), len(split) - len(keep)
        if cut or dropped:
            logging.info("%s: %d of %d examples cut to data.seq_len + 1 = %d tokens; %d left out "
                         "(no completion token within them).", what, cut, len(split), T1, dropped)
        if not len(keep):
            raise ValueError(f"no example of {what} has a completion token within data.seq_len + "
                             f"1 = {T1} tokens; raise data.seq_len or shorten the prompts.")
        if seed is not None:
            keep = np.random.default_rng(pipeline.shuffle_seed((seed, 1))).permutation(keep)
        rows = [[int(i)] for i in keep] if packing == "padded" else _pack(keep, self._cut, T1)
        self._starts = np.cumsum([0] + [len(r) for r in rows])
        self._order = np.concatenate([np.asarray(r, np.int64) for r in rows])
        self._split, self._T1, self._packed = split, T1, packing == "packed"

    def __len__(self) -> int:
        return len(self._starts) - 1

    def examples(self, index: int) -> list[int]:
        """The examples of row `index`, in place order."""
        return self._order[self._starts[index]:self._starts[index + 1]].tolist()

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        T1 = self._T1
        tokens_T1, loss_T1 = np.zeros(T1, np.int32), np.zeros(T1, np.float32)
        examples = self.examples(index)
        segment_T1, position_T1 = np.full(T1, len(examples), np.int32), np.zeros(T1, np.int32)
        at = 0
        for segment, i in enumerate(examples):
            ids, mask = self._split.example(i)
            n = int(self._cut[i])
            tokens_T1[at:at + n], loss_T1[at:at + n] = ids[:n], mask[:n]
            segment_T1[at:at + n], position_T1[at:at + n] = segment, np.arange(n)
            at += n
        # A target in another segment (the next example's first token) is never in the loss.
        same_T = segment_T1[1:] == segment_T1[:-1]
        row = {"inputs": tokens_T1[:-1], "targets": tokens_T1[1:],
               "weights": loss_T1[1:] * same_T}
        if self._packed:
            row["segment_ids"], row["positions"] = segment_T1[:-1], position_T1[:-1]
        return row

    def __repr__(self) -> str:
        # Grain checks repr(source) on restore: no address in it.
        return (f"SftRows({len(self)} rows of {len(self._order)} examples, T1={self._T1}, "
                f"packed={self._packed}, order crc={zlib.crc32(self._order.tobytes()):08x})")


def _pack(order: np.ndarray, lengths: np.ndarray, T1: int) -> list[list[int]]:
    """Greedy packing in `order`: an example goes in the current row if it fits, else starts
    the next."""
    rows: list[list[int]] = []
    used = T1
    for i in order.tolist():
        if used + lengths[i] > T1:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += int(lengths[i])
    return rows


def batch_spec(batch_size: int, seq_len: int, packing: str
               ) -> dict[str, tuple[tuple[int, int], np.dtype]]:
    """(shape, dtype) of each array of an SFT batch: packed rows add segment_ids and positions."""
    shape, i32 = (batch_size, seq_len), np.dtype(np.int32)
    spec = {"inputs": (shape, i32), "targets": (shape, i32),
            "weights": (shape, np.dtype(np.float32))}
    if packing == "packed":
        spec |= {"segment_ids": (shape, i32), "positions": (shape, i32)}
    return spec


def train_dataset(data: SftData, seq_len: int, batch_size: int, seed: int, shard_index: int,
                  shard_count: int, num_threads: int, prefetch: int, packing: str
                  ) -> grain.IterDataset:
    """An endless stream of this process's rows of each global batch: every epoch a fresh
    seeded permutation of the train rows (packed once, in a seeded order); global batch b is the
    same whatever the number of processes. `iter()` of it has get_state/set_state, so a resumed
    run continues with the batch it would have drawn."""
    pipeline.check_shard(batch_size, shard_index, shard_count)
    rows = SftRows(data.train, seq_len, packing, "the train split", seed=seed)
    ds = grain.MapDataset.source(rows).shuffle(seed=pipeline.shuffle_seed(seed)).repeat(None)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return pipeline.local_batches(ds, batch_size, shard_index, shard_count).to_iter_dataset(read)


def val_rows(data: SftData, seq_len: int, packing: str) -> SftRows:
    """The val rows, examples in order (made once per run: it logs what it cuts)."""
    return SftRows(data.val, seq_len, packing, "the val split")


def eval_batches(rows: SftRows, batch_size: int, num_batches: int | None
                 ) -> Iterator[dict[str, np.ndarray]]:
    """The rows in order, `num_batches` batches of them (None: all), the last padded with rows
    of weight 0: Σ w·loss / Σ w is the exact mean over the val completion tokens."""
    return pairs.eval_batches(rows, batch_size, num_batches)  # Any source of row dicts.

