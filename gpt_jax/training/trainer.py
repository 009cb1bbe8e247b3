"""The training loop: data → state (fresh or restored) → jitted steps → metrics, evals,
checkpoints, and a final sample."""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging

from gpt_jax import config as config_lib
from gpt_jax.data import corpora, pipeline, prepare, tokenizers, training_data
from gpt_jax.generate import SamplingParams, generate
from gpt_jax.models.gpt import GPT, count_params
from gpt_jax.parallel import distributed, sharding
from gpt_jax.parallel import mesh as mesh_lib
from gpt_jax.training import allocator, checkpoint, optim, step
from gpt_jax.training.metrics import (
    MetricsWriter,
    TrainLogger,
    flops_per_token,
    peak_flops_per_device,
)
from gpt_jax.training.preemption import PreemptionGuard


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss with train.on_nonfinite=stop."""


@dataclasses.dataclass
class Run:
    """What one training run is made of, built once by `setup`."""

    config: ml_collections.ConfigDict  # Resolved: vocab size and positions filled in.
    workdir: pathlib.Path | None  # None (and data None) from setup_without_data.
    data: training_data.TrainingData | None
    model: GPT
    mesh: jax.sharding.Mesh
    rules: sharding.Rules  # Logical axis → mesh axes (mesh.rules).
    init_state: Callable[[], step.TrainState]  # Jitted: a fresh state at step 0, already sharded.
    abstract_state: Any  # Shapes, dtypes and shardings of the state (restore, AOT lowering).
    state_shardings: Any


def check_batch_split(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                      rules: sharding.Rules) -> None:
    """Each micro-batch must split evenly over the mesh axes the batch is sharded on."""
    axes = dict(rules)["batch"] or ()
    shards = math.prod(mesh.shape[a] for a in axes)
    t = config.train
    micro = t.batch_size // t.grad_accum_steps
    if micro % shards:
        raise config_lib.ConfigError(
            f"train.batch_size={t.batch_size} / train.grad_accum_steps={t.grad_accum_steps} = "
            f"{micro} sequences per micro-batch do not split over the {shards} batch shards "
            f"({'×'.join(axes)} of mesh {mesh_lib.describe(mesh)}); make train.batch_size a "
            f"multiple of {t.grad_accum_steps * shards} or lower train.grad_accum_steps.")


def setup(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          devices: list[jax.Device] | None = None) -> Run:
    """Validates the config, joins a multi-process run, builds the mesh (over `devices`, default
    all), prepares the data, builds the model and the sharded state init."""
    config_lib.validate(config)
    if config.train.tune_host_malloc:
        allocator.tune_glibc_malloc()  # Before the first large allocation.
    distributed.initialize(config.mesh)  # Before anything touches a device.
    if not distributed.is_primary():
        logging.set_verbosity(logging.WARNING)  # Process 0 speaks for the run.
    mesh, rules = _mesh_and_rules(config, devices)
    workdir = pathlib.Path(workdir)
    data = load_data(config)
    try:
        data.tokenizer.encode(config.sample.prompt)  # Fail now, not after training.
    except ValueError as e:
        raise config_lib.ConfigError(f"sample.prompt: {e}") from e
    workdir.mkdir(parents=True, exist_ok=True)

    config, model = build_model(config, data.tokenizer.vocab_size)
    init_state, abstract_state, state_sh = build_state(config, model, mesh, rules)
    return Run(config, workdir, data, model, mesh, rules, init_state, abstract_state, state_sh)


def load_data(config: ml_collections.ConfigDict) -> training_data.TrainingData:
    """The run's data: the data.prepared folder(s), or data.corpus / data.path tokenized into
    the cache (by process 0; the others then read its files). Problems are ConfigErrors."""
    d = config.data
    folders = config_lib.prepared_folders(config)
    try:
        if folders:  # Already tokenized: every process only opens the files.
            data = training_data.open_folders(folders, config_lib.mixture_weights(config))
            if d.tokenizer.partition(":")[0] != data.tokenizer.name:
                logging.info("data.prepared: the folder's tokenizer (%s, vocab %d) overrides "
                             "data.tokenizer=%r.", data.tokenizer.name, data.tokenizer.vocab_size,
                             d.tokenizer)
        else:
            data = None
            cache_dir = str(pathlib.Path(d.cache_dir).expanduser())
            vocab_size = d.vocab_size if d.tokenizer == "bpe" else None
            for turn in ("primary", "others"):  # Process 0 tokenizes; the others read its files.
                if (turn == "primary") == distributed.is_primary():
                    corpus = corpora.load_corpus(d.corpus, d.path, cache_dir)
                    data = training_data.from_prepared(prepare.prepare(
                        corpus, d.tokenizer, cache_dir, d.val_fraction, vocab_size))
                distributed.barrier(f"prepared data: {turn}")
            assert data is not None
    except (OSError, ValueError) as e:  # Missing path or folder, empty corpus, failed download.
        raise config_lib.ConfigError(str(e)) from e
    if d.document_mask and data.eot_id is None:
        raise config_lib.ConfigError(
            f"data.document_mask=True needs end-of-text tokens to find documents, and the data's "
            f"{data.tokenizer.name} tokenizer has none; prepare the data with --tokenizer=bpe or "
            "gpt2, or set data.document_mask=False.")
    return data


def _mesh_and_rules(config: ml_collections.ConfigDict,
                    devices: list[jax.Device] | None) -> tuple[jax.sharding.Mesh, sharding.Rules]:
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config.mesh)
    check_batch_split(config, mesh, rules)
    return mesh, rules


def setup_without_data(config: ml_collections.ConfigDict) -> Run:
    """What `setup` builds (mesh over every device, model, sharded state init) without data or a
    workdir, for tools that only compile or time the step (plan, benchmark)."""
    config_lib.validate(config)
    mesh, rules = _mesh_and_rules(config, None)
    config, model = build_model(config, vocab_size_without_data(config))
    init_state, abstract_state, state_sh = build_state(config, model, mesh, rules)
    return Run(config, None, None, model, mesh, rules, init_state, abstract_state, state_sh)


def abstract_batch(r: Run) -> jax.ShapeDtypeStruct:
    """The shape, dtype and sharding of one global training batch (for AOT lowering)."""
    shape = (r.config.train.batch_size, r.config.data.seq_len + 1)
    return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(r.mesh, r.rules))


def vocab_size_without_data(config: ml_collections.ConfigDict) -> int:
    """model.vocab_size, else the first data.prepared folder's (its meta.json, where it can be
    read), else the tokenizer's where it does not depend on the corpus (byte 256, gpt2 50257):
    what tools that build the model without reading data (plan, benchmark) use."""
    if config.model.vocab_size is not None:
        return config.model.vocab_size
    folders = config_lib.prepared_folders(config)
    if folders and (size := training_data.prepared_vocab_size(folders[0])) is not None:
        return size
    if config.data.tokenizer in training_data.FIXED_VOCAB_SIZES:
        return training_data.FIXED_VOCAB_SIZES[config.data.tokenizer]
    raise config_lib.ConfigError(
        f"the vocabulary of data.tokenizer={config.data.tokenizer!r} depends on the corpus; set "
        "--config.model.vocab_size (or data.prepared to a prepared folder) to build the model "
        "without preparing data.")


def build_model(config: ml_collections.ConfigDict,
                vocab_size: int) -> tuple[ml_collections.ConfigDict, GPT]:
    """The model for a tokenizer of `vocab_size`, and the config with vocab size and positions
    filled in."""
    model_cfg = config_lib.ModelConfig.from_config(config, vocab_size)
    config = config.copy_and_resolve_references()
    config.model.vocab_size = model_cfg.vocab_size
    config.model.max_seq_len = model_cfg.max_seq_len
    return config, GPT(model_cfg)


def build_state(config: ml_collections.ConfigDict, model: GPT, mesh: jax.sharding.Mesh,
                rules: sharding.Rules) -> tuple[Callable[[], step.TrainState], Any, Any]:
    """(init_state, abstract_state, state_shardings): a jitted init that creates the state
    already sharded (no device ever holds all of it), its shapes with shardings (for restoring
    and AOT lowering, nothing allocated), and the shardings."""
    init_key, dropout_key = jax.random.split(jax.random.key(config.train.seed))
    tx = optim.make_optimizer(config)

    def init_params():  # Parameters boxed with their logical axis names.
        tokens_BT = jnp.zeros((1, config.data.seq_len), jnp.int32)
        return model.init(init_key, tokens_BT, deterministic=True)["params"]

    def init() -> step.TrainState:  # The state holds plain arrays; the shardings say where.
        return step.new_train_state(model.apply, nn.meta.unbox(init_params()), tx, dropout_key)

    with sharding.activation_context(mesh, rules):
        param_sh = sharding.param_shardings(jax.eval_shape(init_params), mesh, rules)
        abstract = jax.eval_shape(init)
    state_sh = sharding.state_shardings(abstract, param_sh, tx, mesh)
    init_state = jax.jit(init, out_shardings=state_sh)
    return init_state, sharding.with_shardings(abstract, state_sh), state_sh


def compile_steps(config: ml_collections.ConfigDict, model: GPT, mesh: jax.sharding.Mesh,
                  rules: sharding.Rules, state_shardings: Any,
                  eot_id: int | None = None) -> tuple[Callable, Callable]:
    """The jitted train step (state donated) and eval step: state placed per the rules, batches
    split over the batch axes, metrics replicated. With `eot_id` (data.document_mask), attention
    stays inside the documents that token ends."""
    batch_sh = sharding.batch_sharding(mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    use_dropout = model.cfg.dropout > 0 or model.cfg.attention_dropout > 0
    train_step = jax.jit(
        step.make_train_step(model, optim.make_schedule(config), config.train.grad_accum_steps,
                             use_dropout, config.train.loss_chunk, eot_id),
        in_shardings=(state_shardings, batch_sh),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(step.make_eval_step(model, config.train.loss_chunk, eot_id),
                        in_shardings=(state_shardings.params, batch_sh, batch_sh),
                        out_shardings=replicated)
    return train_step, eval_step


def evaluate(eval_step, params, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Mean token loss over `batches` of (tokens, weights): per-batch sums stay on the device
    until the end, then add up in float64 on the host."""
    sync = distributed.must_sync_each_step()
    sums = []
    for batch, weights in batches:
        sums.append(eval_step(params, batch, weights))
        if sync:
            jax.block_until_ready(sums[-1])
    total, count = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
    loss = float(total / count)
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 80.0)), "val/tokens": int(count)}


def initial_state(r: Run, manager, train_it) -> tuple[step.TrainState, int]:
    """Resumes from the workdir's newest readable checkpoint, or starts per checkpoint.init_from.
    Writes the run's tokenizer.json once the workdir is known to be this run's."""
    init_from = r.config.checkpoint.init_from
    config = r.config.to_dict()
    tokenizer_path = r.workdir / "tokenizer.json"
    if manager.all_steps():
        if init_from == "scratch":
            raise config_lib.ConfigError(
                f"{r.workdir} already has checkpoints (steps {sorted(manager.all_steps())}); "
                "resume with checkpoint.init_from=auto or start in a new --workdir."
            )
        state, start, saved = checkpoint.restore_latest(manager, r.abstract_state, train_it, config)
        if tokenizer_path.exists() and (tokenizers.load_tokenizer(tokenizer_path).to_dict()
                                        != r.data.tokenizer.to_dict()):
            raise checkpoint.CheckpointError(
                f"this run's data gives another tokenizer than {tokenizer_path}, which the "
                "checkpoints were trained with; resume with the same data.* settings.")
        if start > r.config.train.num_steps:
            raise config_lib.ConfigError(
                f"the workdir's checkpoint is at step {start}, past train.num_steps="
                f"{r.config.train.num_steps}; raise train.num_steps to train on.")
        for change in checkpoint.changed_fields(saved, config):
            logging.warning("resuming with a changed setting, so the run is no longer the one "
                            "an uninterrupted run would have been: %s", change)
        logging.info("resumed from %s at step %d", checkpoint.checkpoint_dir(r.workdir), start)
        if distributed.is_primary():
            tokenizers.save_tokenizer(r.data.tokenizer, tokenizer_path)
        return state, start
    state = r.init_state()
    if init_from not in ("auto", "scratch"):
        state = state.replace(params=checkpoint.load_params(init_from, r.abstract_state.params,
                                                            r.model.cfg))
        logging.info("parameters taken from %s", init_from)
    elif (r.workdir / checkpoint.PARAMS_DIR).is_dir():  # An imported model's workdir.
        logging.warning("%s holds imported parameters (%s/), which a run only starts from when "
                        "asked; this one starts from scratch. To start from them: "
                        "--config.checkpoint.init_from=%s", r.workdir, checkpoint.PARAMS_DIR,
                        r.workdir)
    if distributed.is_primary():
        tokenizers.save_tokenizer(r.data.tokenizer, tokenizer_path)
    return state, 0


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Trains to train.num_steps (resuming if the workdir has checkpoints); returns the last train
    and eval metrics."""
    r = setup(config, workdir)
    with sharding.activation_context(r.mesh, r.rules):  # Every trace sees the mesh and rules.
        return _train(r)


def _train(r: Run) -> dict:
    config, t = r.config, r.config.train
    seq_len, batch_size = config.data.seq_len, t.batch_size
    primary = distributed.is_primary()
    val_tokens = r.data.val_tokens()
    batch_sh = sharding.batch_sharding(r.mesh, r.rules)
    global_shape = (batch_size, seq_len + 1)
    shard_index, shard_count = sharding.process_rows(batch_sh, global_shape)
    try:  # A split too short for one window or batch: the fix is in data.* / train.*.
        train_it = iter(pipeline.train_dataset(
            r.data.train_tokens(), seq_len, batch_size, t.seed, shard_index, shard_count,
            config.data.num_threads, config.data.prefetch, config.data.sampling, r.data.weights,
        ))
        fixed_batches = pipeline.eval_batches(val_tokens, seq_len, batch_size, t.eval_batches, t.seed)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
    manager = checkpoint.make_manager(checkpoint.checkpoint_dir(r.workdir), config.checkpoint.keep)
    state, start = initial_state(r, manager, train_it)
    config_json = config_lib.to_json(config)
    if primary:
        if start == 0:
            MetricsWriter.keep_previous(r.workdir)
        (r.workdir / "config.json").write_text(config_json + "\n")

    num_params = count_params(state.params)
    logging.info("model: %s parameters; workdir %s; mesh %s", f"{num_params:,}", r.workdir,
                 mesh_lib.describe(r.mesh))
    step_flops = flops_per_token(r.model.cfg, num_params, seq_len) * batch_size * seq_len
    peak = peak_flops_per_device(jax.devices()[0], config.log.peak_flops)
    peak_total = None if peak is None else peak * jax.device_count()
    eot_id = r.data.eot_id if config.data.document_mask else None
    train_step, eval_step = compile_steps(config, r.model, r.mesh, r.rules, r.state_shardings,
                                          eot_id)

    def to_device(batch: np.ndarray, weights: np.ndarray) -> tuple[jax.Array, jax.Array]:
        # Eval batches are whole on every process (they are small); each device takes its rows.
        return (sharding.put_replicated_host(batch, batch_sh),
                sharding.put_replicated_host(weights, batch_sh))

    ones_BT = np.ones((batch_size, seq_len), np.float32)
    fixed_val = [to_device(b, ones_BT) for b in fixed_batches]

    writer = MetricsWriter(r.workdir, config.log.tensorboard, resume_after=start, active=primary)
    bar = tqdm.tqdm(initial=start, total=t.num_steps, disable=not (config.log.progress and primary),
                    unit="step", smoothing=0.1, mininterval=0.5)
    logger = TrainLogger(writer, bar, batch_size * seq_len, step_flops, peak_total)

    def run_eval(step_num: int, full: bool) -> dict:
        batches = (itertools.starmap(to_device, pipeline.full_eval_batches(
            val_tokens, seq_len, batch_size)) if full else fixed_val)
        m = evaluate(eval_step, state.params, batches)
        m["val/split"] = "full" if full else "batches"
        writer.write(step_num, m)
        if primary:
            bar.write(f"step {step_num}: val/loss {m['val/loss']:.4f} ({m['val/split']}, "
                      f"{m['val/tokens']:,} tokens)")
        logger.restart_clock(step_num)
        return m

    def check_finite() -> None:
        """Syncs on the state's non-finite marker (only where the loop syncs anyway)."""
        if t.on_nonfinite != "stop":
            return
        bad = int(state.first_nonfinite_step)
        if bad:
            last = manager.latest_step()
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {bad}; stopped (train.on_nonfinite=stop). "
                + (f"The last good checkpoint, step {last}, is untouched. " if last is not None
                   else "No checkpoint was written. ")
                + "Lower optim.lr, raise warmup, or set train.on_nonfinite=skip."
            )

    def save(step_num: int, val: dict) -> None:
        check_finite()
        val_loss = val.get("val/loss") if val.get("step") == step_num else None
        checkpoint.save(manager, step_num, state, train_it, config_json, val_loss)

    last_eval: dict = {}
    sync_each_step = distributed.must_sync_each_step()
    begin = time.perf_counter()
    with PreemptionGuard() as preemption:
        try:
            if start == 0:
                last_eval = run_eval(0, full=False)
            for i in range(start + 1, t.num_steps + 1):
                batch = sharding.global_batch(next(train_it), batch_sh, global_shape)
                state, metrics = train_step(state, batch)
                if sync_each_step:
                    jax.block_until_ready(metrics)
                logger.flush()  # The previous log step's metrics; step i is queued on the device.
                if logger.last.get("train/nonfinite_steps"):
                    check_finite()  # Already fetched: stopping early costs no extra sync.
                if i == start + 1:  # The compile happens here: time it, keep it out of throughput.
                    jax.block_until_ready(metrics)
                    logging.info("first step done %.1f s after the loop started (compile included)",
                                 time.perf_counter() - begin)
                    logger.restart_clock(i)
                if i == 1 or i % config.log.every == 0 or i == t.num_steps:  # Same after a resume.
                    logger.queue(i, metrics)
                bar.update(1)
                final = i == t.num_steps
                if i % t.eval_every == 0 or final:
                    logger.flush()
                    check_finite()
                    if not final or t.final_eval != "none":
                        last_eval = {"step": i, **run_eval(i, full=final and t.final_eval == "full")}
                if i % config.checkpoint.every == 0 or final:
                    logger.flush()
                    save(i, last_eval)
                    logger.restart_clock(i)  # The save's host copy is not training time.
                # Every process must stop at the same step: with several, they agree at log
                # steps (one tiny collective), since a signal may reach them at different steps.
                agree = jax.process_count() == 1 or i % config.log.every == 0
                if agree and not final and distributed.any_process(preemption.requested is not None):
                    logger.flush()
                    if manager.latest_step() != i:
                        save(i, last_eval)
                    manager.wait_until_finished()
                    preemption.exit(i, checkpoint.checkpoint_dir(r.workdir))
            logger.flush()
            check_finite()
        finally:
            manager.wait_until_finished()  # Never exit with a save half-written.
            bar.close()
            writer.close()
    tps = logger.median_tokens_per_sec()
    logging.info("trained to step %d in %.1f s; median training throughput %s tokens/s",
                 t.num_steps, time.perf_counter() - begin, "n/a" if tps is None else f"{tps:,.0f}")

    if config.sample.num_samples > 0:
        print_samples(r, state.params)  # Every process computes (the params are sharded).
    last_eval.pop("step", None)
    return {**logger.last, **last_eval}


def print_samples(r: Run, params) -> None:
    """Prints `sample.num_samples` continuations of `sample.prompt`, decoded with the run's tokenizer."""
    s = r.config.sample
    prompts = [r.data.tokenizer.encode(s.prompt)] * s.num_samples
    out = generate(r.model, params, prompts, s.max_new_tokens, jax.random.key(s.seed),
                   SamplingParams(s.temperature, s.top_k, s.top_p))
    if distributed.is_primary():
        for row in out:
            print("-" * 40 + "\n" + r.data.tokenizer.decode(row.tolist()), flush=True)
