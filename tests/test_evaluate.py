"""gpt_jax.evaluate and its library (gpt_jax/eval/loaded.py, text.py): loss, perplexity and bits
per byte of a trained run, equal to training's own val loss on its val split."""

import json
import math
import shutil
import subprocess
import sys

import pytest

from gpt_jax.eval import loaded, text
from tests.conftest import read_metrics


@pytest.fixture(scope="module")
def run(trained_run):
    return loaded.load(trained_run)


def _final_full_val_loss(workdir) -> float:
    rows = [r for r in read_metrics(workdir, timing=False) if r.get("val/split") == "full"]
    return rows[-1]["val/loss"]


def test_own_val_split_equals_trainings_final_full_val_loss(run, trained_run):
    [split] = text.read_splits(run, None, "val")
    row = text.evaluate_split(run, split)
    assert row["loss"] == _final_full_val_loss(trained_run)  # Bitwise: the same eval step.
    assert row["ppl"] == pytest.approx(math.exp(row["loss"]))


def test_text_file_splits_as_training_and_bits_per_byte(run, trained_run):
    corpus = trained_run.parent / "corpus.txt"
    train, val = text.read_splits(run, str(corpus), "all")
    rows = [text.evaluate_split(run, s) for s in (train, val)]
    assert rows[1]["loss"] == _final_full_val_loss(trained_run)
    raw = corpus.read_text()
    assert train.num_bytes + val.num_bytes == len(raw.encode())  # A char run: one char a token.
    for r, s in zip(rows, (train, val), strict=True):
        assert r["tokens"] == len(s.tokens) - 1
        assert r["bits_per_byte"] == pytest.approx(
            r["loss"] * r["tokens"] / (s.num_bytes * math.log(2)), rel=1e-12)
    total = text.total_row(rows)
    assert total["tokens"] == rows[0]["tokens"] + rows[1]["tokens"]
    assert total["loss"] == pytest.approx(
        (rows[0]["loss"] * rows[0]["tokens"] + rows[1]["loss"] * rows[1]["tokens"])
        / total["tokens"])


def test_sliding_window_scores_every_token_once_with_more_context(run, trained_run):
    [val] = text.read_splits(run, None, "val")
    plain = text.evaluate_split(run, val)
    slid = text.evaluate_split(run, val, stride=4)
    assert slid["tokens"] == plain["tokens"]
    assert slid["loss"] != plain["loss"]
    with pytest.raises(loaded.EvalError, match="--stride"):
        text.evaluate_split(run, val, stride=run.config.data.seq_len + 1)


def test_refusals(trained_run, tmp_path):
    with pytest.raises(loaded.EvalError, match="learned positions"):
        loaded.load(trained_run, seq_len=64)
    with pytest.raises(loaded.EvalError, match="only --config.mesh"):
        loaded.parse_overrides(["--config.model.d_model=64"])
    assert loaded.parse_overrides(["--config.mesh.fsdp=1"]) == {"mesh.fsdp": 1}
    run = loaded.load(trained_run, seq_len=8, batch_size=2)  # Shorter is always fine.
    assert (run.config.data.seq_len, run.config.train.batch_size) == (8, 2)
    with pytest.raises(loaded.EvalError, match="--split"):
        text.read_splits(run, None, "test")
    other = tmp_path / "other.txt"
    other.write_text("Zebra ~ quux")  # Characters the char vocab lacks.
    with pytest.raises(loaded.EvalError, match="cannot encode"):
        text.read_splits(run, str(other), "all")


def test_jsonl_documents(run, tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = ["def f1(x):", "    return x"]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    [whole] = text.read_splits(run, str(path), "train")  # The first 90% of the tokens.
    tok = run.tokenizer
    want = tok.encode(docs[0] + "\n" + docs[1])  # No end-of-text token: a newline between.
    assert list(whole.tokens) == list(want[: len(whole.tokens)])
    for bad, where in (({"t": "x"}, "docs.jsonl:2"), ({"text": 5}, "is a int")):
        path.write_text(json.dumps({"text": "x"}) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(loaded.EvalError, match=where):
            text.read_splits(run, str(path), "all")


@pytest.mark.slow
def test_command_prints_tables_and_appends_results(trained_run, tmp_path, bad_invocation):
    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir)
    cmd = [sys.executable, "-m", "gpt_jax.evaluate", f"--workdir={workdir}"]
    for _ in range(2):
        r = subprocess.run([*cmd, f"--data={trained_run.parent / 'corpus.txt'}"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    assert "| val |" in r.stdout and "bits per byte" in r.stdout
    lines = (workdir / "eval.jsonl").read_text().splitlines()
    assert len(lines) == 2  # Appended: the first result is kept.
    rec = json.loads(lines[-1])
    assert [row["split"] for row in rec["text"]] == ["train", "val", "all"]
    bad_invocation([*cmd, "--config.model.d_model=64"], "only --config.mesh", protect=[workdir])
    bad_invocation([*cmd, "--seq_len=1000"], "learned positions", protect=[workdir])
    bad_invocation([*cmd, "--task=nonexistent_task"], "nonexistent_task", protect=[workdir])
    bad_invocation([*cmd, "--stride=0"], "--stride", protect=[workdir])
    bad_invocation([*cmd, "--split=test"], "--split", protect=[workdir])
    out = tmp_path / "new" / "folder" / "results.jsonl"  # Made when the results are written.
    r = subprocess.run([*cmd, f"--out={out}", "--per_position"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and len(out.read_text().splitlines()) == 1, r.stderr
    (val,) = json.loads(out.read_text())["text"]
    seq_len = json.loads((workdir / "config.json").read_text())["data"]["seq_len"]
    assert len(val["per_position"]) == seq_len and val["per_position_windows"] > 0
    # Whole windows, each position once: their mean is close to the split's loss (which also
    # scores the last, partial window).
    assert abs(sum(val["per_position"]) / seq_len - val["loss"]) < 0.1
    assert "loss by context length" in r.stdout
    bad_invocation([sys.executable, "-m", "gpt_jax.evaluate"], "--workdir")


def _write_task(path) -> None:
    """A multiple-choice task in the conftest corpus's alphabet: which constant ends the line."""
    lines = [json.dumps({"task": "consts", "delimiter": ""})]
    for i in range(12):
        context = f"def f{i}(x):\n    return x * {i} + "
        choices = [str(i % 7), str((i + 3) % 7)]
        lines.append(json.dumps({"context": context, "choices": choices, "label": 0,
                                 "split": "train" if i < 4 else "test"}))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_train_eval_tasks_are_logged_at_every_eval(tiny_config, tmp_path, metrics_rows):
    from gpt_jax.config import ConfigError
    from gpt_jax.training import loop

    task = tmp_path / "consts.jsonl"
    _write_task(task)
    c = tiny_config(**{"train.num_steps": 4, "train.eval_every": 2, "train.final_eval": "none",
                       "optim.warmup_steps": 1,
                       "train.eval_tasks": str(task), "train.eval_tasks_fewshot": 1,
                       "train.eval_tasks_limit": 0, "sample.num_samples": 0})
    loop.run(c, tmp_path / "run")
    evals = [r for r in metrics_rows(tmp_path / "run") if "val/loss" in r]
    assert [r["step"] for r in evals] == [0, 2]  # No final eval: final_eval=none.
    for r in evals:
        assert 0 <= r["tasks/consts/acc"] <= 1 and r["tasks/consts/acc_stderr"] > 0
        assert "tasks/consts/acc_norm" in r
    c.train.eval_tasks = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="train.eval_tasks"):
        loop.run(c, tmp_path / "run2")
    assert not (tmp_path / "run2" / "checkpoints").exists()


@pytest.mark.slow
def test_sample_puts_a_tasks_examples_before_the_prompt(trained_run, tmp_path, bad_invocation):
    task = tmp_path / "consts.jsonl"
    _write_task(task)
    cmd = [sys.executable, "-m", "gpt_jax.sample", f"--workdir={trained_run}",
           "--max_new_tokens=3", "--temperature=0"]
    r = subprocess.run([*cmd, f"--task={task}", "--num_fewshot=2", "--prompt=def f9(x):"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    shots = [line for line in r.stdout.splitlines() if line.startswith("    return x * ")]
    assert len(shots) >= 2  # Two train examples, each "context" + "answer", then the prompt.
    assert "def f9(x):" in r.stdout
    bad_invocation([*cmd, "--num_fewshot=2"], "--task")
    bad_invocation([*cmd, f"--task={task}", "--num_fewshot=9"], "at most 4")


@pytest.mark.slow
def test_a_mesh_of_four_devices_gives_the_single_device_numbers(trained_run, tmp_path):
    """--config.mesh.* as in training: the same run scored on 2 (fsdp) × 2 (tensor) simulated
    devices gives the single device's loss (to float32 summation order) and the same accuracy."""
    import os

    task = tmp_path / "consts.jsonl"
    _write_task(task)
    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir)
    results = []
    for devices, mesh in ((1, []), (4, ["--config.mesh.fsdp=2", "--config.mesh.tensor=2"])):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        out = tmp_path / f"{devices}.jsonl"
        r = subprocess.run([sys.executable, "-m", "gpt_jax.evaluate", f"--workdir={workdir}",
                            f"--data={trained_run.parent / 'corpus.txt'}", "--split=val",
                            f"--task={task}", f"--out={out}", *mesh],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        assert f"{devices} device(s)" in r.stdout
        results.append(json.loads(out.read_text()))
    one, four = results
    assert four["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert four["text"][0]["loss"] == pytest.approx(one["text"][0]["loss"], rel=1e-6)
    assert four["tasks"][0]["acc"] == one["tasks"][0]["acc"]


@pytest.mark.slow
def test_a_distributed_mesh_is_joined_before_the_checkpoint_is_read(trained_run, tmp_path):
    """--config.mesh.distributed=on: jax.distributed starts before Orbax touches jax (one
    process here; its coordinator on a free port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "gpt_jax.evaluate", f"--workdir={trained_run}",
                        f"--out={tmp_path / 'r.jsonl'}", "--config.mesh.distributed=on",
                        f"--config.mesh.coordinator_address=127.0.0.1:{port}",
                        "--config.mesh.num_processes=1", "--config.mesh.process_id=0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r.jsonl").read_text())["text"][0]["loss"] == (
        _final_full_val_loss(trained_run))
