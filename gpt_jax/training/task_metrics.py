"""Task metrics during training (`train.eval_tasks`, and an SFT folder's own task file): the
tasks are loaded once, before the step compiles (a bad task file stops the run then), and scored
at every evaluation by log-likelihood with the current parameters (gpt_jax/eval/tasks.py), on
the run's mesh."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpt_jax import config as config_lib
from gpt_jax.data import tokenizers
from gpt_jax.eval import scoring, tasks
from gpt_jax.training import build

METRICS = ("acc", "acc_norm", "exact_match")  # Each logged with its _stderr.


class TaskMetrics:
    """Scores train.eval_tasks and the task files `extra` (an SFT folder's task.jsonl, task
    "sft"); `metrics(params)` returns {"tasks/NAME/METRIC": value, …}. A task that cannot be
    loaded or prepared is a ConfigError naming where it came from; two tasks of one name are one
    too (their metrics would overwrite each other)."""

    def __init__(self, r: build.Run, tokenizer: tokenizers.Tokenizer, extra: Sequence[str] = ()):
        t = r.config.train
        self.r, self.tokenizer, self.t = r, tokenizer, t
        names = [n.strip() for n in t.eval_tasks.split(",") if n.strip()]
        # Each error names where its task came from: train.eval_tasks or the task file.
        wheres = [f"train.eval_tasks ({n})" for n in names] + [f"the task file {f}"
                                                               for f in extra]
        try:
            self.tasks = tasks.load_tasks(names, source=t.eval_tasks_source or None)
        except (OSError, ValueError) as e:
            raise config_lib.ConfigError(f"train.eval_tasks: {e}") from e
        for file in extra:
            try:
                self.tasks.append(tasks.load_task_file(file))
            except (OSError, ValueError) as e:
                raise config_lib.ConfigError(f"the task file {file}: {e}") from e
        seen: dict[str, str] = {}
        for task, where in zip(self.tasks, wheres, strict=True):
            if task.name in seen:  # load_tasks refused this within train.eval_tasks.
                raise config_lib.ConfigError(
                    f"{seen[task.name]} and {where} both hold a task named {task.name!r}, whose "
                    f"metrics (tasks/{task.name}/…) would overwrite each other; leave one out of "
                    "train.eval_tasks (or rename it in its file's header).")
            seen[task.name] = where
        for task, where in zip(self.tasks, wheres, strict=True):
            try:  # Prompts built and encoded now, not at the first eval.
                tasks.check_task(tokenizer, task, t.eval_tasks_fewshot,
                                 limit=t.eval_tasks_limit or None)
            except ValueError as e:
                raise config_lib.ConfigError(f"{where}: {e}") from e

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def metrics(self, params: Any) -> dict[str, float]:
        """Every task's metrics and standard errors with `params`."""
        r, t = self.r, self.t
        # A new scorer of the same model reuses the compiled programs (scoring's jit cache).
        # A micro-batch's rows: what the train step holds in memory at once.
        scorer = scoring.Scorer(r.model, params, max_len=r.config.data.seq_len,
                                batch_size=t.batch_size // t.grad_accum_steps, mesh=r.mesh,
                                rules=r.rules)
        out = {}
        for task in self.tasks:
            m = tasks.evaluate_task(scorer, self.tokenizer, task,
                                    num_fewshot=t.eval_tasks_fewshot,
                                    limit=t.eval_tasks_limit or None)
            for name in METRICS:
                if name in m:
                    out[f"tasks/{task.name}/{name}"] = m[name]
                    out[f"tasks/{task.name}/{name}_stderr"] = m[f"{name}_stderr"]
        return out
