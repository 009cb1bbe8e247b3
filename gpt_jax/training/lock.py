"""The workdir lock: one training run at a time writes a workdir.

Process 0 of a run holds `WORKDIR/.lock`: an exclusive flock(2) on that file, kept open for the
whole run, with the holder written into it as JSON (host, pid, since (UTC), command line). A
second run on the workdir is refused with `WorkdirLockedError`, whose one-line message names the
holder. The kernel drops a process's flocks when it dies, `kill -9` included, so a dead holder
never blocks: the next run takes the lock over and logs a warning naming the holder the file
still describes. A run that ends (normally, by an error, or preempted) removes the file while it
still holds the lock, so a workdir keeps no `.lock` after a run, and a record under a free lock
always means a holder that died without ending. A run that locked a file just as its holder
removed it finds the path gone or naming another file, and starts over: two runs never hold two
different files. Readers (`gpt_jax.sample`, `tools/inspect_checkpoint.py`, `tools/convert_hf.py
export`) take no lock.

Limitations. flock is advisory: it stops other runs of this trainer, not other programs. On a
shared filesystem (NFS, Lustre, GPFS) whether a flock excludes processes on *other hosts* depends
on the filesystem and its mount options (Lustre needs `-o flock`; `-o localflock` makes locks
per host), so two hosts may both get the lock there. A file that names another host cannot be
checked (a pid means nothing across hosts): it is taken over when the flock succeeds, with a
warning that says so. A file system without flock support gets a warning and an unlocked run.
Processes forked (without exec) by the holder share its lock until they exit.

A workdir on cloud storage (gs://…) has no flock: its `.lock` is a lease (`LeaseLock`), a record
its holder renews every LEASE_S / 4 seconds from a thread. A record renewed within LEASE_S
refuses a second run; an older one was left by a holder that died, and is taken over with a
warning, so a killed run blocks its workdir for at most LEASE_S. One from this machine (same
boot and pid namespace, so not another container) whose pid no longer runs is taken over at
once: a requeued job on the same node restarts at once. A holder that finds its record replaced
sets `lost` and the run stops writing (remote.Mirror). Limitation: two runs that start together
both write their record and read it back after _SETTLE_S, and only the one whose record is there
goes on (GCS reads after write consistently); a write delayed past _SETTLE_S (retries) can still
let both go on. GCS's conditional writes would close that gap; gcsfs does not expose them.
Renewal times are the holders' clocks: clocks that differ by a fraction of LEASE_S weaken it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import pathlib
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from absl import logging

from gpt_jax.config import ConfigError
from gpt_jax.training import remote

LOCK_NAME = ".lock"
# A holder writes its record right after its flock succeeds; a run refused in between waits this
# long for the record to appear before naming no one.
_RECORD_WAIT_S = 1.0
_ATTEMPTS = 20  # Tries to lock the file the path names (each lost only to a release in between).
LEASE_S = 120.0  # A URL workdir's lease lapses this long after its holder's last renewal.
_SETTLE_S = 1.0  # A new lease is read back after this long: a run that wrote at once shows.
_sleep = time.sleep  # (Tests replace it to act while a lease settles.)


class WorkdirLockedError(ValueError):
    """Another live run holds the workdir; the message names it and the fix, in one line."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a workdir lock, as its file records it."""

    host: str
    pid: int
    since: str  # ISO 8601, UTC, e.g. 2026-11-30T14:00:00Z.
    command: str  # As the interpreter was started (sys.orig_argv), for a person to read.

    @classmethod
    def this_process(cls) -> Holder:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(socket.gethostname(), os.getpid(), now, shlex.join(sys.orig_argv))

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """The record in a lock file's text; None if it holds none (empty, garbage)."""
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), str(d["since"]), str(d.get("command", "")))
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, since {self.since}"


class WorkdirLock:
    """`WORKDIR/.lock`, held between `acquire()` and `release()` (or within `with`)."""

    def __init__(self, workdir: str | pathlib.Path):
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirLockedError naming the live holder. A record left by
        a dead holder is taken over with a warning. Writes nothing when refused."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this WorkdirLock")
        for _ in range(_ATTEMPTS):
            fd = self._lock_file()
            if fd is None:  # No flock on this file system.
                return
            if _names(self.path, fd):
                break
            os.close(fd)  # Its holder removed it as we locked it: lock the one there now.
        else:
            raise ConfigError(f"cannot lock {self.path}: it was replaced {_ATTEMPTS} times in a "
                              "row; is something else removing it?")
        try:
            _warn_if_taken_over(self.path, _read(fd))
            record = json.dumps(dataclasses.asdict(Holder.this_process()))
            os.ftruncate(fd, 0)
            os.pwrite(fd, (record + "\n").encode(), 0)
            os.fsync(fd)  # Readers on other hosts of a shared filesystem see it.
        except OSError as e:  # Disk full, quota, I/O error: one line, the lock let go.
            os.close(fd)
            raise ConfigError(f"cannot write the lock record {self.path} ({e.strerror or e}); "
                              "free space in the workdir's file system and run again.") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _lock_file(self) -> int | None:
        """An fd of the file at the path, flocked; None where the file system has no flock."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot create the workdir lock {self.path}: {e.strerror}; use a "
                              "--workdir this user can write.") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _wait_for_record(fd)
            os.close(fd)
            who = holder.describe() if holder else "it has not recorded its pid yet"
            raise WorkdirLockedError(
                f"{self.workdir} is in use by another training run ({who}); wait for it to "
                "end, or use another --workdir.") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise ConfigError(f"cannot lock {self.path}: {e.strerror}; check the workdir's "
                                  "file system or choose another --workdir.") from e
            logging.warning("cannot lock %s (%s): this file system has no flock, so nothing "
                            "stops a second run on this workdir.", self.path, e.strerror)
            return None
        return fd

    def release(self) -> None:
        """Removes the file (a clean end, not a death), then drops the lock; idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _names(self.path, fd):  # Not a file that replaced ours (removed by hand).
                os.unlink(self.path)  # While still locked: see the module docstring.
        except OSError as e:  # The lock is dropped anyway; the next run only warns.
            logging.warning("could not remove %s: %s", self.path, e.strerror)
        finally:
            os.close(fd)  # Drops the flock.

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class LeaseLock:
    """`URL/.lock` for a workdir on cloud storage, held between `acquire()` and `release()`: a
    lease renewed from a thread (see the module docstring)."""

    def __init__(self, url: str):
        self.workdir = url
        self.path = remote.path(url) / LOCK_NAME
        self._token: str | None = None
        self._since = ""
        self._stop = threading.Event()
        self.lost = threading.Event()  # Set when another run's record replaced ours.
        self._renewer: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lease, or raises WorkdirLockedError naming the live holder. A lapsed lease
        is taken over with a warning. Leaves no record of its own when refused or failing."""
        if self._token is not None:
            raise RuntimeError(f"{self.path} is already held by this LeaseLock")
        token, written = uuid.uuid4().hex, False
        try:
            self._refuse_if_held(self._read())
            self._since = Holder.this_process().since
            written = True
            self._write(token)
            _sleep(_SETTLE_S)
            record = self._read()
            if record is None or record.get("token") != token:
                self._refuse_if_held(record, raced=True)
        except BaseException as e:
            if written:
                self._remove_if_ours(token)
            if isinstance(e, ValueError) or not isinstance(e, Exception):
                raise
            # The store's errors (auth, network, no bucket) have many types.
            raise ConfigError(
                f"cannot write the workdir lock {self.path} ({type(e).__name__}: "
                f"{(str(e).splitlines() or [''])[0][:200]}); check that the bucket exists and "
                "that this machine's credentials may write it.") from None
        self._token = token
        self._stop.clear()
        self.lost.clear()
        self._renewer = threading.Thread(target=self._renew, args=(token,), name="workdir-lease",
                                         daemon=True)
        self._renewer.start()

    def _remove_if_ours(self, token: str) -> None:
        try:
            record = self._read()
            if record is not None and record.get("token") == token:
                self.path.unlink()
        except Exception as e:  # The lease lapses by itself.
            logging.warning("could not remove the workdir lease %s (%s); it lapses in %.0f s.",
                            self.path, type(e).__name__, LEASE_S)

    def _read(self) -> dict | None:
        try:
            d = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # Garbage: no holder recorded.
            return {}
        return d if isinstance(d, dict) else {}

    def _write(self, token: str) -> None:
        holder = dataclasses.asdict(Holder.this_process())
        self.path.write_text(json.dumps({**holder, "since": self._since, "renewed": time.time(),
                                         "machine": _machine(), "token": token}) + "\n")

    def _refuse_if_held(self, record: dict | None, raced: bool = False) -> None:
        """WorkdirLockedError if `record` is a live lease (or, `raced`, any other run's)."""
        if record is None:
            if raced:  # Removed as we wrote: a holder releasing; retrying is the user's call.
                raise WorkdirLockedError(f"{self.path} changed while this run took it; run "
                                         "again.")
            return
        holder = Holder.parse(json.dumps(record))
        age = time.time() - float(record.get("renewed", 0) or 0)
        who = holder.describe() if holder else "a run that recorded no holder"
        if (not raced and holder is not None and record.get("machine") == _machine()
                and not _running(holder.pid)):  # Killed on this machine: no need to wait.
            logging.warning("took over the workdir lease %s of %s, which is no longer running.",
                            self.path, who)
            return
        if raced or age < LEASE_S:
            raise WorkdirLockedError(
                f"{self.workdir} is in use by another training run ({who}, lease renewed "
                f"{max(age, 0):.0f} s ago); wait for it to end, or if it died, for its lease to "
                f"lapse ({LEASE_S:.0f} s after its last renewal) or delete {self.path}.")
        logging.warning("took over the workdir lease %s of %s, last renewed %.0f s ago (over "
                        "%.0f s: that run has ended).", self.path, who, age, LEASE_S)

    def _renew(self, token: str) -> None:
        while not self._stop.wait(LEASE_S / 4):
            try:
                record = self._read()
                if record is None or record.get("token") != token:
                    logging.error("the workdir lease %s was taken by another run or removed; "
                                  "this run stops writing there.", self.path)
                    self.lost.set()
                    return
                self._write(token)
            except Exception as e:  # Transient store errors: the lease has LEASE_S of slack.
                logging.warning("could not renew the workdir lease %s (%s); retrying.",
                                self.path, type(e).__name__)

    def release(self) -> None:
        """Stops renewing, then deletes the lease if it is still this run's; idempotent."""
        if self._token is None:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        token, self._token = self._token, None
        self._remove_if_ours(token)

    @property
    def held(self) -> bool:
        return self._token is not None

    def __enter__(self) -> LeaseLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold(workdir: str | pathlib.Path, primary: bool = True,
         any_process: Callable[[bool], bool] = bool) -> Iterator[WorkdirLock | LeaseLock]:
    """Within the block, the `primary` process (process 0) holds the workdir and the others do
    not lock. If it cannot, every process raises (they agree through `any_process`, e.g.
    distributed.any_process), so none goes on to write or to wait in a collective."""
    lock = LeaseLock(str(workdir)) if remote.is_url(workdir) else WorkdirLock(workdir)
    failed: ValueError | None = None
    if primary:
        try:
            lock.acquire()
        except ValueError as e:  # WorkdirLockedError, ConfigError.
            failed = e
    try:
        refused = any_process(failed is not None)
    except BaseException:
        lock.release()  # The collective failed: do not keep a lock no run will use.
        raise
    if refused:
        raise failed or WorkdirLockedError(
            f"process 0 could not lock {workdir}; its message names the reason.")
    try:
        yield lock
    finally:
        lock.release()


def _machine() -> str:
    """This machine's boot and pid namespace: a pid means a process only where both match (not
    in another container with the same hostname, nor after a reboot)."""
    try:
        boot = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # Not Linux: never taken over early.
        return f"unknown:{uuid.uuid4().hex}"


def _running(pid: int) -> bool:
    """Whether a process `pid` runs on this host (that it is the holder, not a reuse of its
    pid, cannot be told; a reused pid only makes a run wait for the lease to lapse)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Another user's process.
        return True
    return True


def _names(path: pathlib.Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)


def _read(fd: int) -> str:
    return os.pread(fd, 1 << 16, 0).decode(errors="replace")


def _wait_for_record(fd: int) -> Holder | None:
    """The live holder's record, waiting briefly for one that has just taken the lock."""
    deadline = time.monotonic() + _RECORD_WAIT_S
    while (holder := Holder.parse(_read(fd))) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return holder


def _warn_if_taken_over(path: pathlib.Path, text: str) -> None:
    """A record under a free lock: its holder ended without letting go (killed, or the host
    died). Says whom we took the lock from."""
    if not text.strip():
        return
    holder = Holder.parse(text)
    if holder is None:
        logging.warning("took over the workdir lock %s, whose file held no readable record.", path)
    elif holder.host != socket.gethostname():
        logging.warning(
            "took over the workdir lock of pid %d on host %s (since %s), another host: its flock "
            "is free here, but whether that run has ended cannot be checked from %s, and flock "
            "across hosts on a shared filesystem may not be reliable; make sure it has ended.",
            holder.pid, holder.host, holder.since, socket.gethostname())
    else:
        logging.warning("took over the workdir lock of pid %d on host %s (since %s), which is no "
                        "longer running.", holder.pid, holder.host, holder.since)
