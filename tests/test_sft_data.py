"""SFT data (gpt_jax/data/sft.py): JSONL and chat records, bad records, the loss weights on
completion targets, the task file agreeing with training's tokens, padded and packed batches,
the Grain stream's determinism and resume, the prepare CLI's --sft, the loss mask through the
real loss and its gradients, and (slow) fine-tuning runs that log the folder's task and resume
bitwise."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from gpt_jax.data import sft, tokenizers
from gpt_jax.eval import tasks as tasks_lib
from gpt_jax.training import step

T = 24  # data.seq_len of these tests.
PREPARE = [sys.executable, "-m", "gpt_jax.data.prepare"]


def _records(n: int = 40) -> list[dict]:
    """Reversal records of varied lengths, every fifth a two-turn chat."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        word = "".join(rng.choice(list("abcdefg"), size=int(rng.integers(1, 12))))
        if i % 5 == 4:
            out.append({"messages": [{"role": "user", "content": word},
                                     {"role": "assistant", "content": word[::-1]},
                                     {"role": "user", "content": "again"},
                                     {"role": "assistant", "content": word}]})
        else:
            out.append({"q": f"rev {word}:", "a": word[::-1]})
    return out


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    return path


@pytest.fixture
def val_records(jsonl):
    """The val records of `folder`, read again."""
    return sft.split_records(sft.read_jsonl(jsonl, "q", "a"), 0.25)[1]


@pytest.fixture
def folder(jsonl, tmp_path):
    train, val = sft.split_records(sft.read_jsonl(jsonl, "q", "a"), 0.25)
    return sft.prepare(train, val, tmp_path / "prepared", "test", tokenizer_name="char")


def _base_with(tok: tokenizers.Tokenizer, path) -> str:
    """A stand-in base run's workdir: just its tokenizer.json (all --tokenizer_from reads)."""
    path.mkdir()
    tokenizers.save_tokenizer(tok, path / "tokenizer.json")
    return str(path)


def test_records_render_prompt_completion_and_chat_with_loss_on_answers():
    pc = {"prompt": "1+2=", "completion": "3"}
    assert sft.pieces(pc, newline_end=True) == [("1+2=", False), ("3\n", True)]
    assert sft.pieces(pc, newline_end=False) == [("1+2=", False), ("3", True)]
    # A prompt's trailing whitespace is target (lm-eval's encode_pair puts it there).
    spaced = {"prompt": "Q: 1+2\nA: \n", "completion": "3"}
    assert sft.pieces(spaced, True) == [("Q: 1+2\nA:", False), (" \n3\n", True)]
    assert sft.task_example(spaced, False) == {"context": "Q: 1+2\nA:", "target": " \n3"}
    assert sft.pieces({"prompt": "  ", "completion": "3"}, False) == [("  3", True)]
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "bye"},
                         {"role": "assistant", "content": "ciao"},
                         {"role": "user", "content": "dropped"}]}
    assert sft.pieces(chat, True) == [
        ("system: be brief\nuser: hi\nassistant:", False), (" hello\n", True),
        ("user: bye\nassistant:", False), (" ciao\n", True)]
    assert sft.task_example(chat, True) == {
        "context": "system: be brief\nuser: hi\nassistant: hello\nuser: bye\nassistant:",
        "target": " ciao\n"}
    ids, mask = sft.encode(tokenizers.ByteTokenizer(), chat)
    text = "".join(t for t, _ in sft.pieces(chat, True))
    assert bytes(ids.tolist()).decode() == text
    assert bytes(ids[mask == 1].tolist()).decode() == " hello\n ciao\n"


def test_builtin_tasks_are_prompts_with_the_tasks_answers():
    train, val = sft.task_records("addition", 50, 0)
    assert len(train) == 50 and len(val) == 100
    for r in train + val:
        a, b = r["prompt"].removesuffix("=").split("+")
        assert r["completion"] == str(int(a) + int(b))
    train, _ = sft.task_records("sort", 5, 0)
    for r in train:
        words = r["prompt"].removeprefix("sort ").removesuffix("=").split()
        assert r["completion"] == " ".join(sorted(w for w in words if w.isdigit()))


def test_end_of_text_tokenizers_end_each_example_with_it_in_the_loss():
    tok = tokenizers.build_tokenizer("bpe", ["1+2=3 " * 50], 300)
    ids, mask = sft.encode(tok, {"prompt": "1+2=", "completion": "3"})
    assert ids[-1] == tok.eot_id and mask[-1] == 1
    assert tok.decode(ids[:-1]) == "1+2=3" and mask[:len(tok.encode("1+2="))].sum() == 0


def _bpe() -> tokenizers.Tokenizer:
    """A small bpe whose " abcd" and " abcdab" are one token each."""
    return tokenizers.build_tokenizer("bpe", ["xy: abcd abcdab\n" * 300], 280)


def test_task_targets_score_exactly_the_tokens_training_trains(tmp_path):
    tok = _bpe()
    assert len(tok.encode(" abcd")) == 1 and len(tok.encode("abcd")) > 1  # The control.
    records = [{"prompt": f"xy{i}: ", "completion": "abcd"} for i in range(6)]
    folder = sft.prepare(records[:3], records[3:], tmp_path / "sft", "test",
                         tokenizer_from=_base_with(tok, tmp_path / "base"))
    data, task = sft.open_folder(folder), tasks_lib.load_task_file(folder / sft.TASK_FILE)
    assert sft.read_meta(folder)["task"]["excluded"] == 0 and len(task.test) == 3
    for i, example in enumerate(task.test):
        assert (example.context, example.target) == (f"xy{3 + i}:", " abcd")
        _, scored = tasks_lib.encode_pair(tok, example.context, example.target, "test")
        ids, mask = data.val.example(i)
        np.testing.assert_array_equal(scored, ids[mask == 1][:-1])  # Less the end of text.
        assert tok.decode(scored) == " abcd"


def test_records_the_harness_tokenizes_otherwise_are_left_out_of_the_task(tmp_path, caplog):
    base = _base_with(_bpe(), tmp_path / "base")
    good = [{"prompt": f"xy{i}:", "completion": " abcd"} for i in range(3)]
    merged = [{"prompt": "xy ab", "completion": "cdab"},  # " abcdab": nothing left to score.
              {"prompt": "xy a", "completion": "bcd abcd"}]  # Scored " abcd", trained "bcd"…
    folder = sft.prepare(good, [good[0], merged[0], good[1], merged[1]], tmp_path / "sft", "t",
                         tokenizer_from=base)
    task = tasks_lib.load_task_file(folder / sft.TASK_FILE)
    assert [e.context for e in task.test] == ["xy0:", "xy1:"]
    assert sft.read_meta(folder)["task"] == {"file": sft.TASK_FILE, "test": 2, "train": 3,
                                             "excluded": 2}
    assert "2 of 4 val examples left out" in caplog.text
    assert sft.read_meta(folder)["splits"]["val"]["examples"] == 4  # Training keeps them all.
    with pytest.raises(ValueError, match="only 1 of 3 val records"):
        sft.prepare(good, [good[0], *merged], tmp_path / "few", "t", tokenizer_from=base)
    assert not (tmp_path / "few").exists()


@pytest.mark.parametrize("line, words", [
    ("not json", ["sft.jsonl:2", "not JSON"]),
    ('["a list"]', ["sft.jsonl:2", "no JSON object"]),
    ('{"q": "x"}', ["sft.jsonl:2", "'a'", "--completion_field"]),
    ('{"q": "", "a": "y"}', ["sft.jsonl:2", "'q'"]),
    ('{"messages": "hi"}', ["sft.jsonl:2", "role"]),
    ('{"messages": [{"role": "user", "content": "hi"}]}', ["sft.jsonl:2", "assistant"]),
])
def test_a_bad_record_is_one_line_naming_file_line_and_fix(tmp_path, line, words):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"q": "a", "a": "b"}\n' + line + "\n")
    with pytest.raises(ValueError) as e:
        sft.read_jsonl(path, "q", "a")
    assert "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no records"):
        sft.read_jsonl(path)
    with pytest.raises(ValueError, match="at least 3"):
        sft.split_records([{"prompt": "a", "completion": "b"}] * 2, 0.1)


@pytest.mark.parametrize("line, words", [
    (b'{"q": "caf\xe9", "a": "b"}', ["sft.jsonl:3 is not UTF-8", "fix or drop it"]),
    (b'{"q": "\\ud800x", "a": "b"}', ["sft.jsonl:3", "lone surrogate", "fix or drop it"]),
])
def test_text_that_is_no_unicode_is_named_by_its_line(tmp_path, line, words):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(b'{"q": "a", "a": "b"}\n\n' + line + b"\n")
    with pytest.raises(ValueError) as e:
        sft.read_jsonl(path, "q", "a")
    assert "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_a_record_the_tokenizer_cannot_encode_is_named(tmp_path):
    base = _base_with(tokenizers.CharTokenizer.from_text("abc:\n"), tmp_path / "base")
    records = [{"prompt": "ab:", "completion": "c"}] * 3
    bad = {"prompt": "a" * 50 + "é:", "completion": "c"}
    for train, val, words in [
        (records, [records[0], bad], ["val split's record 1", repr("a" * 40), "'é'",
                                      "drop or fix the record"]),
        ([records[0], {"prompt": "a\ud800", "completion": "c"}], records,
         ["train split's record 1", "lone surrogate", "fix or drop the record"]),
    ]:
        with pytest.raises(ValueError) as e:
            sft.prepare(train, val, tmp_path / "out", "t", tokenizer_from=base)
        assert "\n" not in str(e.value)
        for word in words:
            assert word in str(e.value)
        assert not (tmp_path / "out").exists()


def test_folder_stores_weights_exactly_on_completion_tokens_and_a_task(folder, jsonl):
    data = sft.open_folder(folder)
    meta = sft.read_meta(folder)
    assert (meta["kind"], meta["end"], meta["task"]["excluded"]) == ("sft", "newline", 0)
    records = sft.read_jsonl(jsonl, "q", "a")
    train, val = sft.split_records(records, 0.25)
    assert (len(data.train), len(data.val)) == (len(train), len(val)) == (30, 10)
    tok = data.tokenizer
    for i, r in enumerate(train):
        ids, mask = data.train.example(i)
        want = np.concatenate([np.full(len(tok.encode(t)), w) for t, w in sft.pieces(r, True)])
        assert tok.decode(ids) == "".join(t for t, _ in sft.pieces(r, True))
        np.testing.assert_array_equal(mask, want)
    task = tasks_lib.load_task_file(data.task_file)
    assert (task.name, task.kind, task.delimiter) == ("sft", "completion", "")
    assert len(task.test) == 10 and 0 < len(task.train) <= sft.FEWSHOT_POOL
    assert (task.test[0].context, task.test[0].target) == (val[0]["prompt"], val[0]["completion"] + "\n")
    # Same records and tokenizer: reused; anything else in the folder: refused, untouched.
    assert sft.prepare(train, val, folder, "test", tokenizer_name="char") == folder
    with pytest.raises(FileExistsError, match="already holds other SFT data"):
        sft.prepare(train[1:], val, folder, "test", tokenizer_name="char")


def test_training_reads_one_sft_folder_without_document_masks(folder, tiny_config):
    from gpt_jax import config as config_lib
    from gpt_jax.config import ConfigError
    from gpt_jax.data import training_data
    from gpt_jax.training import build

    def config(**overrides):
        return tiny_config(**{"data.path": None, "data.prepared": str(folder), **overrides})

    data = build.load_data(config())
    assert isinstance(data, sft.SftData) and data.vocab_size == data.tokenizer.vocab_size
    assert training_data.prepared_vocab_size(str(folder)) == data.vocab_size
    with pytest.raises(ConfigError, match="no mixtures"):
        build.load_data(config(**{"data.prepared": f"{folder},{folder}"}))
    with pytest.raises(ConfigError, match="data.document_mask=False"):
        build.load_data(config(**{"data.document_mask": True}))
    with pytest.raises(ConfigError, match="data.sft_packing=padded"):
        build.load_data(config(**{"data.sft_packing": "packed", "finetune.prompt_tokens": 4}))
    with pytest.raises(ConfigError, match="data.sft_packing='zipped' is not one of"):
        config_lib.validate(config(**{"data.sft_packing": "zipped"}))


def test_task_metrics_name_the_failing_task_file_and_refuse_two_sft_tasks(folder, jsonl,
                                                                           tiny_config, tmp_path):
    import types

    from gpt_jax.config import ConfigError
    from gpt_jax.training.task_metrics import TaskMetrics

    data = sft.open_folder(folder)
    other = sft.prepare(*sft.split_records(sft.read_jsonl(jsonl, "q", "a"), 0.5),
                        tmp_path / "other", "other", tokenizer_name="char")

    def task_metrics(**overrides):
        run = types.SimpleNamespace(config=tiny_config(**overrides))  # All __init__ reads.
        return TaskMetrics(run, data.tokenizer, [data.task_file])

    assert [t.name for t in task_metrics(**{"train.eval_tasks_limit": 0}).tasks] == ["sft"]
    for overrides, words in [
        ({"train.eval_tasks_fewshot": sft.FEWSHOT_POOL + 1}, [f"the task file {data.task_file}",
                                                            "ask for at most"]),
        ({"train.eval_tasks": str(other / sft.TASK_FILE)},
         [f"train.eval_tasks ({other / sft.TASK_FILE})", data.task_file, "'sft'", "overwrite"]),
    ]:
        with pytest.raises(ConfigError) as e:
            task_metrics(**overrides)
        assert "\n" not in str(e.value)
        for word in words:
            assert word in str(e.value)


def _independent_weights(data: sft.SftData, records: list[dict], i: int) -> np.ndarray:
    """Weights of val example i alone in a row, from its record (sft.encode, not the folder):
    1 where the target (token j + 1) is a completion token."""
    ids, mask = sft.encode(data.tokenizer, records[i])
    np.testing.assert_array_equal(ids, data.val.example(i)[0])
    n = min(len(ids), T + 1)
    out = np.zeros(T, np.float32)
    out[:n - 1] = mask[1:n]
    return out


def _in_rows(rows: sft.SftRows) -> list[int]:
    return sorted(i for r in range(len(rows)) for i in rows.examples(r))


def test_padded_rows_cut_pad_and_weigh_completion_targets(folder, val_records):
    data = sft.open_folder(folder)
    rows = sft.val_rows(data, T, "padded")
    # Left out: exactly the examples with no completion token in their first T + 1 tokens (the
    # long chats); cut: the other long ones.
    lengths = np.diff(data.val.offsets)
    weighted = [i for i in range(len(data.val))
                if _independent_weights(data, val_records, i).any()]
    assert _in_rows(rows) == weighted and len(weighted) < len(data.val)
    assert any(lengths[i] > T + 1 for i in weighted)
    for r in range(len(rows)):
        row, (i,) = rows[r], rows.examples(r)
        ids, _ = data.val.example(i)
        n = min(len(ids), T + 1)
        assert set(row) == {"inputs", "targets", "weights"}
        np.testing.assert_array_equal(row["inputs"][:n - 1], ids[:n - 1])
        np.testing.assert_array_equal(row["targets"][:n - 1], ids[1:n])
        np.testing.assert_array_equal(row["weights"], _independent_weights(data, val_records, i))
        assert row["weights"].sum() > 0


def test_packed_rows_keep_examples_apart_and_restart_positions(folder):
    data = sft.open_folder(folder)
    rows = sft.SftRows(data.train, T, "packed", "train", seed=3)
    padded = sft.SftRows(data.train, T, "padded", "train")
    assert len(rows) < len(padded)
    assert _in_rows(rows) == _in_rows(padded)
    for r in range(len(rows)):
        row, at = rows[r], 0
        for segment, i in enumerate(rows.examples(r)):
            ids, mask = data.train.example(i)
            n = min(len(ids), T + 1)
            span = slice(at, at + n - 1)  # Its targets within the example.
            np.testing.assert_array_equal(row["inputs"][at:at + n][:T - at], ids[:n][:T - at])
            np.testing.assert_array_equal(row["targets"][span], ids[1:n])
            np.testing.assert_array_equal(row["weights"][span], mask[1:n])
            assert (row["segment_ids"][at:at + n][:T - at] == segment).all()
            assert row["positions"][at:at + n][:T - at].tolist() == list(range(n))[:T - at]
            if at + n - 1 < T:  # The next example's first token is never a weighted target.
                assert row["weights"][at + n - 1] == 0
            at += n
        if at < T:  # Padding: a segment of its own, no weight.
            assert (row["segment_ids"][at:] == len(rows.examples(r))).all()
            assert not row["weights"][at:].any()


def test_examples_without_completion_in_the_row_are_left_out(folder):
    data = sft.open_folder(folder)
    with pytest.raises(ValueError, match="raise data.seq_len"):
        sft.SftRows(data.val, 2, "padded", "val")  # Every prompt is longer than 2 tokens.
    with pytest.raises(ValueError, match="sft_packing"):
        sft.SftRows(data.val, T, "zipped", "val")


@pytest.mark.parametrize("packing", ["padded", "packed"])
def test_train_stream_is_deterministic_resumable_and_sharded(folder, packing):
    data = sft.open_folder(folder)

    def stream(seed=7, shard=0, count=1):
        return iter(sft.train_dataset(data, T, 4, seed, shard, count, 1, 2, packing))

    def take(it, n):
        return [next(it) for _ in range(n)]

    whole = take(stream(), 12)  # More than one epoch of rows.
    for a, b in zip(whole, take(stream(), 12), strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert any((a["inputs"] != b["inputs"]).any() for a, b in
               zip(whole, take(stream(seed=8), 12), strict=True))
    it = stream()
    take(it, 5)
    resumed = stream()
    resumed.set_state(it.get_state())
    for k, v in next(resumed).items():
        np.testing.assert_array_equal(v, whole[5][k])
    halves = [take(stream(shard=i, count=2), 12) for i in (0, 1)]
    for b, (top, bottom) in enumerate(zip(*halves, strict=True)):
        np.testing.assert_array_equal(np.concatenate([top["inputs"], bottom["inputs"]]),
                                      whole[b]["inputs"])
    assert set(whole[0]) == set(sft.batch_spec(4, T, packing))
    for k, (shape, dtype) in sft.batch_spec(4, T, packing).items():
        assert whole[0][k].shape == shape and whole[0][k].dtype == dtype


def test_eval_batches_cover_every_val_completion_token_once(folder, val_records):
    data = sft.open_folder(folder)
    for packing in sft.PACKINGS:
        rows = sft.val_rows(data, T, packing)
        batches = list(sft.eval_batches(rows, 4, None))
        total = sum(b["weights"].sum() for b in batches)
        assert total == sum(_independent_weights(data, val_records, i).sum()
                            for i in range(len(data.val)))
        assert len(batches) == -(-len(rows) // 4)
        assert not batches[-1]["weights"][len(rows) - 4 * (len(batches) - 1):].any()  # Padding rows.
        assert len(list(sft.eval_batches(rows, 4, 1))) == 1


def _model_and_batch(folder, tiny_gpt, packing):
    data = sft.open_folder(folder)
    _, model, params = tiny_gpt(vocab_size=data.vocab_size, seq_len=T)
    batch = next(sft.eval_batches(sft.val_rows(data, T, packing), 8, 1))
    return data, model, params, batch


def test_changing_a_prompt_tokens_target_changes_neither_loss_nor_gradients(folder, tiny_gpt):
    data, model, params, batch = _model_and_batch(folder, tiny_gpt, "padded")
    val_rows = sft.val_rows(data, T, "padded")
    # Prompt targets: inside each row's example (not its padding), of weight 0.
    prompt_BT = np.zeros_like(batch["weights"], bool)
    for b in range(min(len(batch["weights"]), len(val_rows))):  # Rows past them: padding.
        (i,) = val_rows.examples(b)
        n = min(len(data.val.example(i)[0]), T + 1)
        prompt_BT[b, :n - 1] = batch["weights"][b, :n - 1] == 0
    assert prompt_BT.sum() > 8
    eval_step = step.make_eval_step(model)

    @jax.jit
    def sums_and_grads(params, batch):
        """The eval step's (Σ w·ℓ, Σ w), and the gradients of the train step's objective, their
        ratio (training/step.py's model_loss either way): one compiled program."""
        def mean(p):
            total, count = eval_step(p, batch)
            return total / count, (total, count)
        (_, sums), grads = jax.value_and_grad(mean, has_aux=True)(params)
        return sums, grads

    sums, grads = sums_and_grads(params, batch)
    rng = np.random.default_rng(0)
    for _ in range(3):
        changed = {k: v.copy() for k, v in batch.items()}
        rows, cols = np.nonzero(prompt_BT)
        pick = rng.choice(len(rows), size=4, replace=False)
        changed["targets"][rows[pick], cols[pick]] = rng.integers(0, data.vocab_size, size=4)
        assert (changed["targets"] != batch["targets"]).any()
        changed_sums, changed_grads = sums_and_grads(params, changed)
        assert tuple(map(float, changed_sums)) == tuple(map(float, sums))
        jax.tree.map(np.testing.assert_array_equal, changed_grads, grads)
    weighted = {k: v.copy() for k, v in batch.items()}  # Control: a completion target does.
    rows, cols = np.nonzero(batch["weights"])
    weighted["targets"][rows[0], cols[0]] = (batch["targets"][rows[0], cols[0]] + 1) % 10
    weighted_sums, weighted_grads = sums_and_grads(params, weighted)
    assert float(weighted_sums[0]) != float(sums[0])
    assert any((np.asarray(a) != np.asarray(b)).any() for a, b in zip(
        jax.tree.leaves(weighted_grads), jax.tree.leaves(grads), strict=True))


@pytest.mark.parametrize("packing", ["padded", "packed"])
def test_loss_is_the_mean_over_completion_tokens_computed_independently(folder, tiny_gpt,
                                                                         val_records, packing):
    data, model, params, batch = _model_and_batch(folder, tiny_gpt, packing)
    total, count = step.make_eval_step(model)(params, batch)
    # Each val example alone, from position 0, in float64: the log-probability of each of its
    # completion tokens (from the record itself through sft.encode, not the folder's mask or the
    # batch's weights).
    rows = sft.val_rows(data, T, packing)
    examples = [i for r in range(min(8, len(rows))) for i in rows.examples(r)]
    encoded = {i: sft.encode(data.tokenizer, val_records[i]) for i in examples}
    alone_BT = np.zeros((len(examples), T), np.int32)  # Each example alone from position 0.
    for b, i in enumerate(examples):
        ids = encoded[i][0][:T]
        alone_BT[b, :len(ids)] = ids  # Zeros after it: a causal model's logits ignore them.
    logits_BTV = np.asarray(model.apply({"params": params}, alone_BT), np.float64)
    shifted_BTV = logits_BTV - logits_BTV.max(-1, keepdims=True)
    logp_BTV = shifted_BTV - np.log(np.exp(shifted_BTV).sum(-1, keepdims=True))
    losses = []
    for b, i in enumerate(examples):
        ids, mask = (a[:T + 1] for a in encoded[i])
        for j in np.flatnonzero(mask[1:]):
            losses.append(-logp_BTV[b, j, ids[j + 1]])
    assert float(count) == len(losses)
    np.testing.assert_allclose(float(total) / float(count), np.mean(losses), rtol=2e-6)


def test_prepare_cli_makes_an_sft_folder(jsonl, tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([*PREPARE, "--sft", f"--source={jsonl}", "--prompt_field=q",
                        "--completion_field=a", "--tokenizer=byte", f"--out={out}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "36 train and 4 val examples" in r.stdout and "task.jsonl" in r.stdout
    assert sft.open_folder(out).tokenizer.name == "byte"


@pytest.mark.slow  # Ten CLI processes (~15 s).
def test_prepare_cli_refuses_bad_input(jsonl, tmp_path, bad_invocation):
    x, made, empty = tmp_path / "x", tmp_path / "made", tmp_path / "empty.jsonl"
    empty.write_text("\n")
    source, fields = [*PREPARE, "--sft", f"--source={jsonl}"], ["--prompt_field=q",
                                                                 "--completion_field=a"]
    sft.prepare(*sft.split_records(sft.read_jsonl(jsonl, "q", "a"), 0.1), made, str(jsonl),
                tokenizer_name="byte")
    for argv, words in [
        ([*source, "--tokenizer=byte"], ["sft.jsonl:1", "text field 'prompt'"]),
        ([*source, "--tokenizer=byte", f"--tokenizer_from={tmp_path}"],
         ["one of --tokenizer_from"]),
        ([*source, *fields, f"--tokenizer_from={tmp_path}"], ["tokenizer.json does not exist"]),
        ([*source, *fields, f"--tokenizer_from={tmp_path}", "--vocab_size=300"],
         ["drop --vocab_size"]),
        ([*source, "--task=addition", "--tokenizer=byte"], ["one of --source"]),
        ([*PREPARE, "--sft", "--task=addition", "--val_fraction=0.2", "--tokenizer=byte"],
         ["leave out --val_fraction"]),
        ([*PREPARE, "--sft", f"--source={tmp_path / 'none.jsonl'}", "--tokenizer=byte"],
         ["does not exist"]),
        ([*PREPARE, "--sft", f"--source={empty}", "--tokenizer=byte"], ["holds no records"]),
        ([*PREPARE, f"--source={jsonl}", "--tokenizer_from=w", "--tokenizer=byte"],
         ["only --sft takes them"]),
    ]:
        bad_invocation([*argv, f"--out={x}"], *words, absent=[x])
    bad_invocation([*source, *fields, "--tokenizer=char", f"--out={made}"],
                   "already holds other SFT data", protect=[made])


@pytest.mark.slow  # Two tiny training runs (~1 min).
def test_finetuning_from_a_run_logs_the_folders_task(tiny_config, tmp_path, metrics_rows):
    from gpt_jax.training import loop

    base = tmp_path / "base"
    short = {"train.num_steps": 4, "optim.warmup_steps": 1, "sample.num_samples": 0}
    loop.run(tiny_config(**short, **{"data.tokenizer": "byte", "train.eval_every": 4}), base)
    train, val = sft.task_records("addition", 60, 0)
    folder = sft.prepare(train, val[:10], tmp_path / "sft", "addition", tokenizer_from=str(base))
    for packing in sft.PACKINGS:
        run = tmp_path / f"sft_{packing}"
        config = tiny_config(**{"data.path": None, "data.prepared": str(folder),
                                "data.sft_packing": packing, "checkpoint.init_from": str(base),
                                "train.eval_every": 2, "train.eval_tasks_limit": 5, **short})
        result = loop.run(config, run)
        assert 0 <= result["tasks/sft/exact_match"] <= 1
        evals = [r for r in metrics_rows(run) if "val/loss" in r]
        assert [r["step"] for r in evals] == [0, 2, 4]
        assert all("tasks/sft/exact_match" in r for r in evals)
        assert evals[-1]["val/split"] == "full"


@pytest.fixture(scope="module")
def sft_configs(tmp_path_factory, small_run):
    """make(packing, **overrides) → the config of a tiny SFT run (addition, 20 train examples:
    6 steps cross epochs) from a 4-step byte-level base run; the schedule's length is fixed
    (optim.decay_steps), so it does not depend on train.num_steps."""
    from gpt_jax.training import loop

    root = tmp_path_factory.mktemp("sft_resume")

    def config(**overrides):
        return small_run(root, **{"data.tokenizer": "byte", "data.seq_len": 32,
                                  "train.num_steps": 4, "train.eval_every": 6,
                                  "train.eval_tasks_limit": 2, **overrides})

    loop.run(config(), root / "base")
    train, val = sft.task_records("addition", 20, 0)
    folder = sft.prepare(train, val[:10], root / "sft", "addition",
                         tokenizer_from=str(root / "base"))

    def make(packing: str, **overrides):
        return config(**{"data.path": None, "data.prepared": str(folder),
                         "data.sft_packing": packing, "checkpoint.init_from": str(root / "base"),
                         "train.num_steps": 6, **overrides})

    return make


@pytest.mark.slow  # Three tiny SFT runs each (~1 min).
@pytest.mark.parametrize("packing", sft.PACKINGS)
def test_an_sft_run_resumes_bitwise(sft_configs, tmp_path, packing, metrics_rows):
    """6 SFT steps straight equal 3 steps, a stop, and 3 more: same train loss, same params."""
    from gpt_jax.training import loop, weights

    straight = loop.run(sft_configs(packing), tmp_path / "straight")
    loop.run(sft_configs(packing, **{"train.num_steps": 3}), tmp_path / "resumed")
    again = loop.run(sft_configs(packing), tmp_path / "resumed")
    evals = [r["step"] for r in metrics_rows(tmp_path / "resumed") if "val/loss" in r]
    assert evals == [0, 3, 6]  # The second run went on from step 3, not from the base.
    assert again["train/loss"] == straight["train/loss"]
    a, b = (weights.load_trained(tmp_path / w)[2] for w in ("straight", "resumed"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
