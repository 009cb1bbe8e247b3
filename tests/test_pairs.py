"""Sequence pairs: the built-in tasks, JSONL reading, the prepared pairs folder, the Grain
pipeline (layout, determinism, resume, per-process shards), eval batches, decoded-output metrics
and the prepare CLI's --pairs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu

from gpt_jax.data import pairs, tasks
from gpt_jax.training import decoded


@pytest.fixture
def jsonl(tmp_path):
    """A JSONL file of 50 reversal pairs under the fields "src" / "tgt"."""
    rng = np.random.default_rng(0)
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as f:
        for _ in range(50):
            word = "".join(rng.choice(list("abcdefg"), size=int(rng.integers(1, 9))))
            f.write(json.dumps({"src": word, "tgt": word[::-1], "other": 1}) + "\n")
    return path


@pytest.fixture
def folder(jsonl, tmp_path):
    train, val = pairs.split_records(pairs.read_jsonl(jsonl, "src", "tgt"), 0.2)
    return pairs.prepare(train, val, "char", tmp_path / "prepared", "test")


@pytest.mark.parametrize("name", ["addition", "sort"])
def test_tasks_are_deterministic_correct_and_val_is_held_out(name):
    train, val = tasks.make(name, 500, seed=3)
    assert (train, val) == tasks.make(name, 500, seed=3)
    assert train != tasks.make(name, 500, seed=4)[0]
    assert len(train) == 500 and len(val) == 100
    assert not {r["source"] for r in train} & {r["source"] for r in val}
    assert len({r["source"] for r in val}) == len(val)
    for r in train + val:
        if name == "addition":
            a, b = r["source"].split("+")
            assert int(r["target"]) == int(a) + int(b)
        else:
            numbers = [t for t in r["source"].split() if t.isdigit()]
            assert r["target"].split() == sorted(numbers) and any(
                t.isalpha() for t in r["source"].split())


@pytest.mark.slow  # Parses the whole stdlib (~15 s).
def test_docsig_pairs_docstrings_with_their_signatures():
    train, val = tasks.make("docsig", 3000, seed=0)
    assert len(train) == 3000 and len(val) == 300
    assert all(r["target"].startswith(("def ", "async def ")) for r in train + val)
    assert {r["target"] for r in val} - {r["target"] for r in train}  # Unseen functions.


def test_a_bad_task_or_jsonl_line_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="task 'add' is not one of"):
        tasks.make("add", 10, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{"source": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no text field 'target'"):
        pairs.read_jsonl(bad, "source", "target")
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1 is not JSON"):
        pairs.read_jsonl(bad, "source", "target")


def test_prepared_folder_records_both_sides_and_is_reused_not_overwritten(jsonl, folder):
    data = pairs.open_folder(folder)
    records = pairs.read_jsonl(jsonl, "src", "tgt")
    assert (len(data.train), len(data.val)) == (40, 10)
    assert data.eos_id == data.tokenizer.vocab_size == data.vocab_size - 1  # char: an extra id.
    for i in (0, 7):
        source, target = data.val.example(i)
        assert data.tokenizer.decode(source) == records[40 + i]["source"]
        assert data.decode(np.r_[target, data.eos_id, 3]) == records[40 + i]["target"]
    lengths = np.diff(data.train.offsets, axis=0)
    assert lengths[:, 1].tolist() == [len(r["target"]) for r in records[:40]]
    before = (folder / "meta.json").read_bytes()
    train, val = pairs.split_records(records, 0.2)
    assert pairs.prepare(train, val, "char", folder, "again") == folder  # Up to date: kept.
    assert (folder / "meta.json").read_bytes() == before
    with pytest.raises(FileExistsError, match="already holds other pairs"):
        pairs.prepare(train[1:], val, "char", folder, "other")
    assert (folder / "meta.json").read_bytes() == before


def test_batches_teacher_force_with_loss_on_target_tokens_only(folder):
    data = pairs.open_folder(folder)
    S, T = 6, 9
    row = pairs.PairSource(data.val, data.eos_id, S, T, "val")[0]
    source, target = data.val.example(0)
    m, eos = len(target), data.eos_id
    assert row["inputs"][: m + 1].tolist() == [eos, *target]
    assert row["targets"][: m + 1].tolist() == [*target, eos]
    assert row["weights"].tolist() == [1.0] * (m + 1) + [0.0] * (T - m - 1)
    n = min(len(source), S)
    assert row["source"][:n].tolist() == source[:n].tolist() and row["source_mask"].sum() == n
    assert not row["source"][n:].any()


def test_train_stream_is_deterministic_resumable_and_sharded_like_one_process(folder):
    data = pairs.open_folder(folder)
    args = (data, 8, 9, 4, 7)

    def batches(it, n):
        return [next(it) for _ in range(n)]

    whole = batches(iter(pairs.train_dataset(*args, 0, 1, 1, 2)), 12)  # 12 × 4 > one epoch.
    again = batches(iter(pairs.train_dataset(*args, 0, 1, 1, 2)), 12)
    for a, b in zip(whole, again, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    it = iter(pairs.train_dataset(*args, 0, 1, 1, 2))
    batches(it, 5)
    state = it.get_state()
    resumed = iter(pairs.train_dataset(*args, 0, 1, 1, 2))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["targets"], whole[5]["targets"])
    halves = [batches(iter(pairs.train_dataset(*args, i, 2, 1, 2)), 12) for i in (0, 1)]
    for b, (top, bottom) in enumerate(zip(*halves, strict=True)):
        np.testing.assert_array_equal(np.concatenate([top["source"], bottom["source"]]),
                                      whole[b]["source"])
    # The first 10 batches are one epoch: every train example once.
    epoch = sorted(r.tobytes() for b in whole[:10] for r in b["targets"])
    source = pairs.PairSource(data.train, data.eos_id, 8, 9, "train")
    assert epoch == sorted(source[i]["targets"].tobytes() for i in range(len(source)))


def test_eval_batches_cover_every_val_example_once(folder):
    data = pairs.open_folder(folder)
    source = pairs.val_source(data, 8, 9)
    batches = list(pairs.eval_batches(source, 4, None))
    assert len(batches) == 3  # 10 examples: 4 + 4 + 2 and 2 rows of weight 0.
    weights = sum(b["weights"].sum() for b in batches)
    assert weights == sum(len(data.val.example(i)[1]) + 1 for i in range(10))
    assert not batches[-1]["weights"][2:].any()
    assert len(list(pairs.eval_batches(source, 4, 2))) == 2
    assert [t.tolist() for _, t in pairs.examples(source, 3)] == [
        data.val.example(i)[1].tolist() for i in range(3)]


def test_targets_that_do_not_fit_are_left_out_and_sources_cut(folder):
    data = pairs.open_folder(folder)
    longest = int(np.diff(data.val.offsets, axis=0)[:, 1].max())
    source = pairs.PairSource(data.val, data.eos_id, 2, longest, "val")  # Longest + EOS: no.
    assert 0 < len(source) < len(data.val)
    assert all(source[i]["source_mask"].sum() <= 2 for i in range(len(source)))
    with pytest.raises(ValueError, match="raise data.seq_len"):
        pairs.PairSource(data.val, data.eos_id, 2, 1, "val")


def test_decoded_metrics_match_a_hand_count_and_sacrebleu():
    refs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6])]
    preds = [np.array([1, 2, 3]), np.array([4, 7, 5]), np.array([], int)]
    text = {1: "a", 2: "b", 3: "c", 4: "d", 5: "e", 6: "f", 7: "g"}

    def decode(ids):
        return " ".join(text[int(i)] for i in ids)

    m = decoded.decoded_metrics(preds, refs, decode)
    # Positions with their EOS: [1 2 3 E] all 4; [4 7 5 E] vs [4 5 E]: 1 of 3; [E] vs [6 E]: 0.
    assert m["val/token_acc"] == pytest.approx(5 / 9)
    assert m["val/exact_match"] == pytest.approx(1 / 3)
    hyps, references = [decode(p) for p in preds], [[decode(r) for r in refs]]
    assert m["val/bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, references).score)
    assert m["val/chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, references).score)
    with pytest.raises(ValueError, match="one per reference"):
        decoded.decoded_metrics(preds[:2], refs, decode)


@pytest.mark.slow  # Four CLI processes (~5 s).
def test_prepare_cli_makes_a_pairs_folder_and_refuses_bad_input(jsonl, tmp_path, bad_invocation):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "gpt_jax.data.prepare", "--pairs", f"--source={jsonl}",
           "--source_field=src", "--target_field=tgt", "--tokenizer=byte", f"--out={out}",
           "--val_fraction=0.2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "40 train and 10 val pairs" in r.stdout
    data = pairs.open_folder(out)
    assert (data.eos_id, data.vocab_size) == (256, 257)
    bad_invocation([*cmd[:4], f"--source={jsonl}", "--tokenizer=byte", f"--out={tmp_path / 'x'}"],
                   "has no text field 'source'", absent=[tmp_path / "x"])
    bad_invocation([*cmd[:-3], "--tokenizer=char", f"--out={out}"], "already holds other pairs",
                   protect=[out])
    bad_invocation([*cmd[:4], "--task=addition", *cmd[4:]], "one of --source")
