"""tools/train_variants.py: the variants table's tool (its runs are ordinary training runs)."""

import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_only_a_run_that_reached_its_final_eval_counts_as_finished(tmp_path, tool):
    tool = tool("train_variants")
    (tmp_path / "config.json").write_text(json.dumps({"train": {"num_steps": 20}}))
    assert tool.finished(tmp_path) is None  # No metrics yet.
    rows = [{"step": 10, "val/loss": 2.0}, {"step": 20, "train/loss": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tool.finished(tmp_path) is None  # Killed before its final eval.
    rows.append({"step": 20, "val/loss": 1.4})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tool.finished(tmp_path) == rows


def test_every_variant_is_a_valid_config(tool):
    from configs import shakespeare_char
    from gpt_jax import config as config_lib

    for name, overrides in tool("train_variants").VARIANTS.items():
        c = shakespeare_char.get_config("cpu")
        for flag in overrides:
            key, value = flag.removeprefix("--config.").split("=")
            group, field = key.split(".")
            c[group][field] = ({"True": True, "False": False}[value] if value in ("True", "False")
                               else int(value) if value.isdigit() else value)
        config_lib.validate(c)  # Raises for a variant the model refuses.
        assert name


def test_an_unknown_variant_is_one_line(bad_invocation):
    bad_invocation([sys.executable, str(REPO / "tools" / "train_variants.py"), "--root=/tmp/x",
                    "--only=bogus"], "unknown variants", "gpt2")
