"""tools/launch_local.py: bad invocations refused in one line, and a launch that ends within
seconds of any process failing, its last line that process's `error:` line.

The processes' misbehaviour (an error, then stuck where SIGTERM cannot stop them; a crash; a
count of the SIGINTs they get) comes from a sitecustomize.py put on their PYTHONPATH: it acts
before `gpt_jax.train` is imported, so these launches import no jax and take about a second.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = [sys.executable, str(REPO / "tools" / "launch_local.py")]

# What process N does, from LAUNCH_TEST = {"N": behaviour, ...}; the launcher itself (no
# --config.mesh.process_id on its command line) and unlisted processes are left alone.
SITECUSTOMIZE = textwrap.dedent("""
    import json, os, pathlib, signal, sys, time

    _ids = [a.split("=", 1)[1] for a in sys.orig_argv if a.startswith("--config.mesh.process_id=")]
    _todo = json.loads(os.environ.get("LAUNCH_TEST", "{}")).get(_ids[0]) if _ids else None

    def _ready():
        pathlib.Path(os.environ["LAUNCH_TEST_DIR"], f"ready{_ids[0]}").touch()

    if _todo in ("error-then-stuck", "stuck"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # As in a collective: no handler runs.
        if _todo == "error-then-stuck":
            print(f"error: process {_ids[0]} broke; fix nothing.", file=sys.stderr, flush=True)
        time.sleep(120)
        os._exit(0)  # Not sys.exit: site.py would report it and go on to run the module.
    elif _todo == "crash":
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    elif _todo == "count-sigint":
        _got = []
        signal.signal(signal.SIGINT, lambda *_: _got.append(time.monotonic()))
        _ready()
        _end = time.monotonic() + 60
        while time.monotonic() < _end and (not _got or time.monotonic() < _got[0] + 1.0):
            time.sleep(0.02)  # Until 1 s after the first SIGINT, to catch a second one.
        if len(_got) != 1:
            print(f"error: got {len(_got)} SIGINTs, not 1; fix the launcher.", file=sys.stderr,
                  flush=True)
            os._exit(1)
        os._exit(128 + signal.SIGINT)
    elif _todo == "fail-alone":  # A real run whose process 0 fails after joining, the others not.
        from gpt_jax.config import ConfigError
        from gpt_jax.training import resume

        def _fail(*args, **kwargs):
            raise ConfigError("process 0 fails alone after joining; fix nothing.")

        resume.initial_state = _fail
""")


@pytest.fixture
def rigged(tmp_path):
    """env(**behaviours) → the environment of a launch whose process N does behaviours[N]."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)

    def env(**todo: str) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "PYTHONPATH": path, "LAUNCH_TEST_DIR": str(tmp_path),
                "LAUNCH_TEST": json.dumps({k.removeprefix("p"): v for k, v in todo.items()})}

    return env


# id, launcher flags, training flags (after --), words the error line must hold.
LAUNCH_ROWS = [
    pytest.param([], [], ("no training flags", "after `--`"), id="no-training-flags"),
    pytest.param(["--num_processes=0"], ["--config=configs/quickstart.py"],
                 ("--num_processes=0", "--helpshort"), id="num-processes-0"),
    pytest.param(["--devices_per_process=x"], ["--config=configs/quickstart.py"],
                 ("--devices_per_process=x", "--helpshort"), id="devices-not-a-number"),
    pytest.param(["--port=70000"], ["--config=configs/quickstart.py"],
                 ("--port=70000", "[0, 65535]", "--helpshort"), id="port-out-of-range"),
    pytest.param(["--grace_s=-1"], ["--config=configs/quickstart.py"],
                 ("--grace_s=-1", "--helpshort"), id="grace-negative"),
    pytest.param(["--bogus"], ["--config=configs/quickstart.py"],
                 ("unknown command line flag 'bogus'", "launch_local.py --helpshort"),
                 id="unknown-launcher-flag"),
    # Every process refuses its flags (~0.5 s): the launch ends with their line.
    pytest.param([], ["--bogus=1"], ("unknown command line flag 'bogus'", "gpt_jax.train --helpshort"),
                 id="processes-refuse-their-flags"),
]


@pytest.mark.parametrize("launcher, training, words", LAUNCH_ROWS)
def test_bad_invocations_are_refused_in_one_line(launcher, training, words, tmp_path,
                                                 bad_invocation):
    workdir = tmp_path / "w"
    extra = [f"--workdir={workdir}"] if training else []
    bad_invocation([*LAUNCH, *launcher, "--", *training, *extra], *words, absent=[workdir],
                   cwd=REPO, timeout=60)


def test_a_failing_process_ends_the_launch_at_once(rigged, bad_invocation):
    """Process 0 prints its error line and then hangs, and process 1 waits for it; neither
    answers SIGTERM (as in a collective, or jax.distributed's exit barrier). The launch ends
    after --grace_s, with that error line last and status 1 (it used to wait for exits that never
    came: minutes, until JAX's timeouts)."""
    begin = time.monotonic()
    r = bad_invocation([*LAUNCH, "--grace_s=1", "--", "--config=configs/quickstart.py"],
                       "process 0 broke", "fix nothing", cwd=REPO,
                       env=rigged(p0="error-then-stuck", p1="stuck"), timeout=60)
    assert r.returncode == 1 and time.monotonic() - begin < 10
    assert "launch_local: process 0 failed; stopping the others." in r.stderr
    assert "[process 0] error: process 0 broke" in r.stderr  # Also among the relayed lines.


def test_a_process_that_dies_without_a_word_ends_the_launch(rigged, bad_invocation):
    r = bad_invocation([*LAUNCH, "--grace_s=1", "--", "--config=configs/quickstart.py"],
                       "process 1 exited with status 137", "its output is above", cwd=REPO,
                       env=rigged(p0="stuck", p1="crash"), timeout=60)
    assert r.returncode == 137


def test_ctrl_c_reaches_each_process_once(rigged, tmp_path):
    """A Ctrl-C at the terminal signals the launcher's whole process group; the processes, in
    their own groups, get only the launcher's forwarded SIGINT (a second one would abort a
    process mid-save). They exit 128 + SIGINT, and so does the launch, without an error line."""
    p = subprocess.Popen([*LAUNCH, "--", "--config=configs/quickstart.py"], cwd=REPO,
                         env=rigged(p0="count-sigint", p1="count-sigint"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"ready{i}").exists() for i in (0, 1)):
            assert time.monotonic() < deadline and p.poll() is None, p.communicate()
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGINT)  # What the terminal does.
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGINT, err
    assert "error:" not in err, err


@pytest.mark.slow
def test_a_process_failing_alone_after_joining_ends_the_launch_within_seconds(
        rigged, tiny_config, cli_flags, tmp_path):
    """A real 2-process run whose process 0 fails after the processes joined and compiled, while
    process 1 goes on into the run's collectives: the launch ends within seconds of process 0's
    error line, with that line last (it used to hang until JAX's timeouts)."""
    workdir = tmp_path / "w"
    p = subprocess.Popen([*LAUNCH, "--num_processes=2", "--", *cli_flags(tiny_config()),
                          f"--workdir={workdir}"], cwd=REPO, env=rigged(p0="fail-alone"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, failed_at = [], None
    try:
        for line in p.stderr:
            lines.append(line.rstrip("\n"))
            if failed_at is None and line.startswith("[process 0] error:"):
                failed_at = time.monotonic()
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    shown = "\n".join(lines[-40:])
    assert failed_at is not None and time.monotonic() - failed_at < 10, shown
    errors = [line for line in lines if line.startswith("error:")]
    assert p.returncode == 1 and errors == [lines[-1]], shown
    assert "process 0 fails alone after joining" in lines[-1]
    assert "Traceback" not in shown
