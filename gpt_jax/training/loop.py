"""The training loop: batches → jitted steps → train lines, evals, checkpoints, a clean stop on
a signal or a non-finite loss, and a final sample. The run is assembled by build.py and starts
where resume.py says."""

from __future__ import annotations

import contextlib
import math
import pathlib
import time
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging

from gpt_jax import cli
from gpt_jax import config as config_lib
from gpt_jax.data import pairs, pipeline, sft, tokenizers
from gpt_jax.finetune import adapters, grow
from gpt_jax.generate import SamplingParams, generate
from gpt_jax.models.registry import count_params
from gpt_jax.parallel import distributed, sharding
from gpt_jax.parallel import mesh as mesh_lib
from gpt_jax.training import build, checkpoint, decoded, lock, memory, remote, resume
from gpt_jax.training.metrics import MetricsWriter, TrainLogger, peak_flops_per_device, show_bar
from gpt_jax.training.preemption import PreemptionGuard


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss with train.on_nonfinite=stop."""


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Trains to train.num_steps (resuming if the workdir has checkpoints); returns the last train
    and eval metrics."""
    started = time.time()  # metrics rows' `time` counts from here (plus earlier runs' time).
    r = build.setup(config, workdir)  # Writes nothing in the workdir but the folder itself.
    # Held before Loop writes anything a second run would clash on (tokenizer.json, config.json,
    # metrics, checkpoints) and released however the run ends; a refused run writes nothing.
    # A URL workdir's mirror is pulled and finally uploaded while the lock is held.
    with (r.mirror or contextlib.nullcontext(),
          lock.hold(r.where, distributed.is_primary(), distributed.any_process) as held,
          sharding.activation_context(r.mesh, r.rules)):  # Every trace sees mesh and rules.
        if r.mirror:
            r.workdir = r.mirror.local
            logging.info("workdir %s: its small files are written in %s and uploaded",
                         r.where, r.workdir)
        try:
            if r.mirror:
                r.mirror.pull()
                if distributed.is_primary():
                    r.mirror.start_uploading(held)
            try:
                # Compiles, checks memory, then allocates the state (at the depth the newest
                # checkpoint has, with train.grow_at).
                loop = Loop(grow.run_at_start(r), started, final=r)
            except jax.errors.JaxRuntimeError as e:
                if memory.is_out_of_memory(e):  # E.g. with train.memory_check=False.
                    raise memory.out_of_memory("the start (state or eval batches)", e) from None
                raise
            result = loop.train()
        except BaseException:
            if r.mirror:
                r.mirror.finish()  # Its failure is logged; the error in flight is the cause.
            raise
        if r.mirror and (problem := r.mirror.finish()):
            raise remote.UploadError(problem)
        return result


def evaluate(eval_step, params, batches: Iterable[dict]) -> dict:
    """Weighted mean token loss over `batches` (batch dicts on the device): per-batch sums stay
    on the device until the end, then add up in float64 on the host."""
    sync = distributed.must_sync_each_step()
    sums = []
    for batch in batches:
        sums.append(eval_step(params, batch))
        if sync:
            jax.block_until_ready(sums[-1])
    total, count = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
    loss = float(total / count)
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 80.0)), "val/tokens": int(count)}


class Loop:
    """One training run's loop; `train()` runs it. Holds the state as it advances."""

    def __init__(self, r: build.Run, started: float | None = None,
                 final: build.Run | None = None):
        """`started`: the run's start (time.time()); now if None. `final`: with train.grow_at,
        the run at its final depth (`r` is it at the step it starts from); None: `r`."""
        self.r, self.final = r, final or r
        config, t = r.config, r.config.train
        self.config, self.t = config, t
        self.primary = distributed.is_primary()
        self.batch_sh = build.batch_sharding(r)
        shard_index, shard_count = sharding.process_rows(
            self.batch_sh, (t.batch_size, config.data.seq_len))
        d = config.data
        self.pairs = isinstance(r.data, pairs.PairData)
        self.sft = isinstance(r.data, sft.SftData)
        self.val_tokens = None if self.pairs or self.sft else r.data.val_tokens()
        try:  # A split too short for one window or batch: the fix is in data.* / train.*.
            if self.sft:  # Loss on completions only (gpt_jax/data/sft.py).
                self.train_it = iter(sft.train_dataset(
                    r.data, d.seq_len, t.batch_size, t.seed, shard_index, shard_count,
                    d.num_threads, d.prefetch, d.sft_packing))
                self.val_rows = sft.val_rows(r.data, d.seq_len, d.sft_packing)
                fixed = list(sft.eval_batches(self.val_rows, t.batch_size, t.eval_batches))
            elif self.pairs:
                self.train_it = iter(pairs.train_dataset(
                    r.data, d.source_len, d.seq_len, t.batch_size, t.seed, shard_index,
                    shard_count, d.num_threads, d.prefetch))
                self.val_pairs = pairs.val_source(r.data, d.source_len, d.seq_len)
                fixed = list(pairs.eval_batches(self.val_pairs, t.batch_size, t.eval_batches))
            else:
                self.train_it = iter(pipeline.train_dataset(
                    r.data.train_tokens(), d.seq_len, t.batch_size, t.seed, shard_index,
                    shard_count, d.num_threads, d.prefetch, d.sampling, r.data.weights))
                fixed = pipeline.eval_batches(self.val_tokens, d.seq_len, t.batch_size,
                                              t.eval_batches, t.seed)
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from e
        self.task_metrics = None
        # An SFT folder's own task (its val examples, exact match of greedy completions) is
        # scored at every evaluation besides train.eval_tasks.
        own_tasks = [r.data.task_file] if self.sft else []
        if (t.eval_tasks or own_tasks) and not self.pairs:  # Imported only then: not small.
            from gpt_jax.training.task_metrics import TaskMetrics

            self.task_metrics = TaskMetrics(r, r.data.tokenizer, own_tasks)
        resume.check(r)  # A refused resume or init_from: now, not after the compile.
        # Compiled before any state exists, so a step that cannot fit stops here, allocating
        # nothing and writing nothing.
        self.compile()
        self.manager = checkpoint.make_manager(r.checkpoints, config.checkpoint.keep)
        self.state, self.start = resume.initial_state(r, self.manager, self.train_it)
        self.config_json = config_lib.to_json(config)
        if self.primary:
            if self.start == 0:
                MetricsWriter.keep_previous(r.workdir, r.where)
            # Whole or not at all: a full disk must not leave the run's config half-written.
            cli.write_atomically({r.workdir / "config.json": self.config_json + "\n"})
        self.num_params = num_params = count_params(self.state.params)
        adapters.log_counts(self.state.params, r.trainable)
        logging.info("model: %s parameters; workdir %s; mesh %s", f"{num_params:,}", r.where,
                     mesh_lib.describe(r.mesh))
        self.fixed_val = [self._to_device(b) for b in fixed]
        tokens_per_step = t.batch_size * config.data.seq_len
        self.writer = MetricsWriter(r.workdir, config.log.tensorboard, resume_after=self.start,
                                    active=self.primary, tokens_per_step=tokens_per_step,
                                    started=started, wandb=self._wandb_sink())
        bar = show_bar(config.log.progress, self.primary)
        self.bar = tqdm.tqdm(initial=self.start, total=t.num_steps, unit="step", smoothing=0.1,
                             disable=not bar, mininterval=0.5)
        step_flops = r.arch.flops_per_token(r.hparams, num_params, config.data.seq_len)
        self.writer.set_flops_per_token(step_flops, self.start)
        peak = peak_flops_per_device(jax.devices()[0], config.log.peak_flops)
        self.logger = TrainLogger(self.writer, self.bar, tokens_per_step,
                                  step_flops * tokens_per_step,
                                  None if peak is None else peak * jax.device_count(),
                                  t.num_steps, lines=self.primary and not bar)
        self.last_eval: dict = {}

    def _wandb_sink(self):
        """What makes the run's wandb sink (log.wandb), or None."""
        lg = self.config.log
        if not lg.wandb:
            return None
        from gpt_jax.training.wandb_sink import WandbSink

        return lambda: WandbSink(self.r.workdir, lg.wandb_project, lg.wandb_mode,
                                 config_lib.from_json(self.config_json).to_dict(),
                                 resumed=self.start > 0)

    def compile(self) -> None:
        """Compiles the train and eval steps of self.r; stops if the train step cannot fit."""
        r, config = self.r, self.r.config
        eot_id = r.data.eot_id if config.data.document_mask else None
        self.train_step, self.eval_step = build.compile_steps(r, eot_id)
        begin = time.perf_counter()
        self.train_step = self.train_step.lower(r.abstract_state, build.abstract_batch(r)).compile()
        need = memory.step_memory(self.train_step)
        logging.info("train step compiled in %.1f s; it needs %s per device",
                     time.perf_counter() - begin, memory.describe(need))
        # Every process stops if any cannot fit (else the others would hang).
        if config.train.memory_check:
            problem = memory.fit_problem(need, jax.local_devices()[0])
            if distributed.any_process(problem is not None):
                raise memory.DoesNotFitError(problem or memory.ELSEWHERE)

    def grow(self, step_num: int) -> None:
        """Grows the model after step `step_num` (train.grow_at; gpt_jax/finetune/grow.py): the
        next depth's run and steps, the state grown into it, config.json rewritten."""
        old, t = self.r, self.final.config.train
        self.r = grow.phase_run(self.final, step_num + 1)
        self.config = self.r.config
        self.compile()
        self.state = grow.grow_state(self.state, self.r, t.grow_mode, t.grow_optimizer,
                                     t.grow_init)
        self.config_json = config_lib.to_json(self.config)
        if self.primary:
            cli.write_atomically({self.r.workdir / "config.json": self.config_json + "\n"})
        if self.task_metrics:
            self.task_metrics.r = self.r
        self.num_params = num_params = count_params(self.state.params)
        flops_per_token = self.r.arch.flops_per_token(self.r.hparams, num_params,
                                                      self.config.data.seq_len)
        self.logger.set_flops_per_step(self.t.batch_size * self.config.data.seq_len
                                       * flops_per_token)
        self.writer.set_flops_per_token(flops_per_token, step_num)
        self.logger.restart_clock(step_num)  # The compile is not training time.
        logging.info("grew the model after step %d: %d → %d layers (%s, %s; optimizer state "
                     "%s); %s parameters", step_num, old.config.model.num_layers,
                     self.config.model.num_layers, t.grow_mode, t.grow_init, t.grow_optimizer,
                     f"{num_params:,}")

    def _to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        # Eval batches are whole on every process (they are small); each device takes its rows.
        return {k: sharding.put_replicated_host(v, self.batch_sh) for k, v in batch.items()}

    def train(self) -> dict:
        """Steps from the start to train.num_steps; returns the last train and eval metrics."""
        t, begin = self.t, time.perf_counter()
        sync_each_step = distributed.must_sync_each_step()
        i, in_flight = self.start, None
        with PreemptionGuard() as preemption:
            try:
                if self.start == 0:
                    self.last_eval = self.run_eval(0, full=False)
                for i in range(self.start + 1, t.num_steps + 1):
                    if grow.grows_after(self.final.config, i - 1):
                        self.grow(i - 1)
                    batch = sharding.global_batch(next(self.train_it), self.batch_sh, t.batch_size)
                    self.state, metrics = self.train_step(self.state, batch)
                    if sync_each_step:
                        jax.block_until_ready(metrics)
                    self.after_step(i, metrics, begin, preemption)
                self.logger.flush()
                self.check_finite()
            except BaseException as e:
                in_flight = e
                if memory.is_out_of_memory(e):  # Dispatch is asynchronous: step i or just before.
                    raise memory.out_of_memory(f"step {i}", e) from None
                raise
            finally:
                try:
                    self.wait_for_saves(in_flight)  # Never exit with a save half-written.
                finally:
                    self.bar.close()
                    self.writer.close()
        tps = self.logger.median_tokens_per_sec()
        logging.info("trained to step %d in %.1f s; median training throughput %s tokens/s",
                     t.num_steps, time.perf_counter() - begin,
                     "n/a" if tps is None else f"{tps:,.0f}")
        if self.config.sample.num_samples > 0:
            print_samples(self.r, self.state.params)  # Every process computes (params sharded).
        self.last_eval.pop("step", None)
        return {**self.logger.last, **self.last_eval}

    def after_step(self, i: int, metrics: dict, begin: float, preemption: PreemptionGuard) -> None:
        """Logs, evaluates, saves and stops as step `i` (just dispatched) asks."""
        t, logger = self.t, self.logger
        logger.flush()  # The previous log step's metrics; step i is queued on the device.
        if self.r.mirror:  # A URL workdir: its files go up every log.upload_every_s.
            self.r.mirror.try_upload()
        if logger.last.get("train/nonfinite_steps"):
            self.check_finite()  # Already fetched: stopping early costs no extra sync.
        if i == self.start + 1:  # Its warm-up (buffers, threads) is kept out of throughput.
            jax.block_until_ready(metrics)
            logging.info("first step done %.1f s after the loop started",
                         time.perf_counter() - begin)
            logger.restart_clock(i)
        # A growth step (train.grow_at) ends a depth: logged, evaluated and saved there. The
        # same steps log after a resume.
        grows = grow.grows_after(self.final.config, i)
        if i == 1 or i % self.config.log.every == 0 or i == t.num_steps or grows:
            logger.queue(i, metrics)
        self.bar.update(1)
        final = i == t.num_steps
        if i % t.eval_every == 0 or final or grows:
            logger.flush()
            self.check_finite()
            if not final or t.final_eval != "none":
                full = final and t.final_eval == "full"
                self.last_eval = {"step": i, **self.run_eval(i, full=full)}
        if i % self.config.checkpoint.every == 0 or final or grows:
            logger.flush()
            self.save(i)
            logger.restart_clock(i)  # The save's host copy is not training time.
        # Every process must stop at the same step: with several, they agree at log steps (one
        # tiny collective), since a signal may reach them at different steps.
        agree = jax.process_count() == 1 or i % self.config.log.every == 0
        if agree and not final and distributed.any_process(preemption.requested is not None):
            logger.flush()
            if self.manager.latest_step() != i:
                self.save(i)
            self.wait_for_saves(None)
            preemption.exit(i, self.r.checkpoints)

    def wait_for_saves(self, in_flight: BaseException | None) -> None:
        """Waits for the async saves; a failed one is reported, unless `in_flight` (an error
        already on its way out) is: that one is the cause, and is not masked."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            if in_flight is None:
                raise self.save_failed("the newest save", e) from None
            logging.error("the newest checkpoint save also failed: %s", e)

    def run_eval(self, step_num: int, full: bool) -> dict:
        """val/loss on the fixed batches, or (full) on every val token; for sequence pairs
        also the metrics of decoded val examples (train.eval_decode of them, all if full);
        logged and returned."""
        d, batch_size = self.config.data, self.t.batch_size
        if not full:
            batches = self.fixed_val
        elif self.pairs:
            batches = map(self._to_device, pairs.eval_batches(self.val_pairs, batch_size, None))
        elif self.sft:
            batches = map(self._to_device, sft.eval_batches(self.val_rows, batch_size, None))
        else:
            batches = map(self._to_device, pipeline.full_eval_batches(
                self.val_tokens, d.seq_len, batch_size))
        m = evaluate(self.eval_step, self.state.params, batches)
        m["val/split"] = "full" if full else "batches"
        m["params"] = self.num_params  # The model's size at this step (it changes if it grows).
        if self.pairs and self.t.eval_decode > 0:
            m.update(decoded_val_metrics(self.r, self.state.params, self.val_pairs,
                                         None if full else self.t.eval_decode))
        if self.task_metrics:
            m.update(self.task_metrics.metrics(self.state.params))
        self.writer.write(step_num, m)
        if self.primary:
            extra = "".join(f", {k.removeprefix('val/')} {m[k]:.4g}" for k in (
                "val/exact_match", "val/token_acc", "val/bleu", "val/chrf") if k in m)
            extra += "".join(f", {k.removeprefix('tasks/')} {v:.4g}" for k, v in m.items()
                             if k.startswith("tasks/") and not k.endswith("_stderr"))
            self.bar.write(f"step {step_num}: val/loss {m['val/loss']:.4f} ({m['val/split']}, "
                           f"{m['val/tokens']:,} tokens){extra}")
        self.logger.restart_clock(step_num)
        return m

    def check_finite(self) -> None:
        """Syncs on the state's non-finite marker (only where the loop syncs anyway)."""
        if self.t.on_nonfinite != "stop":
            return
        bad = int(self.state.first_nonfinite_step)
        if bad:
            last = self.manager.latest_step()
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {bad}; stopped (train.on_nonfinite=stop). "
                + (f"The last good checkpoint, step {last}, is untouched. " if last is not None
                   else "No checkpoint was written. ")
                + "Lower optim.lr, raise warmup, or set train.on_nonfinite=skip.")

    def save(self, step_num: int) -> None:
        """An async checkpoint of step `step_num`, ranked by its val loss if it has one."""
        self.check_finite()
        val = self.last_eval
        val_loss = val.get("val/loss") if val.get("step") == step_num else None
        if self.r.mirror:  # Metrics up to this checkpoint reach the URL before it does.
            self.r.mirror.try_upload(force=True)
        try:
            checkpoint.save(self.manager, step_num, adapters.saved(self.state, self.r.trainable),
                            self.train_it, self.config_json, val_loss)
        except jax.errors.JaxRuntimeError:
            raise  # A device error (e.g. out of memory copying the state) is not a disk problem.
        except Exception as e:  # Disk full, a read-only or vanished folder, an earlier async save.
            raise self.save_failed(f"step {step_num}", e) from None

    def save_failed(self, which: str, error: BaseException) -> checkpoint.CheckpointError:
        """The one-line report of a failed save; committed checkpoints are never touched."""
        first = (str(error).strip().splitlines() or [""])[0][:200]
        kept = sorted(self.manager.all_steps())
        return checkpoint.CheckpointError(
            f"saving the checkpoint of {which} failed ({type(error).__name__}: {first}); the run "
            f"stopped. " + (f"The checkpoints of steps {kept} are intact: " if kept else "")
            + f"{'f' if kept else 'F'}ree disk space or fix "
            f"{self.r.checkpoints}, then run the same command to resume.")


def decoded_val_metrics(r: build.Run, params: Any, val: pairs.PairSource, limit: int | None
                        ) -> dict[str, float]:
    """gpt_jax/training/decoded.py's metrics of the first `limit` examples of `val` (None: all),
    decoded greedily."""
    from gpt_jax import translate

    examples = pairs.examples(val, limit)
    predictions = translate.translate(
        r.model, params, [s for s, _ in examples], bos_id=r.data.eos_id, eos_id=r.data.eos_id,
        max_new_tokens=r.config.data.seq_len, beam_size=1, length_penalty=0.0,
        batch_size=r.config.train.batch_size)
    return decoded.decoded_metrics(predictions, [t for _, t in examples], r.data.decode)


def print_samples(r: build.Run, params: Any) -> None:
    """Prints `sample.num_samples` continuations of `sample.prompt`, decoded with the run's
    tokenizer; for sequence pairs, the decoding of that many val sources (sample.beam_size)."""
    s = r.config.sample
    if isinstance(r.data, pairs.PairData):
        from gpt_jax import translate

        d = r.config.data
        examples = pairs.examples(pairs.val_source(r.data, d.source_len, d.seq_len),
                                  s.num_samples)
        out = translate.translate(
            r.model, params, [src for src, _ in examples], bos_id=r.data.eos_id,
            eos_id=r.data.eos_id, max_new_tokens=d.seq_len, beam_size=s.beam_size,
            length_penalty=s.length_penalty, batch_size=r.config.train.batch_size)
        if distributed.is_primary():
            for (src, ref), pred in zip(examples, out, strict=True):
                print(f"{'-' * 40}\nsource:    {r.data.tokenizer.decode(src)}\n"
                      f"decoded:   {r.data.decode(pred)}\nreference: {r.data.decode(ref)}",
                      flush=True)
        return
    prompts = [r.data.tokenizer.encode(s.prompt)] * s.num_samples
    out = generate(r.model, params, prompts, s.max_new_tokens, jax.random.key(s.seed),
                   SamplingParams(s.temperature, s.top_k, s.top_p))
    if distributed.is_primary():
        for row in out:  # An id past the tokenizer's (model.vocab_size above it) shows as U+FFFD.
            text, _ = tokenizers.decode_known(r.data.tokenizer, row.tolist())
            print("-" * 40 + "\n" + text, flush=True)
