"""build.py: a run assembled without data, its batch shapes, and batch dicts with the optional
keys going through the compiled steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax.data.batch import lm_batch
from gpt_jax.parallel import sharding
from gpt_jax.training import build


def test_setup_without_data_resolves_the_model_and_the_batch_spec(tiny_config):
    r = build.setup_without_data(tiny_config(**{"model.vocab_size": 40}))
    assert r.workdir is None and r.data is None and r.arch.name == "gpt"
    assert (r.hparams.vocab_size, r.hparams.max_seq_len) == (40, 32)
    assert r.config.model.max_seq_len == 32  # Resolved into the config config.json records.
    spec = build.abstract_batch(r)
    assert {k: (v.shape, v.dtype) for k, v in spec.items()} == {
        "inputs": ((8, 32), jnp.int32), "targets": ((8, 32), jnp.int32),
        "weights": ((8, 32), jnp.float32)}


@pytest.mark.slow  # Compiles both steps (~6 s); test_sft_data's packed rows cover it by default.
def test_batches_with_segment_ids_and_positions_go_through_the_steps(tiny_config):
    r = build.setup_without_data(tiny_config(**{"model.vocab_size": 40}))
    with sharding.activation_context(r.mesh, r.rules):
        train_step, eval_step = build.compile_steps(r)
        rng = np.random.default_rng(0)
        plain = lm_batch(rng.integers(0, 40, (8, 33)).astype(np.int32))
        packed = dict(plain, segment_ids=np.repeat(np.arange(2, dtype=np.int32), 16)[None]
                      .repeat(8, 0), positions=np.tile(np.arange(16, dtype=np.int32), (8, 2)))
        batch_sh = build.batch_sharding(r)
        params = r.init_state().params
        loss_plain = eval_step(params, sharding.global_batch(plain, batch_sh, 8))
        loss_packed = eval_step(params, sharding.global_batch(packed, batch_sh, 8))
        # Same tokens and weights; the second half restarts its positions and attends only to
        # itself, so the loss changes.
        assert float(loss_plain[1]) == float(loss_packed[1]) == 8 * 32
        assert abs(float(loss_plain[0]) - float(loss_packed[0])) > 1e-3
        state, metrics = train_step(r.init_state(), sharding.global_batch(packed, batch_sh, 8))
        assert int(state.step) == 1 and np.isfinite(float(metrics["train/loss"]))
        assert jax.tree.structure(state.params) == jax.tree.structure(params)


def test_data_verify_shards_names_a_changed_shard(tiny_config, corpus, tmp_path):
    import pytest

    from gpt_jax.config import ConfigError
    from gpt_jax.data import prepare_stream, shards

    folder = tmp_path / "prepared"
    prepare_stream.prepare_folder(str(corpus), "char", folder, num_workers=1, show_progress=False)
    shard = folder / shards.read_meta(folder)["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[3] ^= 0x01
    shard.write_bytes(bytes(data))
    c = tiny_config(**{"data.prepared": str(folder)})
    assert build.load_data(c).tokenizer.vocab_size > 0  # Sizes right: opened unverified.
    c.data.verify_shards = True
    with pytest.raises(ConfigError, match=f"{shard.name} does not match its sha256"):
        build.load_data(c)


def test_a_url_workdir_no_backend_writes_is_refused_without_a_local_folder(tiny_config, tmp_path,
                                                                            monkeypatch):
    import pytest

    from gpt_jax.config import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="ftp:// is not a storage scheme"):
        build.setup(tiny_config(), "ftp://host/run1")
    assert not (tmp_path / "ftp:").exists()  # pathlib would have made "ftp:/host/run1".
