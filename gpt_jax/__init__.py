"""gpt_jax: GPT-family language models in JAX/Flax.

Importing the package turns on XLA:CPU's YNNPACK matmul kernels
(`--xla_cpu_experimental_ynn_fusion_type=dot`) unless XLA_FLAGS already sets that flag: on the
small matmuls of CPU-sized models they are much faster than XLA's default kernels (measured in
docs/performance.md), with the same float32 results to rounding. The flag only touches the CPU
backend, and only takes effect if set before JAX creates it, hence here. To keep XLA's default,
run with `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=` (empty).
"""

import os

_YNN = "--xla_cpu_experimental_ynn_fusion_type"
if _YNN not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_YNN}=dot".strip()
