"""A trained gpt_jax run as an lm-evaluation-harness model (lm-eval 0.4.13): `GptJaxLM`, registered
under the name "gpt_jax".

    pip install -r requirements-lm-eval.txt
    python -m gpt_jax.eval.lm_eval_adapter export-task stdlib_nextline lm_eval_tasks
    python -m gpt_jax.eval.lm_eval_adapter --model gpt_jax --model_args workdir=runs/quickstart \
        --tasks stdlib_nextline --include_path lm_eval_tasks [any other lm_eval option]

`export-task TASK FOLDER [SOURCE]` writes a gpt_jax task (a built-in one, or a JSONL task file:
gpt_jax/eval/tasks.py) as an lm-eval task (`write_task`): FOLDER/NAME.yaml over local JSONL
files, which lm-eval reads offline through Hugging Face datasets' "json" loader.

lm-eval 0.4.13 finds models only in its own table (lm_eval/models/__init__.py) or in the classes
imported before it resolves `--model`; it reads no entry points. So the plain `lm_eval --model
gpt_jax` cannot find this class: `python -m gpt_jax.eval.lm_eval_adapter` registers it, then runs
lm-eval's own command line with the arguments given (the same options, the same results table).
In Python: `import gpt_jax.eval.lm_eval_adapter`, then `lm_eval.simple_evaluate(model="gpt_jax",
model_args="workdir=DIR", ...)`, or pass `GptJaxLM(workdir=DIR)` as the model.

`--model_args` (comma-separated key=value): workdir (required), checkpoint (newest | best | a
step; default newest), max_length (tokens of context per row; default the model's max_seq_len),
max_gen_toks (default 256, lm-eval's), seed (sampling, when a task asks for do_sample). The batch
size is lm-eval's own `--batch_size N` (rows per compiled call; "auto" means 32): lm-eval passes
it to every model, so it cannot also be a model arg.

What each request type does:
- loglikelihood: the (context, continuation) pair is tokenized as lm-eval's TemplateLM does (the
  whole text, split after the context's tokens; the context's trailing whitespace moves to the
  continuation) and scored by gpt_jax.eval.scoring.Scorer. An empty context is the tokenizer's
  end-of-text token; a tokenizer without one (byte, char) conditions the continuation's first
  token on nothing: it is taken as the context and only the rest is scored.
- loglikelihood_rolling: the document after the end-of-text token (without one: after its own first
  token, which is then not scored), in windows of max_length predictions, each later window
  conditioned on the max_length tokens before its last prediction: lm-eval's
  get_rolling_token_windows, as its Hugging Face model scores them.
- generate_until: greedy decoding (gpt_jax.generate.generate with the KV cache; sampling at the
  request's temperature if it asks for do_sample), up to max_gen_toks new tokens, the text cut
  at the first `until` string (and at the end-of-text token). The prompt keeps its last
  max_length - max_gen_toks tokens (HFLM's rule), so prompt and continuation fit the context and
  each row's text is its own greedy continuation, whatever it is batched with. Prompts are
  batched batch_size at a time, with one extra row of the batch's bucketed prompt length (a power
  of two), so the decoder compiles once per bucket, not once per prompt length; that row's
  output is dropped.

The model runs on jax's default device (a GPU when jax has one; torch is not needed, and lm-eval's
`--device` is ignored). Nothing else in gpt_jax imports this module or lm_eval.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from tqdm import tqdm

try:
    from lm_eval.api import model as lm_model
    from lm_eval.api import registry
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
except ModuleNotFoundError as e:  # The optional install.
    raise ModuleNotFoundError(f"{e}: the lm-eval adapter needs lm-evaluation-harness: pip "
                              "install -r requirements-lm-eval.txt") from e

NAME = "gpt_jax"  # The name `--model` takes.
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default (HFLM).
AUTO_BATCH_SIZE = 32  # What --batch_size auto means here: no memory probing.
MIN_PROMPT_BUCKET = 32  # The shortest compiled prompt length of generate_until.
_MODULE = "gpt_jax.eval.lm_eval_adapter"  # This module's name, also when it runs as __main__.


def register() -> None:
    """Registers GptJaxLM as lm-eval's model "gpt_jax" (lazily, by its import path, so that this
    module run as __main__ and imported by name name the same class)."""
    if NAME not in registry.model_registry:
        registry.model_registry.register(NAME, target=f"{_MODULE}:GptJaxLM")


def _batch_size(value: Any) -> int:
    """lm-eval's --batch_size (an int, "N", "auto" or "auto:N") as rows per call."""
    if value is None:
        return 1
    if isinstance(value, str) and value.startswith("auto"):
        return AUTO_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size={value!r}: give a number of rows, e.g. --batch_size 16.") \
            from None
    if size < 1:
        raise ValueError(f"batch_size={size}: give at least 1 row.")
    return size


class GptJaxLM(lm_model.TemplateLM):
    """A gpt_jax run's checkpoint as an lm-eval language model (see the module docstring)."""

    backend = "causal"

    def __init__(self, workdir: str | pathlib.Path | None = None, checkpoint: str | int = "newest",
                 batch_size: int | str | None = 1, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0,
                 max_batch_size: int | None = None, device: str | None = None) -> None:
        """Loads checkpoint `checkpoint` (newest | best | a step) of the run in `workdir`
        (sample.load_run). `max_batch_size` and `device` are lm-eval's, passed to every model;
        jax picks the device."""
        from gpt_jax import sample

        super().__init__()
        del max_batch_size  # No automatic batch sizing here.
        if workdir is None:
            raise ValueError("--model_args needs workdir=DIR: the workdir of a gpt_jax run, e.g. "
                             "--model_args workdir=runs/quickstart.")
        if device not in (None, "cpu", "cuda", "cuda:0"):  # lm-eval's default is cuda:0.
            logging.warning("lm_eval --device=%s is ignored: gpt_jax runs on jax's default "
                            "device.", device)
        tokenizer, model, params, step = sample.load_run(str(workdir), str(checkpoint))
        self._setup(tokenizer, model, params, step, str(workdir), batch_size, max_length,
                    max_gen_toks, seed)

    @classmethod
    def from_model(cls, tokenizer: Any, model: Any, params: Any, *, step: int = 0,
                   name: str = "in-memory", batch_size: int | str | None = 1,
                   max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                   seed: int = 0) -> GptJaxLM:
        """The adapter over a model already in memory (e.g. a training loop's parameters), for
        lm_eval.simple_evaluate(model=...); `name` stands for the workdir in lm-eval's records."""
        self = cls.__new__(cls)
        lm_model.TemplateLM.__init__(self)
        self._setup(tokenizer, model, params, step, name, batch_size, max_length, max_gen_toks,
                    seed)
        return self

    def _setup(self, tokenizer: Any, model: Any, params: Any, step: int, workdir: str,
               batch_size: int | str | None, max_length: int | None, max_gen_toks: int,
               seed: int) -> None:
        from gpt_jax.eval.scoring import Scorer
        from gpt_jax.models import registry as models

        arch = models.arch_of(model.cfg)
        if arch.reads_pairs:
            raise ValueError(f"{workdir} is a sequence-pair model (model.arch={arch.name}); "
                             "lm-eval scores language models (model.arch gpt or lstm).")
        self.batch_size = _batch_size(batch_size)
        if not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            raise ValueError(f"max_gen_toks={max_gen_toks!r}: give a number of tokens ≥ 1.")
        # A soft prompt (finetune.prompt_tokens) takes the first positions of the context.
        room = model.cfg.max_seq_len - getattr(model.cfg, "prompt_tokens", 0)
        self._max_length = room if max_length is None else int(max_length)
        if self._max_length < 1:
            raise ValueError(f"max_length={max_length}: give at least 1 token of context.")
        self.tokenizer, self.model, self.params, self.step = tokenizer, model, params, step
        self.workdir, self.max_gen_toks, self.seed = workdir, max_gen_toks, int(seed)
        self.scorer = Scorer(model, params, max_len=self._max_length, batch_size=self.batch_size)
        logging.info("gpt_jax: %s checkpoint %d, context %d, batch %d.", workdir, step,
                     self._max_length, self.batch_size)

    # Tokenization (TemplateLM's interface).

    @property
    def eot_token_id(self) -> int | None:
        """The tokenizer's end-of-text token, or None (byte and char tokenizers have none)."""
        return self.tokenizer.eot_id

    @property
    def max_length(self) -> int:
        """Tokens of context per scored row."""
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer in lm-eval's request cache keys."""
        return f"gpt_jax:{self.workdir}:{self.tokenizer.name}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs
                   ) -> list[int]:
        """The run's tokenizer's ids of `string` (it adds no special tokens)."""
        del add_special_tokens, kwargs
        try:
            return self.tokenizer.encode(string).tolist()
        except ValueError as e:
            raise ValueError(f"lm-eval's text {string[:60]!r} cannot be tokenized: {e}") from None

    def tok_decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; an id the tokenizer lacks (a padded vocab's) shows as U+FFFD."""
        from gpt_jax.data import tokenizers

        return tokenizers.decode_known(self.tokenizer, list(ids))[0]

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records of the model in its results' config."""
        return {"model_workdir": self.workdir, "model_checkpoint_step": self.step,
                "model_max_length": self.max_length}

    # Requests.

    def loglikelihood(self, requests: list, disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is greedy) per request (module docstring)."""
        if self.eot_token_id is not None:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        encoded = []
        for context, continuation in (req.args for req in requests):
            if context == "":  # No end-of-text token to condition on: the first token is it.
                ids = self.tok_encode(continuation)
                encoded.append(((context, continuation), ids[:1], ids[1:]))
            else:
                encoded.append(((context, continuation), *self._encode_pair(context, continuation)))
        return self._loglikelihood_tokens(encoded, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Scores (cache key, context ids, continuation ids) requests with the Scorer, longest
        first in chunks (a progress bar's steps); results in `requests`' order."""
        del kwargs
        scored = [(ctx, cont) for _, ctx, cont in requests]
        results = self._score_in_chunks(scored, "loglikelihood requests", disable_tqdm)
        for (key, _, _), answer in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def _score_in_chunks(self, requests: list[tuple[list[int], list[int]]], what: str,
                         disable_tqdm: bool) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        todo = []
        requests = list(requests)
        for i, (ctx, cont) in enumerate(requests):
            if not ctx:  # A context of whitespace only, moved into the continuation.
                ctx, cont = (([self.eot_token_id], cont) if self.eot_token_id is not None
                             else (cont[:1], cont[1:]))
                requests[i] = (ctx, cont)
            if not cont:  # Nothing to predict: log p = 0, and (vacuously) greedy.
                results[i] = (0.0, True)
            else:
                todo.append(i)
        todo.sort(key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
        chunk = self.batch_size * 16  # Several compiled calls per progress step.
        for start in tqdm(range(0, len(todo), chunk), desc=f"gpt_jax {what}",
                          disable=disable_tqdm or not todo):
            part = todo[start : start + chunk]
            for i, answer in zip(part, self.scorer.loglikelihood([requests[i] for i in part]),
                                 strict=True):
                results[i] = answer
        return results  # type: ignore[return-value]

    def rolling_requests(self, string: str) -> tuple[list[int], list[int]]:
        """(context ids, scored ids) of a loglikelihood_rolling document: after the end-of-text
        token, or without one after the document's first token (which is then not scored)."""
        ids = self.tok_encode(string)
        if self.eot_token_id is not None:
            return [self.eot_token_id], ids
        return ids[:1], ids[1:]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """log p of each whole document (module docstring): Scorer.loglikelihood of the
        document after its first context token is exactly lm-eval's rolling windows (each chunk
        of max_length predictions conditioned on the max_length tokens before its end)."""
        strings = [req.args[0] for req in requests]
        pairs = [self.rolling_requests(s) for s in strings]
        results = self._score_in_chunks(pairs, "loglikelihood_rolling requests", disable_tqdm)
        out = []
        for string, (total, _) in zip(strings, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """The continuation of each context, cut at its `until` strings (module docstring)."""
        import jax

        from gpt_jax.generate import SamplingParams, generate

        eos = None if self.eot_token_id is None else self.tokenizer.decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            key = json.dumps(req.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="gpt_jax generate_until", disable=disable_tqdm)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            max_new = int(kwargs["max_gen_toks"])
            sampling = SamplingParams(
                temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample")
                else 0.0, top_k=int(kwargs.get("top_k") or 0),
                top_p=float(kwargs.get("top_p") or 1.0))
            stops = self._stop_tokens(until)
            room = self._prompt_room(max_new)
            prompts = {i: self._prompt(requests[i].args[0], room) for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                rows = [prompts[i] for i in batch]
                rows += [self._filler(rows[0], room)] * (self.batch_size + 1 - len(rows))
                key = jax.random.fold_in(jax.random.key(self.seed), start)
                outs = generate(self.model, self.params, rows, max_new, key, sampling,
                                stop_tokens=stops)
                for i, row, ids in zip(batch, rows, outs, strict=False):
                    text = self.tok_decode(ids[len(row):].tolist())
                    for s in until:
                        if s:
                            text = text.split(s)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]

    def _prompt_room(self, max_new: int) -> int:
        """Prompt tokens kept when generating `max_new`: max_length - max_new (HFLM's rule), so
        prompt and continuation fit one window and decoding never slides; a max_new that leaves
        no room keeps max_length tokens, and the window then slides (gpt_jax.generate)."""
        room = self.max_length - max_new
        if room < 1:
            logging.log_first_n(
                logging.WARNING, "max_gen_toks=%d leaves no room for a prompt in the context of "
                "%d tokens: the prompt keeps its last %d tokens and the window slides while "
                "generating.", 1, max_new, self.max_length, self.max_length)
            return self.max_length
        return room

    def _prompt(self, context: str, room: int) -> np.ndarray:
        """A generation prompt's ids: its last `room` tokens; an empty context is the
        end-of-text token."""
        ids = self.tok_encode(context)[-room:]
        if not ids:
            if self.eot_token_id is None:
                raise ValueError("generate_until got an empty context and this run's tokenizer "
                                 "has no end-of-text token to start from; give the task a "
                                 "non-empty prompt.")
            ids = [self.eot_token_id]
        return np.asarray(ids, np.int32)

    @staticmethod
    def _filler(longest: np.ndarray, room: int) -> np.ndarray:
        """The extra row of a generation batch: its longest prompt, extended on the left to the
        next power of two (≥ MIN_PROMPT_BUCKET, ≤ room) with copies of its first token, so that
        the compiled prompt length is one of a few buckets and prompt + continuation still fit
        the window. Its output is dropped; it continues much like that prompt, so it tends to
        stop when the batch does (decoding ends when every row has stopped)."""
        bucket = MIN_PROMPT_BUCKET
        while bucket < len(longest):
            bucket *= 2
        bucket = max(min(bucket, room), len(longest))
        return np.concatenate([np.full(bucket - len(longest), longest[0], np.int32), longest])

    def _stop_tokens(self, until: list[str]) -> list[int]:
        """Token ids that end a row early: the end-of-text token and each `until` string that is
        one token (the text is cut at `until` afterwards either way)."""
        stops = [] if self.eot_token_id is None else [self.eot_token_id]
        for s in until:
            try:
                ids = self.tokenizer.encode(s)
            except ValueError:  # Text the vocab lacks: the model cannot emit it as one token.
                continue
            if len(ids) == 1:
                stops.append(int(ids[0]))
        return stops


# Tasks: a gpt_jax task (gpt_jax.eval.tasks) as an lm-eval task folder.

def write_task(task: Any, folder: str | pathlib.Path) -> pathlib.Path:
    """Writes `task` (a gpt_jax.eval.tasks.Task) as an lm-eval task in `folder`: NAME.yaml and
    the JSONL files it reads (NAME.test.jsonl, NAME.train.jsonl with few-shot examples), by
    absolute paths, so `--include_path FOLDER --tasks NAME` finds it from any directory.
    Multiple choice becomes output_type multiple_choice (acc, acc_norm); completion
    output_type loglikelihood (acc: the target is the greedy continuation, gpt_jax's
    exact_match), whose rows carry "continuation" = delimiter + target: lm-eval puts no
    delimiter before a loglikelihood task's target (its target_delimiter is then "", so that
    few-shot examples read context + delimiter + target as gpt_jax's do).
    lm-eval draws its own few-shot examples, so only 0-shot scores match gpt_jax's exactly."""
    from gpt_jax.eval import tasks

    completion = task.kind == tasks.COMPLETION
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", task.name) or task.name.startswith("."):
        raise ValueError(f"task name {task.name!r} cannot name lm-eval's task files; give the "
                         "task a name of letters, digits, '_', '-' and '.' (its header's "
                         "\"task\").")
    folder = pathlib.Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, examples in (("test", task.test), ("train", task.train)):
        if examples:
            rows = [e.to_json(split) for e in examples]
            if completion:
                rows = [{**r, "continuation": task.delimiter + r["target"]} for r in rows]
            path = folder / f"{task.name}.{split}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                            encoding="utf-8")
            files[split] = str(path)
    config: dict[str, Any] = {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
        "doc_to_text": "context",
        "target_delimiter": "" if completion else task.delimiter,
        "fewshot_delimiter": task.separator,
        "metadata": {"version": 1.0},
    }
    if "train" in files:
        config["fewshot_split"] = "train"
        config["training_split"] = "train"
    if task.kind == tasks.MULTIPLE_CHOICE:
        config.update(output_type="multiple_choice", doc_to_choice="choices",
                      doc_to_target="label",
                      metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                   for m in ("acc", "acc_norm")])
    else:
        # acc only: lm-eval's perplexity has a bootstrap standard error, computed in a forked
        # process pool, and a fork of a process running jax may deadlock.
        config.update(output_type="loglikelihood", doc_to_target="continuation",
                      metric_list=[{"metric": "acc", "aggregation": "mean",
                                    "higher_is_better": True}])
    path = folder / f"{task.name}.yaml"
    # JSON is YAML: every string quoted, so delimiters such as " " and "\n\n" survive exactly.
    # ASCII escapes: YAML refuses some characters (control ones) written raw.
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


_EXPORT = "export-task"
_USAGE = (f"usage: python -m {_MODULE} {_EXPORT} TASK FOLDER [SOURCE]   (TASK: a built-in "
          "task's name, SOURCE the text some are made from, or a JSONL task file)\n"
          f"       python -m {_MODULE} [lm_eval options: --model gpt_jax --model_args "
          "workdir=DIR --tasks NAME --include_path FOLDER ...]")


def main(argv: list[str]) -> None:
    """`export-task TASK FOLDER [SOURCE]`: writes an lm-eval task (write_task) of a built-in
    task (made from SOURCE, if it takes one) or a task file. Anything else: lm-eval's
    own command line with "gpt_jax" registered (`--model gpt_jax` is the default)."""
    from gpt_jax import cli

    register()
    cli.quiet_orbax_reads()  # Its "read-only folder" warnings on every checkpoint read.
    if len(argv) > 1 and argv[1] == _EXPORT:
        if len(argv) not in (4, 5):
            sys.exit(_USAGE)
        from gpt_jax.eval import tasks

        try:
            path = write_task(tasks.load_task(argv[2], *argv[4:]), argv[3])
        except (ValueError, OSError) as e:
            sys.exit(f"error: {e}")
        name = path.stem
        print(f"wrote {path}\nrun: python -m {_MODULE} --model {NAME} --model_args workdir=DIR "
              f"--tasks {name} --include_path {path.parent}")
        return
    args = argv[1:]
    if args in (["-h"], ["--help"]):
        print(_USAGE + "\n")
    # `--model gpt_jax` by default (lm-eval's own default is its Hugging Face model), in the
    # legacy form (options only) and after `run`.
    at = 1 if args[:1] == ["run"] else 0
    legacy = args[at:at + 1] and args[at].startswith("-") and args[at] not in ("-h", "--help")
    if legacy and not any(a == "--model" or a.startswith("--model=") for a in args):
        args = [*args[:at], "--model", NAME, *args[at:]]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [f"python -m {_MODULE}", *args]
    cli_evaluate()


def run_main() -> None:
    """Console-script entry: main(sys.argv)."""
    main(sys.argv)


register()

if __name__ == "__main__":
    run_main()
