"""Tokenize a corpus once into a prepared folder: in process for training, or from the command
line. Both write the one format of shards.py, which training opens with training_data.open_folders.

In process (`prepare`, what training does with data.corpus / data.path): the whole corpus in
memory, tokenized at once, into `cache_dir/prepared/<key>/`. The key hashes everything the
tokens depend on, so a changed corpus, tokenizer or split gets a new folder and an unchanged one
is reused.

Command line, for corpora of any size (streamed, parallel, resumable; prepare_stream.py):

    python -m gpt_jax.data.prepare --source=FILE|FOLDER|GLOB|FILE.jsonl|hf:NAME[:CONFIG]
        --tokenizer=byte|char|bpe|gpt2|hf:tokenizer.json [--vocab_size=N] --out=DIR
        [--val_fraction=0.1 --num_workers=N --text_field=text --split=train] [--verify]
    python -m gpt_jax.data.prepare --verify --out=DIR    # check a prepared folder's sha256s

Sequence pairs (model.arch=seq2seq; the format is gpt_jax/data/pairs.py's):

    python -m gpt_jax.data.prepare --pairs --source=FILE.jsonl [--source_field=source
        --target_field=target] --tokenizer=char|byte|bpe|gpt2|hf:PATH --out=DIR
    python -m gpt_jax.data.prepare --pairs --task=addition|sort|docsig [--task_examples=N
        --task_seed=S] --tokenizer=char --out=DIR

Supervised fine-tuning (data.prepared for a fine-tuning run; the format is gpt_jax/data/sft.py's):

    python -m gpt_jax.data.prepare --sft --source=FILE.jsonl [--prompt_field=prompt
        --completion_field=completion --messages_field=messages --val_fraction=0.1]
        --tokenizer_from=BASE_WORKDIR|--tokenizer=NAME --out=DIR
    python -m gpt_jax.data.prepare --sft --task=addition|sort|docsig [--task_examples=N
        --task_seed=S] --tokenizer_from=BASE_WORKDIR|--tokenizer=NAME --out=DIR

A bad invocation ends with one `error:` line naming the problem and its fix (gpt_jax/cli.py),
and changes nothing that was there before (prepare_stream's module doc).
"""

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import app, flags, logging

from gpt_jax import cli
from gpt_jax.data import prepare_stream, shards, tokenizers
from gpt_jax.data.corpora import Corpus

# Bump when the in-process folders' layout or tokenization changes: the key hashes it, so old
# caches are no longer found. 2: shards.py's format (1 wrote train.bin / val.bin).
FORMAT_VERSION = 2
COMMAND = "python -m gpt_jax.data.prepare"


def _options(tokenizer_name: str, val_fraction: float, vocab_size: int | None,
             shard_tokens: int) -> dict[str, Any]:
    """meta.json's "options": the settings besides the corpus that the folder depends on."""
    options: dict[str, Any] = {"val_fraction": val_fraction, "shard_tokens": shard_tokens}
    if tokenizer_name == "bpe":
        # In process, bpe trains on the corpus's first characters (not bytes, as the CLI).
        options["bpe_sample_chars"] = tokenizers.BPE_SAMPLE_BYTES
        options["vocab_size"] = vocab_size or tokenizers.DEFAULT_BPE_VOCAB
    elif tokenizer_name.startswith(tokenizers.HF_PREFIX):  # The file's contents, not its name.
        path = pathlib.Path(tokenizer_name.removeprefix(tokenizers.HF_PREFIX))
        if path.is_file():
            options["tokenizer_sha256"] = shards.sha256_file(path)
    return options


def _fingerprint(corpus: Corpus, tokenizer_name: str, options: dict[str, Any]) -> str:
    """What "up to date" means for an in-process folder: its meta.json's "fingerprint"."""
    ident = {"format": shards.FORMAT, "version": shards.VERSION, "in_process": FORMAT_VERSION,
             "source_sha256": corpus.sha256, "tokenizer": tokenizer_name, "options": options}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _legacy_folder(root: pathlib.Path, corpus: Corpus, tokenizer_name: str, val_fraction: float,
                   options: dict[str, Any]) -> pathlib.Path:
    """Where format 1 (train.bin / val.bin) kept this corpus: its key, as that code hashed it."""
    parts: list[Any] = [1, corpus.sha256, tokenizer_name, val_fraction]
    legacy = {k: options[k] for k in ("vocab_size", "tokenizer_sha256") if k in options}
    if legacy:
        parts.append(legacy)
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    return root / f"{tokenizer_name.partition(':')[0]}-{digest}"


def _write_shards(folder: pathlib.Path, progress: dict[str, Any], ids: np.ndarray, dtype: str,
                  shard_tokens: int, nbytes: int) -> None:
    """Writes the token stream `ids` as shards of `shard_tokens` tokens; the corpus is one
    document of `nbytes` source bytes, counted in the last shard."""
    writer = shards.ShardWriter(folder, progress, dtype, shard_tokens)
    starts = range(0, len(ids), shard_tokens)
    for i, start in enumerate(starts):
        last = i == len(starts) - 1
        writer.write(ids[start : start + shard_tokens], int(last), nbytes if last else 0, i + 1)
    writer.flush()


def _write(folder: pathlib.Path, corpus: Corpus, tokenizer_name: str, options: dict[str, Any],
           fingerprint: str, vocab_size: int | None) -> None:
    """Tokenizes `corpus` and writes every file of a prepared folder into `folder`."""
    # The tokenization of format 1, unchanged, so runs read the same tokens: bpe trains on a
    # bounded head of the corpus (tokenizers.BPE_SAMPLE_BYTES, here in characters), char on all.
    sample = corpus.text[: tokenizers.BPE_SAMPLE_BYTES] if tokenizer_name == "bpe" else corpus.text
    tok = tokenizers.build_tokenizer(tokenizer_name, sample, vocab_size)
    ids = tok.encode(corpus.text)
    dtype = shards.token_dtype(tok.vocab_size)
    tokenizers.save_tokenizer(tok, folder / shards.TOKENIZER)
    progress = {"fingerprint": fingerprint,
                "tokenizer_sha256": shards.sha256_file(folder / shards.TOKENIZER), "shards": []}
    _write_shards(folder, progress, ids, dtype, options["shard_tokens"],
                  len(corpus.text.encode("utf-8")))
    meta = shards.write_meta(folder, progress, {
        "fingerprint": fingerprint,
        "source": {"spec": corpus.description, "description": corpus.description,
                   "fingerprint": {"kind": "text", "sha256": corpus.sha256}},
        "tokenizer": {"spec": tokenizer_name, "name": tok.name, "vocab_size": tok.vocab_size,
                      "eot_id": tok.eot_id, "sha256": progress["tokenizer_sha256"]},
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "separator": [],  # Nothing appended: the corpus's tokens exactly, as format 1 had them.
        "dtype": dtype,
        "options": options,
    })
    logging.info("Prepared %s: %d train and %d val tokens (%s, vocab %d).", corpus.description,
                 meta["train_tokens"], meta["val_tokens"], dtype, tok.vocab_size)


def prepare(corpus: Corpus, tokenizer_name: str, cache_dir: str, val_fraction: float,
            vocab_size: int | None = None, *,
            shard_tokens: int = prepare_stream.SHARD_TOKENS) -> pathlib.Path:
    """Returns the prepared folder of `corpus` (open it with training_data.open_folders),
    tokenizing it unless an up-to-date copy exists in `cache_dir`/prepared.

    The first (1 - val_fraction) of the token stream is the train split, the rest validation.
    `vocab_size` is bpe's (default tokenizers.DEFAULT_BPE_VOCAB). Files are written into a
    temporary folder renamed into place, so an interrupted prepare never leaves a folder that
    looks complete, and processes sharing the cache see a whole folder or none. A folder at the
    key that is not up to date (damaged, or an older format) is prepared again.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    tokenizers.check_name(tokenizer_name)
    options = _options(tokenizer_name, val_fraction, vocab_size, shard_tokens)
    fingerprint = _fingerprint(corpus, tokenizer_name, options)
    root = pathlib.Path(cache_dir) / "prepared"
    kind = tokenizer_name.partition(":")[0]  # hf:PATH → hf: a path is no folder name.
    final = root / f"{kind}-{fingerprint[:16]}"
    if shards.complete_meta(final, fingerprint):
        logging.info("Reusing prepared data in %s.", final)
        return final
    legacy = _legacy_folder(root, corpus, tokenizer_name, val_fraction, options)
    if final.exists():
        logging.warning("Preparing %s again: it is incomplete, damaged or in an older format.",
                        final)
    elif (legacy / "train.bin").is_file():
        logging.info("Preparing %s again in the current format as %s (the old train.bin/val.bin "
                     "folder is no longer read; delete it to free the space).", legacy, final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-"))
    try:
        _write(tmp, corpus, tokenizer_name, options, fingerprint, vocab_size)
        if shards.complete_meta(final, fingerprint):
            # Another process (e.g. a second host on a shared disk) finished first: use its copy.
            return final
        shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Lost a race to another process's rename: fine if its folder is complete.
            if not shards.complete_meta(final, fingerprint):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _define_flags() -> None:
    """The CLI's flags; defined only when run as a program, so importers get no flags."""
    flags.DEFINE_string("source", None, "A text file, a folder or glob of files (.jsonl files: "
                        "one JSON document per line), or hf:NAME[:CONFIG] (needs `datasets`).")
    flags.DEFINE_string("tokenizer", None, "byte | char | bpe | gpt2 | hf:PATH/tokenizer.json.")
    flags.DEFINE_integer("vocab_size", None, "bpe's vocabulary size, end-of-text token included "
                         f"(default {tokenizers.DEFAULT_BPE_VOCAB}).")
    flags.DEFINE_string("out", None, "The prepared folder to write (created; resumed if "
                        "interrupted; reused if up to date). A folder of anything else is refused.")
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
    flags.DEFINE_bool("pairs", False, "Prepare sequence pairs (model.arch=seq2seq) from a JSONL "
                      "--source or a built-in --task, into a pairs folder.")
    flags.DEFINE_string("source_field", "source", "--pairs: the JSONL field of the source text.")
    flags.DEFINE_string("target_field", "target", "--pairs: the JSONL field of the target text.")
    flags.DEFINE_string("task", None, "--pairs / --sft: a built-in task (addition | sort | "
                        "docsig) instead of --source.")
    flags.DEFINE_integer("task_examples", 20000, "--pairs / --sft --task: train examples (val: a "
                         "tenth, at least 100).")
    flags.DEFINE_integer("task_seed", 0, "--pairs / --sft --task: the examples' seed.")
    flags.DEFINE_bool("sft", False, "Prepare supervised fine-tuning data (prompt/completion or "
                      "chat records) from a JSONL --source or a built-in --task, into an SFT "
                      "folder.")
    flags.DEFINE_string("prompt_field", "prompt", "--sft: the JSONL field of the prompt text.")
    flags.DEFINE_string("completion_field", "completion", "--sft: the JSONL field of the "
                        "completion text.")
    flags.DEFINE_string("messages_field", "messages", "--sft: the JSONL field of a chat record's "
                        'messages ([{"role", "content"}, …]).')
    flags.DEFINE_string("tokenizer_from", None, "--sft: the base run's workdir, whose "
                        "tokenizer.json the data is tokenized with (instead of --tokenizer).")
    flags.DEFINE_bool("verify", False, "Check every shard and tokenizer.json of --out against "
                      "its sha256 in meta.json (a full read): after preparing (or reusing) it, "
                      "or, with --out alone, of an existing prepared folder.")


def _summary(prepared: shards.PreparedShards) -> str:
    m = prepared.meta
    eot = ("no end-of-text token: documents end with a newline" if m["eot_id"] is None
           else f"end-of-text id {m['eot_id']}")
    return (f"{prepared.dir}: {m['total_tokens']:,} tokens ({m['train_tokens']:,} train, "
            f"{m['val_tokens']:,} val) in {len(m['shards'])} shard(s) of {m['dtype']}, from "
            f"{m['total_docs']:,} document(s), {m['source']['bytes'] / 1e6:.1f} MB of "
            f"{m['source']['description']}; tokenizer {m['tokenizer']['name']} (vocab "
            f"{m['vocab_size']:,}, {eot}).")


def _verified(folder: pathlib.Path, meta: dict[str, Any]) -> str:
    return (f"{folder}: OK: {len(meta['shards'])} shard(s) ({meta['total_tokens']:,} tokens) and "
            f"{shards.TOKENIZER} match their sha256 in meta.json.")


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """cli.errors_as_one_line, except that an OSError without an errno is one of ours (e.g.
    sources' "--source=… does not exist; give …"): its message is already whole, so it is shown
    as it is rather than as a system error."""
    with cli.errors_as_one_line():
        try:
            yield
        except OSError as e:
            if e.errno is None:
                raise ValueError(str(e)) from None
            raise


def main(argv: list[str]) -> None:
    """Prepares --source into --out and prints a one-line summary (--verify alone: checks --out)."""
    f = flags.FLAGS
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {' '.join(argv[1:])!r}: the prepare command takes only "
                 "--flags (e.g. --source=FILE --tokenizer=bpe --out=DIR); see --helpshort.")
    if f.sft:
        _prepare_sft(f)
        return
    if given := [f"--{n}" for n in _SFT_FLAGS if f[n].present]:
        cli.fail(f"{', '.join(given)}: only --sft takes them; add --sft or leave them out.")
    if f.pairs:
        _prepare_pairs(f)
        return
    # An empty value counts as missing: --out= would be the current folder.
    missing = [f"--{name}" for name in ("source", "tokenizer", "out") if not f[name].value]
    if f.verify and missing == ["--source", "--tokenizer"]:  # Check an existing folder only.
        with _one_line_errors():
            meta = shards.verify(pathlib.Path(f.out).expanduser())
        print(_verified(pathlib.Path(f.out).expanduser(), meta))
        return
    if missing:
        cli.fail(f"missing {', '.join(missing)}: prepare needs --source=FILE|FOLDER|GLOB|"
                 "hf:NAME, --tokenizer=byte|char|bpe|gpt2|hf:PATH and --out=DIR (or --verify "
                 "--out=DIR alone to check a prepared folder).")
    out = pathlib.Path(f.out).expanduser()
    try:
        with _one_line_errors():
            prepared = prepare_stream.prepare_folder(
                f.source, f.tokenizer, out, vocab_size=f.vocab_size,
                val_fraction=f.val_fraction, num_workers=f.num_workers,
                text_field=f.text_field, split=f.split, shard_tokens=f.shard_tokens,
                bpe_sample_bytes=f.bpe_sample_mb << 20, show_progress=f.progress)
            verified = shards.verify(prepared.dir) if f.verify else None
    except KeyboardInterrupt:
        if (out / shards.PROGRESS).is_file():
            said = f"run the same command again to resume {out}"
        elif shards.read_meta(out) is not None:  # Interrupted while --verify read it.
            said = f"{out} holds the whole prepared data; only its check was cut short"
        else:
            said = f"nothing was saved in {out} yet: run the same command again to start over"
        print(f"interrupted: {said}.", file=sys.stderr)
        sys.exit(130)
    print(_summary(prepared))
    if verified is not None:
        print(_verified(prepared.dir, verified))


def _prepare_pairs(f: flags.FlagValues) -> None:
    """--pairs: the JSONL --source or the --task into a pairs folder; prints a summary."""
    from gpt_jax.data import pairs, tasks  # Grain's import (~0.7 s) only for pairs.

    if bool(f.source) == bool(f.task) or not f.tokenizer or not f.out:
        cli.fail("--pairs needs one of --source=FILE.jsonl or --task=addition|sort|docsig, and "
                 "--tokenizer=char|byte|bpe|gpt2|hf:PATH and --out=DIR.")
    if f.task and (given := [f"--{n}" for n in ("val_fraction", "source_field", "target_field")
                             if f[n].present]):
        cli.fail(f"{', '.join(given)} apply to a --source file; --task={f.task} makes its own "
                 "split and fields: leave them out.")
    with _one_line_errors():
        tokenizers.check_name(f.tokenizer)
        if f.task:
            train, val = tasks.make(f.task, f.task_examples, f.task_seed)
            description = f"task {f.task} ({f.task_examples} examples, seed {f.task_seed})"
        else:
            records = pairs.read_jsonl(f.source, f.source_field, f.target_field)
            train, val = pairs.split_records(records, f.val_fraction)
            description = f"{f.source} ({f.source_field} → {f.target_field})"
        out = pairs.prepare(train, val, f.tokenizer, f.out, description, f.vocab_size)
        data = pairs.open_folder(out)
    print(f"{out}: {pairs.describe(data)}; from {description}.")


_SFT_FLAGS = ("prompt_field", "completion_field", "messages_field", "tokenizer_from")


def _prepare_sft(f: flags.FlagValues) -> None:
    """--sft: the JSONL --source or the --task into an SFT folder; prints a summary."""
    from gpt_jax.data import sft  # Grain's import (~0.7 s) only for SFT.

    if f.pairs:
        cli.fail("--pairs and --sft make different folders; give one of them.")
    if bool(f.source) == bool(f.task) or bool(f.tokenizer) == bool(f.tokenizer_from) or not f.out:
        cli.fail("--sft needs one of --source=FILE.jsonl or --task=addition|sort|docsig, one of "
                 "--tokenizer_from=BASE_WORKDIR or --tokenizer=byte|char|bpe|gpt2|hf:PATH, and "
                 "--out=DIR.")
    only = ("val_fraction", "prompt_field", "completion_field", "messages_field") if f.task else (
        "task_examples", "task_seed")
    if given := [f"--{n}" for n in only if f[n].present]:
        cli.fail(f"--task={f.task} makes its own split and prompts: leave out {', '.join(given)}."
                 if f.task else f"{', '.join(given)} set up a built-in --task, and --source="
                 f"{f.source} is a file of records: leave them out.")
    with _one_line_errors():
        if f.task:
            train, val = sft.task_records(f.task, f.task_examples, f.task_seed)
            description = f"task {f.task} ({f.task_examples} examples, seed {f.task_seed})"
        else:
            records = sft.read_jsonl(f.source, f.prompt_field, f.completion_field,
                                     f.messages_field)
            train, val = sft.split_records(records, f.val_fraction)
            description = str(f.source)
        out = sft.prepare(train, val, f.out, description, f.tokenizer or None,
                          f.tokenizer_from or None, f.vocab_size)
        data = sft.open_folder(out)
    task = sft.read_meta(out)["task"]
    left_out = (f", {task['excluded']} val example(s) left out (their target tokenizes "
                "otherwise in the task harness)" if task.get("excluded") else "")
    print(f"{out}: {sft.describe(data)}; from {description}; task file {data.task_file}"
          f"{left_out}.")


def run_main() -> None:
    """The command (`python -m gpt_jax.data.prepare`, or the installed `gpt-jax-prepare`)."""
    _define_flags()
    app.run(main, flags_parser=cli.flags_parser(COMMAND))


if __name__ == "__main__":
    run_main()
