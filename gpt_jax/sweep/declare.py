"""What a sweep file declares: a base config, the points (override dicts built with `axis`,
`product`, `zipit`, `chain`, as big_vision's hyper module does), the seeds, and evaluations run on
each finished run. A sweep file is Python next to its experiment:

    from gpt_jax.sweep import Eval, Sweep, axis, product

    def get_sweep() -> Sweep:
        return Sweep(
            config="configs/shakespeare_char.py:cpu",
            base={"train.num_steps": 2000},
            points=product(axis("model.positions", ["learned", "rope"]),
                           axis("model.num_layers", [2, 4])),
            seeds=(0, 1, 2),
        )

Every run is `python -m gpt_jax.train --config=CONFIG --config.KEY=VALUE …` with the base
overrides, the point's, and train.seed; its workdir's name is derived from the point's overrides
and the seed, so a later launch finds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

Overrides = dict[str, Any]
_VALUE_TYPES = (bool, int, float, str)
_NAME_LIMIT = 80  # Characters of a run's folder name before a hash shortens it.


def axis(key: str, values: Sequence[Any]) -> list[Overrides]:
    """One override key over `values`: [{key: v} for v in values]."""
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"axis({key!r}, …) takes a non-empty list of values, got {values!r}")
    return [{key: v} for v in values]


def product(*axes: Sequence[Overrides]) -> list[Overrides]:
    """Every combination of the axes' points (the last axis varies fastest)."""
    return [_merged(combo) for combo in itertools.product(*axes)]


def zipit(*axes: Sequence[Overrides]) -> list[Overrides]:
    """The axes' points taken together, element by element; the axes must be equally long."""
    lengths = {len(a) for a in axes}
    if len(lengths) > 1:
        raise ValueError(f"zipit takes axes of one length, got lengths {[len(a) for a in axes]}")
    return [_merged(combo) for combo in zip(*axes, strict=True)]


def chain(*axes: Sequence[Overrides]) -> list[Overrides]:
    """The axes' points one after another."""
    return [dict(p) for a in axes for p in a]


def _merged(parts: Sequence[Overrides]) -> Overrides:
    out: Overrides = {}
    for part in parts:
        if clash := set(out) & set(part):
            raise ValueError(f"two axes set {sorted(clash)}: combine each key in one axis")
        out.update(part)
    return out


@dataclasses.dataclass(frozen=True)
class Eval:
    """An evaluation of every finished run: `python -m gpt_jax.evaluate --workdir=RUN ARGS`,
    its result kept in RUN/evals/NAME.jsonl; the report's column NAME is the val split's loss
    (or, with `--task`, the first task's main metric)."""

    name: str
    args: tuple[str, ...] = ()

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_.@-]+", self.name):
            raise ValueError(f"Eval name {self.name!r}: use letters, digits and _ . @ - only")
        if isinstance(self.args, str) or not all(isinstance(a, str) for a in self.args):
            raise ValueError(f"Eval {self.name!r}: args is a tuple of flags, e.g. "
                             f"('--seq_len=256',), not {self.args!r}")
        if any(a.startswith(("--workdir", "--out")) for a in self.args):
            raise ValueError(f"Eval {self.name!r}: the sweep sets --workdir and --out itself")
        from absl import flags

        from gpt_jax import evaluate

        known = flags.FlagValues()
        evaluate.define_flags(known)
        try:  # Checked now: a misspelt flag would otherwise fail only after every run trained.
            # (--config.mesh.* are evaluate's mesh overrides, not flags: its parser sets them aside.)
            known(["evaluate", *(a for a in self.args if not a.startswith("--config."))])
        except flags.Error as e:
            raise ValueError(f"Eval {self.name!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Point:
    """One run: a point's overrides and a seed."""

    overrides: Overrides
    seed: int
    name: str  # The run's folder name, from the overrides and the seed.
    label: str  # The configuration, for tables and plot legends (seed left out).


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A sweep: `config` (FILE.py[:VARIANT], relative to the repository root or absolute), `base`
    overrides every run takes, `points` (override dicts; [{}] is the config alone), `seeds`
    (train.seed of each run of a point), `evals` run on every finished run; how tables and
    plots name a point: `names` (one per point), else its overrides with `labels` shortening
    keys ({"model.positions": "pos"} shows "pos=rope", "" the value alone, None nothing);
    `analyses` run at each report on the experiment folder."""

    config: str
    base: Overrides = dataclasses.field(default_factory=dict)
    points: Sequence[Overrides] = (dict(),)
    seeds: Sequence[int] = (0,)
    evals: Sequence[Eval] = ()
    labels: dict[str, str | None] = dataclasses.field(default_factory=dict)
    names: Sequence[str] = ()
    # Run by every --report after results.csv is written: f(experiment folder) → files written
    # (e.g. gpt_jax.sweep.scaling.report, a fitted scaling law).
    analyses: Sequence[Callable[[pathlib.Path], list[pathlib.Path]]] = ()

    def __post_init__(self):
        if not self.points:
            raise ValueError("Sweep.points is empty: give at least one override dict ({} = the "
                             "config alone)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"Sweep.seeds={list(self.seeds)}: give distinct seeds")
        evals = [e.name for e in self.evals]
        if len(set(evals)) != len(evals):
            raise ValueError(f"Sweep.evals names repeat: {evals}")
        if self.names and (len(self.names) != len(self.points)
                           or len(set(self.names)) != len(self.names)):
            raise ValueError(f"Sweep.names: give {len(self.points)} distinct names, one per "
                             f"point, got {list(self.names)}")
        for overrides in [self.base, *self.points]:
            for key, value in overrides.items():
                if key == "train.seed":
                    raise ValueError("set seeds with Sweep.seeds, not a train.seed override")
                if not isinstance(value, _VALUE_TYPES):
                    raise ValueError(f"override {key}={value!r}: values are bool, int, float or "
                                     "str (what --config.KEY=VALUE takes)")
        keys = [json.dumps(p, sort_keys=True) for p in self.points]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"Sweep.points lists {dup} twice")
        folders = [run_name(p, 0) for p in self.points]  # Points sharing a workdir would mix.
        if len(set(folders)) != len(folders):
            i, j = next((i, j) for i in range(len(folders)) for j in range(i)
                        if folders[i] == folders[j])
            raise ValueError(f"Sweep.points {self.points[j]} and {self.points[i]} would share the "
                             f"run folder {folders[i]!r}; make their values differ as text")
        labels = self._labels()
        if len(set(labels)) != len(labels):
            dup = next(x for x in labels if labels.count(x) > 1)
            raise ValueError(f"two points are both labelled {dup!r}, so tables would average them "
                             "as one; give Sweep.names, or labels that keep the keys that differ")

    def runs(self) -> list[Point]:
        """Every run, point by point, each point's seeds in order (the SLURM array's order)."""
        out = []
        for overrides, label in zip(self.points, self._labels(), strict=True):
            for seed in self.seeds:
                out.append(Point(dict(overrides), int(seed), run_name(overrides, seed), label))
        return out

    def _labels(self) -> list[str]:
        """Each point's name in tables and legends: `names`, else `label(overrides)`."""
        return list(self.names) if self.names else [self.label(p) for p in self.points]

    def label(self, overrides: Overrides) -> str:
        """The configuration's name in tables and legends: `short=value, …`, "base" for {}."""
        parts = []
        for key, value in overrides.items():
            short = self.labels.get(key, key.rsplit(".", 1)[-1])
            if short is None:
                continue
            parts.append(f"{short}={_text(value)}" if short else _text(value))
        return ", ".join(parts) or "base"

    def overrides(self, point: Point) -> Overrides:
        """The run's overrides: the base's, the point's, and train.seed."""
        return {**self.base, **point.overrides, "train.seed": point.seed}


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def run_name(overrides: Overrides, seed: int) -> str:
    """A run's folder name: `key=value` per override (the key's last part), then the seed; kept
    to a safe character set, and shortened with a hash of the overrides when long. Stable across
    launches, so a relaunch finds its runs."""
    parts = [re.sub(r"[^A-Za-z0-9_.=+-]+", "-", f"{k.rsplit('.', 1)[-1]}={_text(v)}")
             for k, v in overrides.items()]
    name = ",".join(parts) or "base"
    if len(name) > _NAME_LIMIT or len({k.rsplit(".", 1)[-1] for k in overrides}) < len(overrides):
        digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{name[:_NAME_LIMIT - 11]}~{digest}"
    return f"{name},seed={seed}"


def value_arg(value: Any) -> str:
    """An override value as --config.KEY=VALUE takes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)
