"""Optional Weights & Biases logging (log.wandb=True): every metrics.jsonl row is also logged to
a wandb run. log.wandb_mode=offline writes it under WORKDIR/wandb with no network (upload it
later with `wandb sync`); TensorBoard and metrics.jsonl stay the record either way.

The run's id is kept in WORKDIR/wandb_id: a resumed training run logs under the same id (online,
wandb continues that run; offline, each start writes its own offline-run folder with the id,
which `wandb sync` uploads). A run from scratch in the workdir gets a new id. Rows are logged
against their training step as the x-axis metric `step`: wandb's own step counter only grows,
and a resume writes the steps after its checkpoint again (TensorBoard hides the earlier ones;
wandb keeps both).
"""

from __future__ import annotations

import pathlib
import uuid
from typing import Any

ID_FILE = "wandb_id"


def missing_problem() -> str | None:
    """The one-line fix when log.wandb=True but wandb is not installed; None if it is."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        return ("log.wandb=True needs the wandb package: pip install -r requirements-wandb.txt "
                "(or set log.wandb=False)")
    return None


class WandbSink:
    """One wandb run for a workdir; `log(step, scalars)` per metrics row, `close()` at the end."""

    def __init__(self, workdir: pathlib.Path, project: str, mode: str, config: dict[str, Any],
                 resumed: bool, name: str | None = None):
        """`resumed`: the training run resumes (keep the wandb run) or starts from scratch."""
        import wandb

        id_file = workdir / ID_FILE
        if not resumed:  # Another run: its own wandb run (the earlier one's files stay).
            id_file.unlink(missing_ok=True)
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        if not id_file.is_file():
            id_file.write_text(run_id + "\n")
        self._run = wandb.init(project=project, dir=str(workdir), mode=mode, id=run_id,
                               resume="allow", config=config, name=name or workdir.name,
                               settings=wandb.Settings(console="off", quiet=True))
        self._run.define_metric("*", step_metric="step")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log({**scalars, "step": step})

    def close(self) -> None:
        self._run.finish()
