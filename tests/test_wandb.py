"""Optional Weights & Biases logging (log.wandb): its settings are checked up front, and an
offline run's records (read back from its .wandb file) match metrics.jsonl, a resume included."""

import importlib.util
import json
import os
import pathlib
import struct
import subprocess

import pytest

from configs import base
from gpt_jax import config as config_lib
from gpt_jax.training import wandb_sink


def test_an_unknown_wandb_mode_is_refused_in_one_line():
    c = base.get_config()
    c.log.wandb_mode = "bogus"
    with pytest.raises(config_lib.ConfigError, match=r"log\.wandb_mode='bogus' is not one of") as e:
        config_lib.validate(c)
    assert "\n" not in str(e.value) and "offline" in str(e.value)


def test_missing_wandb_names_its_requirements_file(monkeypatch):
    assert wandb_sink.missing_problem() is None  # Installed (requirements-dev.txt).
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    problem = wandb_sink.missing_problem()
    assert "requirements-wandb.txt" in problem and "\n" not in problem
    c = base.get_config()
    config_lib.validate(c)  # log.wandb=False (the default) does not need it.
    c.log.wandb = True
    with pytest.raises(config_lib.ConfigError, match="requirements-wandb.txt"):
        config_lib.validate(c)


def wandb_records(path: pathlib.Path):
    """The Records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB's log
    format (32 KiB blocks of chunks: crc32, length, type FULL/FIRST/MIDDLE/LAST, data). wandb
    0.31 ships no Python reader of its own (wandb-core, in Go, writes and syncs the file)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # A block's trailer: too short for a chunk header.
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record.
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(path: pathlib.Path) -> tuple[str, list[dict]]:
    """(the run's id, its logged rows) from one offline run's .wandb file."""
    run_id, rows = None, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return run_id, rows


@pytest.mark.slow
def test_an_offline_run_logs_every_row_and_a_resume_continues_it(small_run, train_command,
                                                                  metrics_rows, tmp_path):
    """Two starts (6 steps, then resumed to 9): one wandb run id (WORKDIR/wandb_id), and its
    records hold metrics.jsonl's train and val losses per step, and the eval rows' `params`."""
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({k: str(tmp_path / "wandb_home" / k.lower()) for k in
                ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")})  # Not ~/.cache.
    for num_steps in (6, 9):
        c = small_run(tmp_path, **{"log.wandb": True, "log.wandb_mode": "offline", "log.every": 1,
                                   "train.num_steps": num_steps})
        r = subprocess.run(train_command(workdir, c), capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    run_id = (workdir / "wandb_id").read_text().strip()
    files = sorted(workdir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    logged = []
    for f in files:  # Named by start time: the first start's, then the resume's.
        file_id, rows = wandb_history(f)
        assert file_id == run_id
        logged += rows
    rows = metrics_rows(workdir)
    assert rows[-1]["step"] == 9
    for key in ("train/loss", "val/loss", "params"):
        want = [(r["step"], r[key]) for r in rows if key in r]
        assert want and want == [(r["step"], r[key]) for r in logged if key in r], key
    assert all(r["params"] > 0 for r in rows if "val/loss" in r)


@pytest.mark.slow
def test_a_run_from_scratch_gets_a_new_wandb_run(tmp_path, monkeypatch):
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    ids = []
    for resumed in (False, True, False):
        sink = wandb_sink.WandbSink(tmp_path, "t", "offline", {"a": 1}, resumed=resumed)
        sink.log(1, {"x": 1.0})
        sink.close()
        ids.append((tmp_path / wandb_sink.ID_FILE).read_text().strip())
    assert ids[0] == ids[1] != ids[2]
