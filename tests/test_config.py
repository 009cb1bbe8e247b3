"""Configs: every recipe loads and validates, overrides work, typos and bad values fail clearly."""

import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest

from configs import base, gpt2, openwebtext, quickstart, shakespeare_char
from gpt_jax import config as config_lib
from gpt_jax.cli import unknown_config_key
from gpt_jax.models import registry
from gpt_jax.train import default_workdir

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "get_config,arg",
    [(quickstart.get_config, None), (shakespeare_char.get_config, "cpu"),
     (shakespeare_char.get_config, "gpu"), (openwebtext.get_config, None)]
    + [(gpt2.get_config, s) for s in gpt2.SIZES],
)
def test_recipes_validate(get_config, arg):
    config = get_config(arg)
    config_lib.validate(config)
    assert config_lib.from_json(config_lib.to_json(config)).to_dict() == config.to_dict()


def test_recipes_keep_every_base_field():
    """Recipes change values, never the set of fields (so every override works on every recipe)."""
    def keys(d, prefix=""):
        return {prefix + k for k in d} | {
            x for k, v in d.items() if isinstance(v, dict) for x in keys(v, f"{prefix}{k}.")
        }
    want = keys(base.get_config().to_dict())
    for config in (quickstart.get_config(None), shakespeare_char.get_config("cpu"),
                   gpt2.get_config("xl"), openwebtext.get_config(None)):
        assert keys(config.to_dict()) == want


def test_shakespeare_cpu_mirrors_nanogpt():
    c = shakespeare_char.get_config("cpu")
    assert (c.model.num_layers, c.model.num_heads, c.model.d_model) == (4, 4, 128)
    assert (c.data.seq_len, c.train.batch_size, c.train.num_steps) == (64, 12, 2000)
    assert (c.optim.lr, c.optim.min_lr, c.optim.warmup_steps, c.optim.beta2) == (
        1e-3, 1e-4, 100, 0.99)
    assert c.model.dropout == 0.0 and not c.model.bias and c.train.eval_batches == 20


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant"):
        shakespeare_char.get_config("tpu")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("model.num_heads", 5, "does not divide model.d_model"),
        ("model.dtype", "float16", "model.dtype"),
        ("model.attention_impl", "flash", "model.attention_impl"),
        ("data.tokenizer", "bpe7", "data.tokenizer"),
        ("data.corpus", "wikipedia", "data.corpus"),
        ("data.sampling", "sequential", "data.sampling"),
        ("train.grad_accum_steps", 5, "not divisible by train.grad_accum_steps"),
        ("model.max_seq_len", 64, "exceeds model.max_seq_len"),
        ("optim.warmup_steps", 5000, "must exceed optim.warmup_steps"),
    ],
)
def test_validation_errors_name_the_field(field, value, match):
    config = quickstart.get_config(None)
    group, key = field.split(".")
    config[group][key] = value
    with pytest.raises(config_lib.ConfigError, match=match) as e:
        config_lib.validate(config)
    assert "\n" not in str(e.value)


def test_vocab_size_smaller_than_tokenizer():
    config = quickstart.get_config(None)
    config.model.vocab_size = 100
    with pytest.raises(config_lib.ConfigError, match=r"model\.vocab_size=100 is smaller than the "
                                                     r"tokenizer's vocabulary \(256\)"):
        registry.hyperparameters(config, vocab_size=256)
    config.model.vocab_size = 300  # Larger than the tokenizer's: kept (e.g. for padding).
    assert registry.hyperparameters(config, vocab_size=256).vocab_size == 300


def test_default_workdir():
    assert default_workdir("configs/quickstart.py") == "runs/quickstart"
    assert default_workdir("configs/shakespeare_char.py:cpu") == "runs/shakespeare_char_cpu"


def _train(*args):
    return subprocess.run([sys.executable, "-m", "gpt_jax.train", *args],
                          capture_output=True, text=True, timeout=120)


_LISTED = "(every field is listed in configs/base.py)"
_GROUP_TYPO = f'error: unknown config group: \'modle\'. Did you mean "model"? {_LISTED}'
_FIELD_TYPO = f'error: unknown config field: \'model.num_head\'. Did you mean "num_heads"? {_LISTED}'


def test_unknown_config_keys_name_the_closest_group_or_field():
    for key in ("model.num_layers", "mesh.rules.embed", "checkpoint.init_from"):
        assert unknown_config_key(key) is None
    assert unknown_config_key("modle.num_layers") == _GROUP_TYPO.removeprefix("error: ")
    assert unknown_config_key("model.num_head") == _FIELD_TYPO.removeprefix("error: ")
    assert unknown_config_key("mesh.rules.embedd").startswith(
        'unknown config field: \'mesh.rules.embedd\'. Did you mean "embed"?')
    assert "The groups are checkpoint, data, finetune, log" in unknown_config_key("zzz.a")
    assert "'model.num_layers' is a value, not a group" in unknown_config_key("model.num_layers.x")


def test_cli_typos_in_groups_and_fields_read_alike():
    """One clean line for a group typo as for a field typo, with or without --config (overrides
    are applied at definition without it, at parsing with it), and in tools/plan.py too."""
    file = "--config=configs/shakespeare_char.py:cpu"
    train = [sys.executable, "-m", "gpt_jax.train"]
    plan = [sys.executable, "tools/plan.py"]
    cases = [
        ([*train, "--config.modle.num_layers=2"], _GROUP_TYPO),
        ([*train, file, "--config.modle.num_layers=2"], _GROUP_TYPO),
        ([*train, "--config.model.num_head=3"], _FIELD_TYPO),
        ([*train, file, "--config.model.num_head=3"], _FIELD_TYPO),
        ([*train, file, "--noconfig.model.biass"],  # A bool's --no form.
         f'error: unknown config field: \'model.biass\'. Did you mean "bias"? {_LISTED}'),
        ([*plan, "--config.modle.num_layers=2"], _GROUP_TYPO),
        ([*plan, "--config=configs/quickstart.py", "--config.model.num_head=3"], _FIELD_TYPO),
    ]
    for argv, want in cases:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert r.returncode != 0 and r.stderr.strip() == want, (argv, r.stderr)


def test_cli_rejects_a_bad_value_before_compiling(tmp_path):
    r = _train("--config=configs/shakespeare_char.py:cpu", "--config.model.num_heads=5",
               f"--workdir={tmp_path}")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        "error: model.num_heads=5 does not divide model.d_model=128; "
        "choose heads so that d_model % num_heads == 0."
    )
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cli_rejects_a_wrong_type():
    r = _train("--config.train.num_steps=ten")
    assert r.returncode != 0 and "num_steps" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "group,key,value,match",
    [
        ("model", "dropout", "0.1", "model.dropout='0.1' has type str"),
        ("model", "bias", 1, "model.bias=1 has type int"),
        ("train", "num_steps", 10.5, "train.num_steps=10.5 has type float"),
        ("data", "path", 3, "data.path=3 has type int"),
    ],
)
def test_wrong_value_types_in_a_config_file(group, key, value, match):
    """config_flags types command-line values; a config built from a dict (a hand-written file,
    a config.json) is checked field by field against configs/base.py."""
    d = quickstart.get_config(None).to_dict()
    d[group][key] = value
    with pytest.raises(config_lib.ConfigError, match=re.escape(match)):
        config_lib.validate(ml_collections.ConfigDict(d))
    d[group].pop(key)
    with pytest.raises(config_lib.ConfigError, match=f"{group}.{key} is missing"):
        config_lib.validate(ml_collections.ConfigDict(d))


def test_an_int_where_a_float_goes_is_fine_but_a_bool_is_not():
    d = quickstart.get_config(None).to_dict()
    d["model"]["dropout"], d["optim"]["lr"] = 0, 1
    config = ml_collections.ConfigDict(d)
    config_lib.validate(config)  # Raises on a wrong type (see above); this one is accepted …
    assert registry.hyperparameters(config, vocab_size=256).dropout == 0.0  # … and used as is.
    config_lib.validate(config_lib.from_json(config_lib.to_json(config)))  # As config.json too.
    d["model"]["dropout"] = False  # A bool is an int to Python, not a float to the config.
    with pytest.raises(config_lib.ConfigError, match="model.dropout=False has type bool"):
        config_lib.validate(ml_collections.ConfigDict(d))


def test_openwebtext_mirrors_nanogpt_train_gpt2():
    c = openwebtext.get_config(None)
    assert (c.model.num_layers, c.model.num_heads, c.model.d_model, c.data.seq_len) == (
        12, 12, 768, 1024)
    assert c.train.batch_size * c.data.seq_len == 12 * 1024 * 5 * 8  # 491,520 tokens per step.
    assert (c.optim.lr, c.optim.min_lr, c.optim.warmup_steps, c.optim.decay_steps) == (
        6e-4, 6e-5, 2000, 600_000)
    assert (c.optim.beta2, c.optim.weight_decay, c.train.num_steps) == (0.95, 0.1, 600_000)
    assert not c.model.bias and c.model.dropout == 0.0 and c.data.tokenizer == "gpt2"
    assert c.data.prepared and c.model.vocab_size is None and not c.data.document_mask


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"prepared": "a,b", "mixture_weights": "1,2,3"}, "3 weight.*for 2 data.prepared"),
        ({"prepared": "a,b", "mixture_weights": "1,0"}, "must all be positive"),
        ({"prepared": "a,b", "mixture_weights": "1;2"}, "not comma-separated numbers"),
        ({"prepared": "a,,b"}, "empty entry"),
        ({"prepared": "a", "path": "corpus.txt"}, "both set"),
        ({"document_mask": True}, "needs documents separated by end-of-text tokens"),
        ({"document_mask": True, "tokenizer": "bpe"}, "only prepared folders have"),
        ({"tokenizer": "bpe", "vocab_size": 100}, "data.vocab_size=100"),
    ],
)
def test_data_validation_errors(fields, match):
    config = quickstart.get_config(None)  # byte tokenizer
    for key, value in fields.items():
        config.data[key] = value
    with pytest.raises(config_lib.ConfigError, match=match) as e:
        config_lib.validate(config)
    assert "\n" not in str(e.value)


def test_data_settings_that_validate():
    config = quickstart.get_config(None)
    config.data.tokenizer = "hf:/some/tokenizer.json"  # Checked when it is read, in setup.
    config_lib.validate(config)
    config.data.prepared, config.data.mixture_weights = "a, b", "0.7,0.3"
    config.data.document_mask = True  # The folders' tokenizer decides, once they are opened.
    config_lib.validate(config)
    assert config_lib.prepared_folders(config) == ["a", "b"]
    assert config_lib.mixture_weights(config) == [0.7, 0.3]
    config.model.attention_impl = "cudnn"
    config.model.dtype = "bfloat16"
    with pytest.raises(config_lib.ConfigError, match="document_mask.*attention_impl=cudnn"):
        config_lib.validate(config)


@pytest.mark.parametrize("old, new", [(True, "auto"), (False, "lines")])
def test_a_config_saved_when_log_progress_was_a_bool_still_loads(old, new):
    import json

    from gpt_jax.config import saved_run_config

    saved = base.get_config().to_dict()
    saved["log"]["progress"] = old
    del saved["data"]["verify_shards"]  # Added since: reads its default.
    config = saved_run_config(json.dumps(saved))
    assert config.log.progress == new and config.data.verify_shards is False
