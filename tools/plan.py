"""Ahead-of-time plan of a training config on a mesh: will it fit, and what does a step cost?

    python tools/plan.py --config=configs/gpt2.py:xl --config.mesh.fsdp=16 --config.mesh.tensor=4 --hbm_gb=80

Simulates the mesh's devices on this machine's CPU (`--num_devices`, default the product of the
mesh sizes), lowers and compiles the real train step with abstract inputs (nothing is allocated),
and prints per-device bytes of parameters, optimizer state and XLA's temporaries, the FLOPs of a
step, and whether it fits `--hbm_gb` per device. XLA:CPU's buffer assignment stands in for the
accelerator's, so temporaries are an estimate (GPU fusion and flash attention need less).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpt_jax import cli  # noqa: E402 — after the path; imports no jax (devices come first).

COMMAND = "python tools/plan.py"
sys.argv = cli.recipe_args(sys.argv)  # configs/NAME.py from any folder once installed.
cli.define_config_flag(cli.recipes_dir() / "gpt2.py", COMMAND)
flags.DEFINE_integer("num_devices", 0, "Devices to simulate; 0: the product of the mesh sizes "
                     "(-1 as 1).", lower_bound=0)
flags.DEFINE_float("hbm_gb", 80.0, "Memory per device, GB (1e9 bytes), to check the plan against.")
flags.register_validator("hbm_gb", lambda gb: gb > 0, "--hbm_gb must be > 0")
flags.DEFINE_string("json", None, "Also write the plan as JSON to this file.")
FLAGS = flags.FLAGS
AXES = ("data", "fsdp", "tensor")
GB = 1e9


def mesh_device_count(mesh_cfg) -> int:
    """Devices the config's mesh names, counting -1 as 1."""
    sizes = [mesh_cfg[a] for a in AXES] + [mesh_cfg[f"dcn_{a}"] for a in AXES]
    return math.prod(max(n, 1) for n in sizes)


def simulate_devices(n: int) -> None:
    """n CPU devices for this process; must run before jax is imported."""
    if "jax" in sys.modules:
        raise RuntimeError("simulate_devices must run before jax is imported")
    flags_now = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def plan(config, hbm_gb: float) -> dict:
    """Lowers and compiles the train step of `config` on the mesh over all (simulated) devices."""
    from gpt_jax.models.registry import count_params
    from gpt_jax.parallel import sharding
    from gpt_jax.training import build, memory

    t0 = time.perf_counter()
    r = build.setup_without_data(config)
    config, mesh, abstract_state = r.config, r.mesh, r.abstract_state
    train_step, _ = build.compile_steps(r)
    with sharding.activation_context(mesh, r.rules):
        lowered = train_step.lower(abstract_state, build.abstract_batch(r))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

    need = memory.step_memory(compiled)  # What the training loop's pre-flight checks too.
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    params_b = sharding.per_device_bytes(abstract_state.params)
    opt_b = sharding.per_device_bytes(abstract_state.opt_state)
    total_b = need.total
    n_params = count_params(abstract_state.params)
    tokens = config.train.batch_size * config.data.seq_len
    model_flops = r.arch.flops_per_token(r.hparams, n_params, config.data.seq_len) * tokens
    return {
        "config": FLAGS["config"].serialize().split("=", 1)[-1],
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        "parameters": n_params,
        "batch": {"sequences": config.train.batch_size, "seq_len": config.data.seq_len,
                  "grad_accum_steps": config.train.grad_accum_steps},
        "dtype": config.model.dtype,
        "per_device_gb": {
            "params": params_b / GB,
            "optimizer_state": opt_b / GB,
            "arguments": need.arguments / GB,
            "temporaries": need.temporaries / GB,
            "outputs_not_aliased": need.outputs_not_aliased / GB,
            "total": total_b / GB,
        },
        "hbm_gb": hbm_gb,
        "fits": total_b <= hbm_gb * GB,
        "flops_per_step": {
            "model_6N_plus_attention": model_flops,
            # XLA counts a loop body once. The accumulation loop holds the whole model (scale by
            # its trip count); a loop over scanned layers does not (no honest scale: omitted).
            "xla_per_device": (float(cost["flops"]) * config.train.grad_accum_steps
                               # An architecture without a scan_layers field never scans.
                               if cost and "flops" in cost
                               and not getattr(r.hparams, "scan_layers", False)
                               else None),
        },
        "seconds": {"lower": t1 - t0, "compile": t2 - t1},
    }


def report(p: dict) -> str:
    """The plan as a short human-readable table."""
    g = p["per_device_gb"]
    mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [
        f"{p['config']}: {p['parameters'] / 1e6:,.1f}M parameters ({p['dtype']} compute), "
        f"batch {p['batch']['sequences']} × {p['batch']['seq_len']} in "
        f"{p['batch']['grad_accum_steps']} micro-batch(es)",
        f"mesh {mesh} ({p['devices']} simulated devices)",
        "per device:",
        f"  params            {g['params']:9.3f} GB",
        f"  optimizer state   {g['optimizer_state']:9.3f} GB",
        f"  arguments (all)   {g['arguments']:9.3f} GB   state + batch",
        f"  temporaries       {g['temporaries']:9.3f} GB   activations, gradients, XLA buffers",
        f"  outputs (new)     {g['outputs_not_aliased']:9.3f} GB   beyond the donated state",
        f"  total             {g['total']:9.3f} GB   of {p['hbm_gb']:g} GB: "
        + ("fits" if p["fits"] else "DOES NOT FIT"),
        f"FLOPs per step: {p['flops_per_step']['model_6N_plus_attention']:.3e} (6N + attention, "
        "whole mesh)"
        + (f"; XLA's count per device {p['flops_per_step']['xla_per_device']:.3e}"
           if p["flops_per_step"]["xla_per_device"] else ""),
        f"lowered in {p['seconds']['lower']:.1f} s, compiled in {p['seconds']['compile']:.1f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {' '.join(argv[1:])!r}: every setting is a flag "
                 f"(--config.GROUP.FIELD=VALUE, --hbm_gb=…); see {COMMAND} --helpshort.")
    config = cli.loaded_config()
    out = None if FLAGS.json is None else pathlib.Path(FLAGS.json)
    if out is not None:  # Refused now, not after the compile.
        cli.check_output(out, "--json", folder=False)
    try:
        devices = FLAGS.num_devices or mesh_device_count(config.mesh)
    except (TypeError, KeyError):  # A mistyped mesh in a config file: plan() validates, names it.
        devices = 1
    simulate_devices(devices)
    with cli.errors_as_one_line():
        p = plan(config, FLAGS.hbm_gb)
    print(report(p))
    if out is not None:
        with cli.errors_as_one_line():
            cli.write_atomically({out: json.dumps(p, indent=2) + "\n"})
    sys.exit(0 if p["fits"] else 2)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(COMMAND))
