"""Trains each architecture variant on one recipe and prints a markdown table of the results.

    python tools/train_variants.py --root=/tmp/variants2k \
        -- --config=configs/shakespeare_char.py:cpu --config.data.path=PATH

Every variant is an ordinary `python -m gpt_jax.train` run (one seed: the recipe's) in
ROOT/NAME, with the arguments after `--` plus the variant's overrides; a workdir that already
finished is not trained again (so a table can be rebuilt, or a killed sweep resumed). The table
has, per variant: the parameter count, the final val loss (`train.final_eval`, the whole val split
for the shakespeare_char recipes), the median training tokens/s of its train rows, and the wall
time of the run. Tokens/s of runs that shared the machine with other work are only indicative:
tools/benchmark.py times the step alone (its --set takes the same overrides).
"""

from __future__ import annotations

import json
import pathlib
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from gpt_jax import cli  # After the path: run as a script from any folder.

VARIANTS = {  # name → overrides (issue 14's acceptance list).
    "gpt2": [],
    "sinusoidal": ["--config.model.positions=sinusoidal"],
    # Vaswani et al. also scale the token embeddings by √d_model.
    "sinusoidal_scaled": ["--config.model.positions=sinusoidal",
                          "--config.model.scale_embeddings=True"],
    "rope": ["--config.model.positions=rope"],
    "alibi": ["--config.model.positions=alibi"],
    "nope": ["--config.model.positions=none"],
    "llama": ["--config.model.norm=rmsnorm", "--config.model.mlp=swiglu",
              "--config.model.num_kv_heads=2", "--config.model.qk_norm=True",
              "--config.model.positions=rope"],
    # The same block at GPT-2's parameter count (shakespeare_char.py:cpu_llama's width).
    "llama_344": ["--config.model.norm=rmsnorm", "--config.model.mlp=swiglu",
                  "--config.model.mlp_dim=344", "--config.model.num_kv_heads=2",
                  "--config.model.qk_norm=True", "--config.model.positions=rope"],
    "additive": ["--config.model.attention=additive"],
}


def finished(workdir: pathlib.Path) -> list[dict] | None:
    """The rows of a run that reached its final eval, else None."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    config = json.loads((workdir / "config.json").read_text())
    last = config["train"]["num_steps"]
    return rows if any(r.get("step") == last and "val/loss" in r for r in rows) else None


def main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder of the variants' workdirs")
    parser.add_argument("--only", default="", help="comma-separated variant names (default all)")
    parser.add_argument("train_args", nargs="*", help="after --: the recipe's train arguments")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    if unknown := [n for n in names if n not in VARIANTS]:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    root = pathlib.Path(args.root)
    table = ["| variant | parameters | val loss | train tokens/s (median) | wall |",
             "| --- | --- | --- | --- | --- |"]
    for name in names:
        workdir = root / name
        if finished(workdir) is None:
            begin = time.time()
            subprocess.run([sys.executable, "-m", "gpt_jax.train", *args.train_args,
                            *VARIANTS[name], "--config.sample.num_samples=0",
                            f"--workdir={workdir}"], check=True, stdout=sys.stderr)  # Table: stdout.
            (workdir / "wall_s.txt").write_text(f"{time.time() - begin:.0f}\n")
        rows = finished(workdir)
        assert rows is not None, f"{workdir} did not finish"
        final = [r for r in rows if "val/loss" in r][-1]["val/loss"]
        tps = statistics.median(r["tokens_per_sec"] for r in rows if r.get("tokens_per_sec"))
        wall = workdir / "wall_s.txt"
        params = _params(workdir)
        table.append(f"| {name} | {params:,} | {final:.4f} | {tps:,.0f} | "
                     f"{wall.read_text().strip() + ' s' if wall.is_file() else 'n/a'} |")
    print("\n".join(table))
    return 0


def _params(workdir: pathlib.Path) -> int:
    """The model's parameter count, from its config (shapes only, nothing restored)."""
    import jax

    from gpt_jax import config as config_lib
    from gpt_jax.models import registry

    # Over configs/base.py's defaults: a run saved before a field existed had its default.
    config = config_lib.saved_run_config((workdir / "config.json").read_text())
    model = registry.build(registry.hyperparameters(config))
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.numpy.zeros((1, config.data.seq_len), jax.numpy.int32))
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
