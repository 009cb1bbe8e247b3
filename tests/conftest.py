"""Shared fixtures: a small corpus, tiny configs and models, metrics rows.

Tests in tests/multidevice/ need 8 CPU devices, which XLA only creates if asked before jax is
imported; test_parallel.py runs them in a subprocess with XLA_FLAGS set. A plain `pytest` run
skips collecting them here.

`slow` marks end-to-end tests (multi-process runs, SIGKILL/SIGTERM resumes, full training runs):
`python -m pytest -q` skips them, `python -m pytest -q --runslow` (what .ci/run does) runs all.
`not_as_root(reason)` marks a test (or a parametrize row) that needs a permission refused, which
root is granted (a chmod 555 folder, a chmod 000 file): skipped when the tests run as root.
"""

import json
import os
import pathlib
import re
import shutil
import tempfile

import pytest

# gcsfs (gs:// workdirs, tests/test_remote.py) otherwise asks Google's gRPC API, not the local
# server, for each bucket's type, and retries for minutes offline; it reads this when imported.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

_forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
if not _forced or int(_forced.group(1)) < 8:
    collect_ignore = ["multidevice"]

# A corpus of Python-like lines: enough structure that a tiny model's loss falls within tens of
# steps, and ~30 distinct characters (a small char vocabulary).
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))
# Timing fields of metrics.jsonl rows: they differ between otherwise identical runs.
TIMING = ("tokens_per_sec", "mfu", "gflops_per_sec", "time")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (end-to-end, several minutes)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test; runs only with --runslow")
    config.addinivalue_line("markers", "not_as_root(reason): needs a permission that root is "
                            "granted; skipped when run as root")
    # One persistent XLA compilation cache for the session, CLI subprocesses included: many
    # tests compile the same tiny steps, and a cached executable is the same program (the
    # bitwise tests pass with it). Set before any test module imports jax.
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpt_jax_xla_cache_")
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _permissions_enforced() -> bool:
    """Whether this process is refused a file it may not read (not so for root, unless its
    capabilities were dropped): probed, not guessed from the user id."""
    with tempfile.TemporaryDirectory() as folder:
        probe = pathlib.Path(folder) / "probe"
        probe.write_text("x")
        probe.chmod(0)
        try:
            probe.read_text()
        except PermissionError:
            return True
        return False


@pytest.fixture(autouse=True)
def _skip_not_as_root(request):
    """Skips a test marked not_as_root where file permissions are not enforced (root)."""
    marker = request.node.get_closest_marker("not_as_root")
    if marker is not None and not _permissions_enforced():
        pytest.skip(marker.args[0] if marker.args else "root is granted the permission it needs refused")


@pytest.fixture
def corpus(tmp_path) -> pathlib.Path:
    """TEXT in a file."""
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def tiny_config(corpus, tmp_path):
    """make(**overrides) → a config for a 2-layer, d 32 char model on `corpus` that trains in
    seconds; overrides are "group.field" → value."""
    from configs import base

    def make(**overrides):
        c = base.get_config()
        c.data.path = str(corpus)
        c.data.cache_dir = str(tmp_path / "cache")
        c.data.tokenizer = "char"
        c.data.seq_len = 32
        c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 2, 32
        c.train.batch_size = 8
        c.train.num_steps = 40
        c.train.eval_every = 20
        c.train.eval_batches = 2
        c.optim.warmup_steps = 5
        c.optim.lr = 3e-3
        c.log.every = 5
        c.log.progress = "lines"
        c.sample.num_samples = 1
        c.sample.max_new_tokens = 20
        for key, value in overrides.items():
            group, field = key.split(".")
            c[group][field] = value
        return c

    return make


def small_run_config(root: pathlib.Path, **overrides):
    """A config for a 6-step, 2-layer, d 32 char run on TEXT (written to root/corpus.txt), its
    schedule fixed (optim.decay_steps=10) so a shorter run is a prefix of a longer one, saving
    every 3 steps; overrides are "group.field" → value."""
    from configs import base

    corpus = root / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    c = base.get_config()
    c.data.path, c.data.cache_dir = str(corpus), str(root / "cache")
    c.data.tokenizer, c.data.seq_len = "char", 16
    c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 2, 32
    c.train.batch_size, c.train.num_steps, c.train.eval_every, c.train.eval_batches = 4, 6, 3, 1
    c.checkpoint.every = 3
    c.optim.warmup_steps, c.optim.decay_steps, c.optim.lr = 1, 10, 1e-2
    c.log.progress, c.log.tensorboard, c.sample.num_samples = "lines", False, 0
    for key, value in overrides.items():
        group, field = key.split(".")
        c[group][field] = value
    return c


@pytest.fixture(scope="session")
def small_run():
    """small_run_config, as a fixture (module-scoped fixtures of runs build on it)."""
    return small_run_config


@pytest.fixture
def tiny_gpt():
    """make(vocab_size=50, seq_len=16, **model_fields) → (hyperparameters, module, params) of a
    2-layer, 4-head, d 32 GPT with random parameters (seed 0)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from configs import base
    from gpt_jax.models import registry

    def make(vocab_size: int = 50, seq_len: int = 16, seed: int = 0, **model_fields):
        c = base.get_config()
        c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 4, 32
        c.data.seq_len = seq_len
        c.model.update(model_fields)
        hparams = registry.hyperparameters(c, vocab_size)
        model = registry.build(hparams)
        variables = model.init(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))
        return hparams, model, nn.meta.unbox(variables["params"])

    return make


def config_flags(config) -> list[str]:
    """The flags of `python -m gpt_jax.train` that make `config`: configs/base.py, then
    `--config.GROUP.FIELD=VALUE` for every field in which `config` differs from it."""
    from configs import base

    default = base.get_config()
    return [f"--config={base.__file__}"] + [
        f"--config.{group}.{field}={value}"
        for group, fields in config.items() for field, value in fields.items()
        if value != default[group][field]]


@pytest.fixture
def cli_flags():
    """config_flags, as a fixture."""
    return config_flags


@pytest.fixture
def train_command():
    """command(workdir, config) → the argv of `python -m gpt_jax.train` that trains `config`."""
    import sys

    return lambda workdir, config: [sys.executable, "-m", "gpt_jax.train", f"--workdir={workdir}",
                                    *config_flags(config)]


def read_metrics(workdir: pathlib.Path, timing: bool = True) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl (without the timing fields if `timing` is False)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return rows if timing else [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture
def metrics_rows():
    """read_metrics, as a fixture (tests do not import from conftest)."""
    return read_metrics


def _file_digest(path: pathlib.Path) -> str:
    """sha256 of a file's bytes; for a file a test made unreadable, its size, time and mode."""
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except PermissionError:
        st = path.stat()
        return f"unreadable {st.st_size} {st.st_mtime_ns} {st.st_mode:o}"


def _tree_digest(root: pathlib.Path) -> dict[str, str]:
    """{relative path: digest} of every file under `root` (a file: itself); {} if absent."""
    if root.is_file():
        return {".": _file_digest(root)}
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): _file_digest(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture
def bad_invocation():
    """check(argv, *words, protect=(), absent=(), cwd=None, env=None) runs the command `argv` (a
    subprocess) that must be refused the way every gpt_jax command refuses bad input: exit ≠ 0, no
    traceback, exactly one stderr line starting with `error:`, and it is the last one and contains
    each of `words` (case-insensitive). Every file under each path of `protect` keeps its bytes
    (none removed, changed or added) and no path of `absent` exists afterwards (no half-made
    output). Returns the CompletedProcess."""
    import subprocess

    def check(argv, *words, protect=(), absent=(), cwd=None, env=None, timeout=120):
        before = {str(p): _tree_digest(pathlib.Path(p)) for p in protect}
        r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd,
                           env=env, timeout=timeout)
        shown = f"{argv}\nrc={r.returncode}\nstdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-4000:]}"
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        assert r.returncode != 0, shown
        assert "Traceback" not in r.stderr + r.stdout, shown
        assert len(errors) == 1 and lines[-1] == errors[0], shown
        for word in words:
            assert word.lower() in errors[0].lower(), f"{word!r} not in the error line\n{shown}"
        for p in protect:
            assert _tree_digest(pathlib.Path(p)) == before[str(p)], f"{p} changed\n{shown}"
        for p in absent:
            assert not pathlib.Path(p).exists(), f"{p} was left behind\n{shown}"
        return r

    return check


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> pathlib.Path:
    """A finished 4-step char run (1 layer, T 16) with checkpoints at steps 2 and 4, trained once
    per session: tests that may damage it copy it first (shutil.copytree)."""
    from configs import base
    from gpt_jax.training import loop

    root = tmp_path_factory.mktemp("trained_run")
    (root / "corpus.txt").write_text(TEXT)
    c = base.get_config()
    c.data.path, c.data.cache_dir, c.data.tokenizer = str(root / "corpus.txt"), str(root / "cache"), "char"
    c.data.seq_len = 16
    c.model.num_layers, c.model.num_heads, c.model.d_model = 1, 2, 32
    c.train.batch_size, c.train.num_steps, c.train.eval_every, c.train.eval_batches = 4, 4, 2, 1
    c.checkpoint.every = 2
    c.optim.warmup_steps, c.optim.decay_steps = 1, 10
    c.log.progress, c.log.tensorboard, c.sample.num_samples = "lines", False, 0
    loop.run(c, root / "run")
    return root / "run"


class _DamagedRun:
    """damaged_run(damage) → a copy of `trained_run` in tmp_path/run with damage(copy) applied;
    the damages that several tests share are its static methods."""

    def __init__(self, run: pathlib.Path, tmp: pathlib.Path):
        self.run, self.tmp = run, tmp

    def __call__(self, damage) -> pathlib.Path:
        copy = self.tmp / "run"
        shutil.copytree(self.run, copy)
        damage(copy)
        return copy

    @staticmethod
    def truncate_arrays(run: pathlib.Path) -> None:
        """Halves every array file of step 4 (the data chunks and OCDBT's index under
        state/…/d/): a write cut short."""
        files = [f for f in (run / "checkpoints" / "4" / "state").rglob("*")
                 if f.is_file() and f.parent.name == "d"]
        assert files
        for f in files:
            os.truncate(f, f.stat().st_size // 2)


@pytest.fixture
def damaged_run(trained_run, tmp_path) -> _DamagedRun:
    """damage → a copy of `trained_run` in tmp_path/run, damaged by `damage(copy)` (see
    _DamagedRun, whose truncate_arrays is one such damage)."""
    return _DamagedRun(trained_run, tmp_path)


class _FakeGCS:
    """A local Google Cloud Storage server (gcp-storage-emulator) that gcsfs (etils.epath's gs://
    backend) and TensorStore (Orbax's arrays) both write to, through the endpoints their own
    variables name. `url(name)` → a fresh gs:// folder; `env` → the variables a subprocess
    needs; `fs` → a gcsfs file system to look at what was written."""

    BUCKET = "gpt-jax-test"

    def __init__(self, server, port: int):
        import itertools

        self.server, self._names = server, itertools.count()
        endpoint = f"http://127.0.0.1:{port}"
        self.env = {"STORAGE_EMULATOR_HOST": endpoint, "TENSORSTORE_GCS_HTTP_URL": endpoint,
                    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",  # TensorStore's test-only token.
                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # Set at import, above.
        os.environ.update(self.env)
        import gcsfs

        self.fs = gcsfs.GCSFileSystem(token="anon")  # The emulator takes no credentials.

    def url(self, name: str) -> str:
        return f"gs://{self.BUCKET}/{name}-{next(self._names)}"


@pytest.fixture(scope="session")
def fake_gcs():
    """_FakeGCS, serving for the whole session. The emulator omits the `x-goog-generation`
    header of GCS media downloads, which TensorStore reads (Orbax's OCDBT manifest): it is
    added here. It does not enforce generation preconditions, which only concurrent writers of
    one object would meet; the tests have one writer per object."""
    import logging
    import socket

    emulator = pytest.importorskip("gcp_storage_emulator.server")
    from gcp_storage_emulator.handlers import objects

    original = objects.download

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj.get("metageneration", "1")
        except Exception:  # No such object: the original answers 404.
            pass
        return original(request, response, storage, *args, **kwargs)

    objects.download = download  # `get` (…?alt=media) calls it by this name.
    emulator.HANDLERS = tuple((rx, {m: download if f is original else f for m, f in h.items()})
                              for rx, h in emulator.HANDLERS)
    # Per-request chatter (a 404 is how a client learns a file is new); no credentials here.
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True,
                                    default_bucket=_FakeGCS.BUCKET)
    server.start()
    # A client that closes a connection early (TensorStore does) is not an error to print.
    server._api._httpd.handle_error = lambda request, client_address: None
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                            "GOOGLE_AUTH_TOKEN_FOR_TESTING")}
    try:
        yield _FakeGCS(server, port)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def tool():
    """tool(name) → the module tools/NAME.py (the tools are scripts, not a package)."""
    import importlib.util

    def load(name: str):
        path = pathlib.Path(__file__).resolve().parent.parent / "tools" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"tools_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
