"""SIGTERM / SIGINT handling: finish the current step, save, exit; a second SIGINT aborts."""

from __future__ import annotations

import os
import pathlib
import signal
import threading
import types


class Preempted(Exception):  # noqa: N818 — an event, not an error.
    """Raised after the preemption checkpoint is saved; the CLI prints it and exits 128 + signal."""

    def __init__(self, signum: int, step: int, directory: pathlib.Path):
        self.signum, self.step, self.directory = signum, step, directory
        super().__init__(f"{signal.Signals(signum).name}: saved a checkpoint at step {step} in "
                         f"{directory}; run the same command again to resume.")


class PreemptionGuard:
    """Within `with PreemptionGuard() as g:`, SIGTERM and SIGINT only set `g.requested`.

    The loop checks it after each step, saves synchronously and calls `g.exit`. A second SIGINT
    (Ctrl-C twice) ends the process at once: a checkpoint being written then is left in Orbax's
    temporary folder, never mistaken for a complete one.
    """

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        self.requested = signum
        # The kernel's default action for the next Ctrl-C: it ends the process at once, even
        # inside a compile or a device wait where a Python handler would only run afterwards.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # os.write, not logging or sys.stderr: the handler may interrupt a write to stderr, and
        # re-entering its lock would raise inside the training loop.
        os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then saving a "
                    "checkpoint and exiting (Ctrl-C again aborts at once).\n".encode())

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():  # Signals go to the main thread.
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def exit(self, step: int, directory: pathlib.Path) -> None:
        """Ends the run by raising Preempted (call after the checkpoint of `step` is saved)."""
        # A process that got no signal itself stops because another did (multi-process runs).
        raise Preempted(self.requested or signal.SIGTERM, step, directory)
