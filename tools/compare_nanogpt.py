"""Side by side with nanoGPT: its README CPU run and `shakespeare_char.py:cpu`, back to back.

    python tools/compare_nanogpt.py --nanogpt=PATH/TO/nanoGPT [--rounds=2] [--steps=2000]

PATH is a nanoGPT checkout whose data/shakespeare_char/ has been prepared (`python prepare.py`
there; put tinyshakespeare.txt in as input.txt first where it cannot download). Each round runs
nanoGPT's README command, then ours on the same text (`data.path` = its input.txt), one after the
other on an otherwise idle machine. Both train the same 0.80M-parameter model for the same steps.

Throughput of a run is the median over its steps: nanoGPT's per-iteration `time …ms` lines
(from iteration 10 on) and our `tokens_per_sec` lines in metrics.jsonl (each covering `log.every`
steps, compile and evals excluded). The ratio is ours / nanoGPT's per round. Writes JSON and a
markdown table to --out.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("nanogpt", None, "A nanoGPT checkout with data/shakespeare_char prepared.")
flags.DEFINE_integer("rounds", 2, "Back-to-back rounds (nanoGPT, then ours).", lower_bound=1)
flags.DEFINE_integer("steps", 2000, "Training steps of each run (the README's 2000; at least "
                     "200, past the recipe's 100 warmup steps).", lower_bound=200)
flags.DEFINE_string("out", "runs/benchmarks", "Folder for the JSON and markdown results.")

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpt_jax import cli  # noqa: E402 — after the path.

COMMAND = "python tools/compare_nanogpt.py"
TOKENS_PER_STEP = 12 * 64  # Batch 12 × block 64 in both recipes.


def nanogpt_command(steps: int, out_dir: str) -> list[str]:
    """nanoGPT's README CPU command, with `steps` iterations and the schedule over `steps`."""
    return [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
            "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
            "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
            f"--max_iters={steps}", f"--lr_decay_iters={steps}", "--dropout=0.0",
            f"--out_dir={out_dir}"]


def ours_command(steps: int, text: pathlib.Path, workdir: str) -> list[str]:
    return [sys.executable, "-m", "gpt_jax.train", "--config=configs/shakespeare_char.py:cpu",
            f"--workdir={workdir}", f"--config.data.path={text}",
            f"--config.train.num_steps={steps}", f"--config.optim.decay_steps={steps}",
            "--config.log.progress=lines", "--config.sample.num_samples=0"]


def nanogpt_tokens_per_sec(log: str) -> float:
    """Median tokens/s of nanoGPT's `iter N: loss …, time …ms` lines, from iteration 10 on."""
    times_ms = [float(m.group(2)) for m in re.finditer(r"^iter (\d+): .*time ([\d.]+)ms", log, re.M)
                if int(m.group(1)) >= 10]
    if not times_ms:
        raise ValueError("no 'iter N: … time …ms' lines from iteration 10 on in nanoGPT's output; "
                         "give --nanogpt a checkout of karpathy/nanoGPT, whose train.py logs them")
    return TOKENS_PER_STEP / (statistics.median(times_ms) / 1e3)


def ours_tokens_per_sec(metrics_jsonl: pathlib.Path) -> float:
    """Median `tokens_per_sec` of a run's train lines, the first (compile) interval excluded."""
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines()]
    rates = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r][1:]
    if not rates:
        raise ValueError(f"no tokens_per_sec lines in {metrics_jsonl}")
    return statistics.median(rates)


class RunFailedError(ValueError):
    """One of the two trainings failed; the message names it, its last line and what to do."""


def run(cmd: list[str], cwd: pathlib.Path) -> str:
    """Runs `cmd` in `cwd`; its output, or RunFailedError with its last line."""
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RunFailedError(f"`{' '.join(cmd[:3])} …` in {cwd} failed (status {p.returncode}): "
                        f"{cli.one_line(tail[0])}; run it there by hand to see its whole output.")
    return p.stdout + p.stderr


def checkout_problem(nanogpt: pathlib.Path) -> str | None:
    """What keeps `nanogpt` from being a nanoGPT checkout with data/shakespeare_char prepared, as
    an error line's problem and fix; None if nothing does."""
    data = nanogpt / "data" / "shakespeare_char"
    if not nanogpt.exists():
        return f"--nanogpt={nanogpt}: no such folder; give the folder of a nanoGPT checkout."
    if not nanogpt.is_dir():
        return f"--nanogpt={nanogpt} is a file; give the folder of a nanoGPT checkout."
    if not (nanogpt / "train.py").is_file():
        return (f"--nanogpt={nanogpt} is not a nanoGPT checkout (no train.py); give the folder "
                "of `git clone https://github.com/karpathy/nanoGPT`.")
    missing = [name for name in ("input.txt", "train.bin") if not (data / name).is_file()]
    if missing:
        return (f"--nanogpt={nanogpt}: data/shakespeare_char is not prepared (no "
                f"{' and '.join(missing)}); run `python prepare.py` in {data} first (put "
                "tinyshakespeare.txt there as input.txt where it cannot download).")
    return None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {' '.join(argv[1:])!r}: every setting is a flag "
                 f"(--nanogpt=PATH, --steps=N, …); see {COMMAND} --helpshort.")
    if not FLAGS.nanogpt:
        cli.fail("--nanogpt is missing: give the folder of a nanoGPT checkout with "
                 "data/shakespeare_char prepared, e.g. --nanogpt=~/nanoGPT.")
    nanogpt = pathlib.Path(FLAGS.nanogpt).expanduser().resolve()
    if problem := checkout_problem(nanogpt):
        cli.fail(problem)
    out = pathlib.Path(FLAGS.out)
    cli.check_output(out, "--out", folder=True)  # Refused now, not after the runs.
    text = nanogpt / "data/shakespeare_char/input.txt"
    rounds = []
    with tempfile.TemporaryDirectory() as tmp, cli.errors_as_one_line():
        for i in range(FLAGS.rounds):
            theirs = nanogpt_tokens_per_sec(
                run(nanogpt_command(FLAGS.steps, f"{tmp}/nanogpt_{i}"), nanogpt))
            workdir = pathlib.Path(tmp) / f"ours_{i}"
            run(ours_command(FLAGS.steps, text, str(workdir)), REPO)
            ours = ours_tokens_per_sec(workdir / "metrics.jsonl")
            rounds.append({"round": i + 1, "nanogpt_tokens_per_sec": theirs,
                           "gpt_jax_tokens_per_sec": ours, "ratio": ours / theirs})
            print(f"round {i + 1}: nanoGPT {theirs:,.0f} tokens/s, gpt_jax {ours:,.0f} tokens/s, "
                  f"ratio {ours / theirs:.2f}×", flush=True)
    result = {"date": datetime.date.today().isoformat(), "host": platform.processor() or
              platform.machine(), "steps": FLAGS.steps, "rounds": rounds,
              "ratio_median": statistics.median(r["ratio"] for r in rounds)}
    lines = ["| round | nanoGPT tokens/s | gpt_jax tokens/s | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['round']} | {r['nanogpt_tokens_per_sec']:,.0f} | "
              f"{r['gpt_jax_tokens_per_sec']:,.0f} | {r['ratio']:.2f}× |" for r in rounds]
    with cli.errors_as_one_line():
        cli.write_atomically({out / "compare_nanogpt.json": json.dumps(result, indent=2) + "\n",
                                out / "compare_nanogpt.md": "\n".join(lines) + "\n"})
    print(f"median ratio {result['ratio_median']:.2f}×; written to {out}/compare_nanogpt.*")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(COMMAND))
