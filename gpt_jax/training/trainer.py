"""The training loop: data → state → jitted steps → metrics, evals and a final sample."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging

from gpt_jax import config as config_lib
from gpt_jax.data import corpora, pipeline, prepare, tokenizers
from gpt_jax.generate import generate
from gpt_jax.models.gpt import GPT, count_params
from gpt_jax.training import allocator, optim, step
from gpt_jax.training.metrics import (
    MetricsWriter,
    TrainLogger,
    flops_per_token,
    peak_flops_per_device,
)


@dataclasses.dataclass
class Run:
    """What one training run is made of, built once by `setup` (tests reuse it)."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    data: prepare.Prepared
    model: GPT
    state: step.TrainState


def setup(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Run:
    """Validates the config, prepares the data, writes config.json and tokenizer, builds the state."""
    config_lib.validate(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _keep_previous_metrics(workdir)
    d = config.data
    corpus = corpora.load_corpus(d.corpus, d.path, str(pathlib.Path(d.cache_dir).expanduser()))
    data = prepare.prepare(
        corpus, d.tokenizer, str(pathlib.Path(d.cache_dir).expanduser()), d.val_fraction
    )
    tokenizers.save_tokenizer(data.tokenizer, workdir / "tokenizer.json")

    model_cfg = config_lib.ModelConfig.from_config(config, data.tokenizer.vocab_size)
    config = config.copy_and_resolve_references()
    config.model.vocab_size = model_cfg.vocab_size
    config.model.max_seq_len = model_cfg.max_seq_len
    (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")

    model = GPT(model_cfg)
    init_key, dropout_key = jax.random.split(jax.random.key(config.train.seed))
    tx = optim.make_optimizer(config)

    @jax.jit
    def init(init_key: jax.Array) -> step.TrainState:
        tokens_BT = jnp.zeros((1, config.data.seq_len), jnp.int32)
        variables = model.init(init_key, tokens_BT, deterministic=True)
        return step.TrainState.create(
            apply_fn=model.apply,
            params=nn.meta.unbox(variables["params"]),  # Logical axis names stay in the module.
            tx=tx,
            dropout_key=dropout_key,
        )

    return Run(config, workdir, data, model, init(init_key))


def _keep_previous_metrics(workdir: pathlib.Path) -> None:
    """A new run in a used workdir never overwrites or mixes into an earlier run's metrics."""
    old = workdir / "metrics.jsonl"
    if old.exists():
        n = 1
        while (workdir / f"metrics.prev{n}.jsonl").exists():
            n += 1
        old.rename(workdir / f"metrics.prev{n}.jsonl")
        logging.warning("%s held an earlier run's metrics; kept as metrics.prev%d.jsonl", workdir, n)


def evaluate(eval_step, params, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Mean token loss over `batches` of (tokens, weights), summed on device then divided once."""
    total, count = jnp.zeros(()), jnp.zeros(())
    for batch, weights in batches:
        s, n = eval_step(params, batch, weights)
        total, count = total + s, count + n
    loss = float(total / count)
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 80.0)), "val/tokens": int(count)}


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Trains for train.num_steps and returns the last train and eval metrics."""
    if config.train.tune_host_malloc:
        allocator.tune_glibc_malloc()
    r = setup(config, workdir)
    config, t = r.config, r.config.train
    seq_len, batch_size = config.data.seq_len, t.batch_size
    num_params = count_params(r.state.params)
    logging.info("model: %s parameters; workdir %s", f"{num_params:,}", r.workdir)

    step_flops = flops_per_token(r.model.cfg, num_params, seq_len) * batch_size * seq_len
    peak = peak_flops_per_device(jax.devices()[0], config.log.peak_flops)
    peak_total = None if peak is None else peak * jax.device_count()

    use_dropout = r.model.cfg.dropout > 0 or r.model.cfg.attention_dropout > 0
    train_step = jax.jit(
        step.make_train_step(r.model, optim.make_schedule(config), t.grad_accum_steps, use_dropout),
        donate_argnums=0,
    )
    eval_step = jax.jit(step.make_eval_step(r.model))
    train_it = iter(
        pipeline.train_dataset(
            r.data.train_tokens(), seq_len, batch_size, t.seed, 0, 1,
            config.data.num_threads, config.data.prefetch, config.data.sampling,
        )
    )
    val_tokens = r.data.val_tokens()
    ones_BT = np.ones((batch_size, seq_len), np.float32)
    fixed_val = [
        (b, ones_BT)
        for b in pipeline.eval_batches(val_tokens, seq_len, batch_size, t.eval_batches, t.seed)
    ]

    writer = MetricsWriter(r.workdir, config.log.tensorboard)
    bar = tqdm.tqdm(total=t.num_steps, disable=not config.log.progress, unit="step", smoothing=0.1,
                    mininterval=0.5)
    logger = TrainLogger(writer, bar, batch_size * seq_len, step_flops, peak_total)

    def run_eval(step_num: int, full: bool) -> dict:
        batches = (pipeline.full_eval_batches(val_tokens, seq_len, batch_size) if full
                   else fixed_val)
        m = evaluate(eval_step, state.params, batches)
        m["val/split"] = "full" if full else "batches"
        writer.write(step_num, m)
        bar.write(f"step {step_num}: val/loss {m['val/loss']:.4f} ({m['val/split']}, "
                  f"{m['val/tokens']:,} tokens)")
        logger.restart_clock(step_num)
        return m

    state, start = r.state, time.perf_counter()
    last_eval = run_eval(0, full=False)
    for i in range(1, t.num_steps + 1):
        state, metrics = train_step(state, next(train_it))
        logger.flush()  # The previous log step's metrics; step i is already queued on the device.
        if i == 1:  # The compile happens here: time it, and keep it out of the throughput.
            jax.block_until_ready(metrics)
            logging.info("first step done %.1f s after the loop started (compile included)",
                         time.perf_counter() - start)
            logger.restart_clock(1)
        if i == 1 or i % config.log.every == 0 or i == t.num_steps:
            logger.queue(i, metrics)
        bar.update(1)
        if i % t.eval_every == 0 or i == t.num_steps:
            logger.flush()
            final = i == t.num_steps
            if not final or t.final_eval != "none":
                last_eval = run_eval(i, full=final and t.final_eval == "full")
    bar.close()
    writer.close()
    tps = logger.median_tokens_per_sec()
    logging.info("trained %d steps in %.1f s; median training throughput %s tokens/s", t.num_steps,
                 time.perf_counter() - start, "n/a" if tps is None else f"{tps:,.0f}")

    if config.sample.num_samples > 0:
        print_samples(r, state.params)
    return {**logger.last, **last_eval}


def print_samples(r: Run, params) -> None:
    """Prints `sample.num_samples` continuations of `sample.prompt`, decoded with the run's tokenizer."""
    s = r.config.sample
    prompt = r.data.tokenizer.encode(s.prompt)
    out = generate(r.model, params, prompt, s.max_new_tokens, jax.random.key(s.seed),
                   s.temperature, s.top_k, s.num_samples)
    for row in out:
        print("-" * 40 + "\n" + r.data.tokenizer.decode(row.tolist()), flush=True)
