"""Tests in tests/multidevice/ need 8 CPU devices, which XLA only creates if asked before jax is
imported; test_parallel.py runs them in a subprocess with XLA_FLAGS set. A plain `pytest` run
skips collecting them here."""

import os
import re

_forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
if not _forced or int(_forced.group(1)) < 8:
    collect_ignore = ["multidevice"]
