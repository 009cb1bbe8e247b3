"""Training-step benchmark on whatever backend is present: compile time, step time, tokens/s, MFU.

    python tools/benchmark.py --preset=shakespeare_char:cpu --steps=50
    python tools/benchmark.py --preset=gpt2:xl --compile_only

A preset is a config from configs/ plus the overrides that make it a single-device benchmark.
The step is the real training step (same code, shardings and donation as `gpt_jax.train`) fed
with random tokens, Zipf-distributed as text's are (`--tokens`), prepared on the host and put on
the device each step as the loop does; the Grain pipeline is not part of the figure. Reported:

- compile time (lower + compile of the train step);
- the median of per-step times after warm-up, each step waited for (`block_until_ready`), and
  the pipelined time per step (steps dispatched back to back, one wait at the end);
- from the median step: tokens/s, model FLOP/s (6N + 12·L·H·Q·T per token, as metrics.py),
  and MFU against the peak table in gpt_jax/training/metrics.py (or --peak_flops); on CPU,
  where no peak is known, the fraction of this machine's measured float32 matmul throughput;
- peak device memory where the backend reports it, else the process's peak RSS;
- decode tokens/s of gpt_jax.generate (batch 1, from a one-token prompt; median of 5): with the
  KV cache, and recomputing the context window for every token (use_cache=False), and their ratio.

Writes BENCH.json and BENCH.md (a one-row markdown table) into --out.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import resource
import statistics
import sys
import time

from absl import app, flags, logging

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpt_jax import cli  # noqa: E402 — after the path.

# name: (config file, variant, overrides). Overrides fix the vocabulary (no data is prepared)
# and make GPT-2 runs fit one accelerator.
PRESETS = {
    "quickstart": ("quickstart.py", None, {}),
    "shakespeare_char:cpu": ("shakespeare_char.py", "cpu", {"model.vocab_size": 65}),
    "shakespeare_char:gpu": ("shakespeare_char.py", "gpu", {"model.vocab_size": 65}),
    "seq2seq:addition": ("seq2seq.py", "addition", {"model.vocab_size": 12}),
    "gpt2:small": ("gpt2.py", "small", {"train.batch_size": 16, "train.grad_accum_steps": 1}),
    "gpt2:xl": ("gpt2.py", "xl", {"train.batch_size": 8, "train.grad_accum_steps": 1,
                                  "model.scan_layers": True, "model.remat": "full"}),
}

COMMAND = "python tools/benchmark.py"
flags.DEFINE_enum("preset", "quickstart", list(PRESETS), "What to benchmark.")
flags.DEFINE_integer("steps", 30, "Timed steps after warm-up.", lower_bound=20)
flags.DEFINE_integer("warmup", 3, "Untimed steps after the compile.", lower_bound=1)
flags.DEFINE_bool("compile_only", False, "Only lower and compile the train step.")
flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s per device for MFU; 0: the table's.",
                   lower_bound=0.0)
flags.DEFINE_integer("decode_tokens", 500, "Tokens to sample for the decode figures (0: skip).",
                     lower_bound=0)
flags.DEFINE_enum("tokens", "zipf", ["zipf", "uniform", "repeated"],
                  "Token ids fed to the step: Zipf-distributed as text's, uniform, or one id.")
flags.DEFINE_string("out", "runs/benchmarks", "Folder for the JSON and markdown results.")
flags.DEFINE_multi_string("set", [], "Extra override GROUP.FIELD=VALUE (Python literal or text).")
FLAGS = flags.FLAGS


def preset_config(name: str, extra: list[str]):
    """The preset's config with its overrides, then `extra` ones ('model.dtype=bfloat16'); a
    ConfigError for one that names no field (a group, a typo) or gives a value of another type."""
    import ast
    import contextlib
    import importlib

    from gpt_jax.config import ConfigError

    file, variant, overrides = PRESETS[name]
    module = importlib.import_module(f"configs.{file.removesuffix('.py')}")
    config = module.get_config(variant) if variant else module.get_config()
    for e in extra:  # A typo would otherwise add a field that nothing reads.
        key = e.split("=", 1)[0]
        problem = ("give GROUP.FIELD=VALUE, e.g. --set=model.num_layers=2" if "=" not in e
                   else cli.unknown_config_key(key, flag="--set="))
        if problem:
            raise ConfigError(f"--set={e}: {problem}")
    for key, value in [*overrides.items(), *(e.split("=", 1) for e in extra)]:
        *groups, field = key.split(".")  # GROUP.FIELD, or deeper (mesh.rules.embed).
        if isinstance(value, str):
            with contextlib.suppress(ValueError, SyntaxError):  # Else text, e.g. bfloat16.
                value = ast.literal_eval(value)
        node = config
        for group in groups:
            node = node[group]
        try:
            node[field] = value
        except (TypeError, ValueError) as err:  # ml_collections keeps each field's type.
            was = node[field]
            raise ConfigError(
                f"--set={key}={value}: {key} takes a value of type {type(was).__name__}, not "
                f"{value!r}; give one, e.g. --set={key}={was!r}") from err
    return config


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """This machine's float32 matmul throughput through XLA, GFLOP/s (best of `repeats`)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def token_ids(rng, kind: str, vocab_size: int, shape: tuple[int, ...]):
    """Random token ids: `zipf` draws them with p(rank r) ∝ 1/r over a random ranking of the
    vocabulary (Zipf's law, as words in text: the commonest id ~1/ln V of them, 9% for GPT-2's
    vocabulary); `uniform` uniformly; `repeated` is one id everywhere. Some kernels' speed
    depends on how often ids repeat (the embedding gradient's scatter-add,
    docs/performance.md 2026-12-01)."""
    import numpy as np

    if kind == "uniform":
        return rng.integers(0, vocab_size, shape, dtype=np.int32)
    if kind == "repeated":
        return np.full(shape, rng.integers(vocab_size), np.int32)
    p = 1.0 / np.arange(1, vocab_size + 1)
    rank = rng.choice(vocab_size, size=shape, p=p / p.sum())
    return rng.permutation(vocab_size).astype(np.int32)[rank]


def benchmark(name: str, config, steps: int, warmup: int, compile_only: bool, peak_override: float,
              decode_tokens: int, tokens: str = "zipf") -> dict:
    """Runs the benchmark of one preset; returns its figures."""
    import jax
    import numpy as np

    from gpt_jax.data.batch import lm_batch
    from gpt_jax.generate import SamplingParams, generate
    from gpt_jax.models.registry import count_params
    from gpt_jax.parallel import sharding
    from gpt_jax.training import allocator, build, metrics

    if config.train.tune_host_malloc:
        allocator.tune_glibc_malloc()  # Before the first large allocation, as build.setup does.
    r = build.setup_without_data(config)
    config, model, mesh, rules = r.config, r.model, r.mesh, r.rules
    B, T = config.train.batch_size, config.data.seq_len
    device = jax.devices()[0]
    result = {
        "preset": name, "date": datetime.date.today().isoformat(),
        "device": f"{jax.device_count()} × {device.device_kind}", "backend": jax.default_backend(),
        "host": platform.processor() or platform.machine(), "jax": jax.__version__,
        "batch": B, "seq_len": T, "dtype": config.model.dtype, "tokens": tokens,
        "remat": config.model.remat, "scan_layers": config.model.scan_layers,
    }
    with sharding.activation_context(mesh, rules):
        init_state, abstract_state = r.init_state, r.abstract_state
        train_step, _ = build.compile_steps(r)
        batch_sh = build.batch_sharding(r)
        t0 = time.perf_counter()
        compiled = train_step.lower(abstract_state, build.abstract_batch(r)).compile()
        result["compile_s"] = time.perf_counter() - t0
        n_params = count_params(abstract_state.params)
        result["parameters"] = n_params
        step_flops = r.arch.flops_per_token(r.hparams, n_params, T) * B * T
        if compile_only:
            return result

        rng = np.random.default_rng(0)
        if r.arch.reads_pairs:  # Random sources and targets, every position weighted.
            spec = build.abstract_batch(r)
            batches = [{k: np.ones(a.shape, a.dtype) if k in ("weights", "source_mask") else
                        rng.integers(0, r.hparams.vocab_size, a.shape, dtype=np.int32)
                        for k, a in spec.items()} for _ in range(4)]
        else:
            batches = [lm_batch(token_ids(rng, tokens, r.hparams.vocab_size, (B, T + 1)))
                       for _ in range(4)]
        state = init_state()

        def one(i):
            nonlocal state
            batch = sharding.global_batch(batches[i % len(batches)], batch_sh, B)
            state, m = compiled(state, batch)
            return m

        for i in range(warmup):
            jax.block_until_ready(one(i))
        times = []
        for i in range(steps):
            t = time.perf_counter()
            jax.block_until_ready(one(i))
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(steps):
            m = one(i)
        jax.block_until_ready(m)
        pipelined = (time.perf_counter() - t) / steps

        step_s = statistics.median(times)
        result.update({
            "step_ms_median": 1e3 * step_s,
            "step_ms_pipelined": 1e3 * pipelined,
            "tokens_per_sec": B * T / step_s,
            "tokens_per_sec_pipelined": B * T / pipelined,
            "model_tflops_per_sec": step_flops / step_s / 1e12,
        })
        peak = metrics.peak_flops_per_device(device, peak_override)
        result["mfu"] = None if peak is None else step_flops / step_s / (peak * jax.device_count())
        if device.platform == "cpu":
            ceiling = matmul_gflops()
            result["cpu_matmul_ceiling_gflops"] = ceiling
            result["fraction_of_matmul_ceiling"] = step_flops / step_s / 1e9 / ceiling
        stats = device.memory_stats() or {}
        result["peak_device_memory_gb"] = (stats["peak_bytes_in_use"] / 1e9
                                           if "peak_bytes_in_use" in stats else None)
        result["host_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        if decode_tokens > 0 and r.arch.reads_pairs:
            logging.info("decode figures skipped: model.arch=%s decodes sources "
                         "(gpt_jax/translate.py), not prompts.", r.arch.name)
        elif decode_tokens > 0:
            prompt = [np.zeros(1, np.int32)]
            for use_cache, field in ((True, "decode_tokens_per_sec"),
                                     (False, "decode_tokens_per_sec_uncached")):
                def sample(use_cache: bool = use_cache) -> None:
                    generate(model, state.params, prompt, decode_tokens, jax.random.key(0),
                             SamplingParams(temperature=1.0), use_cache=use_cache)
                sample()  # Compile.
                times = []
                for _ in range(5):  # One decode is tens of ms: a median of several.
                    t = time.perf_counter()
                    sample()
                    times.append(time.perf_counter() - t)
                result[field] = decode_tokens / statistics.median(times)
            result["decode_cache_speedup"] = (result["decode_tokens_per_sec"]
                                              / result["decode_tokens_per_sec_uncached"])
    return result


COLUMNS = (("date", "{}"), ("device", "{}"), ("preset", "{}"), ("compile_s", "{:.1f}"),
           ("step_ms_median", "{:.1f}"), ("tokens_per_sec", "{:,.0f}"),
           ("model_tflops_per_sec", "{:.3f}"), ("mfu", "{:.1%}"),
           ("fraction_of_matmul_ceiling", "{:.1%}"), ("peak_device_memory_gb", "{:.2f}"),
           ("decode_tokens_per_sec", "{:,.0f}"), ("decode_cache_speedup", "{:.1f}×"))


def markdown(r: dict) -> str:
    """A markdown table of one result (absent figures shown as n/a)."""
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    rule = "|" + " --- |" * len(COLUMNS)
    cells = [fmt.format(r[c]) if r.get(c) is not None else "n/a" for c, fmt in COLUMNS]
    return "\n".join([head, rule, "| " + " | ".join(cells) + " |"]) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {' '.join(argv[1:])!r}: every setting is a flag "
                 f"(--preset=…, --set=GROUP.FIELD=VALUE); see {COMMAND} --helpshort.")
    out = pathlib.Path(FLAGS.out)
    cli.check_output(out, "--out", folder=True)  # Refused now, not after the benchmark.
    with cli.errors_as_one_line():
        config = preset_config(FLAGS.preset, FLAGS.set)
        r = benchmark(FLAGS.preset, config, FLAGS.steps, FLAGS.warmup, FLAGS.compile_only,
                      FLAGS.peak_flops, FLAGS.decode_tokens, FLAGS.tokens)
    stem = f"{FLAGS.preset.replace(':', '_')}{'_compile' if FLAGS.compile_only else ''}"
    table = markdown(r)
    with cli.errors_as_one_line():
        cli.write_atomically({out / f"{stem}.json": json.dumps(r, indent=2) + "\n",
                                out / f"{stem}.md": table})
    print(json.dumps(r, indent=2))
    print(table, end="")
    print(f"written: {out / stem}.json, .md")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(COMMAND))
