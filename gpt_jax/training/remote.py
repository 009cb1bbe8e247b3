"""Workdirs on Google Cloud Storage (`--workdir=gs://bucket/run`).

Checkpoints go straight to the URL: Orbax writes them through etils.epath and TensorStore, which
speak these schemes. The run's small files (config.json, metrics.jsonl, tb/, tokenizer.json) are
written a line at a time, which an object store cannot do (an object is replaced whole, never
appended to), so the run keeps them in a local mirror folder: pulled from the URL when the run
starts, and the files that changed uploaded at most every `log.upload_every_s` seconds, before
every checkpoint save, and when the run ends however it ends (an error, a signal). A hard kill
(kill -9, a lost host) loses at most the rows after the last upload, and those are newer than the
last checkpoint, past which the resumed run rolls metrics.jsonl back anyway (unless that upload
failed: its warning names the local folder, which keeps the files). The mirror never deletes
at the URL: a file missing here (a /tmp cleaner) is not a file the run removed. The lock is a
lease (lock.LeaseLock); once it is lost, nothing more is uploaded. Readers (gpt_jax.sample) read
the URL directly.

Only gs:// is taken: Orbax 0.12 writes checkpoints through TensorStore to local paths and gs://
only (s3:// and az:// buckets work mounted, as local paths: mountpoint-s3, blobfuse2).
"""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import tempfile
import time
from typing import Any

from absl import logging
from etils import epath

# URL scheme → the fsspec package etils.epath writes it with (without TensorFlow installed).
SCHEMES = {"gs": "gcsfs"}
MOUNT = {"s3": "mountpoint-s3 or s3fs-fuse", "az": "blobfuse2"}  # Schemes Orbax cannot write.
# Top-level entries of a URL workdir that the mirror leaves alone: Orbax writes the first two
# itself, the lock is read and written in place.
NOT_MIRRORED = ("checkpoints", "params", ".lock")


def is_url(value: Any) -> bool:
    """Whether a --workdir (or other path) names a URL (scheme://…), not a local path."""
    return "://" in str(value)


def url_problem(url: str, flag: str) -> str | None:
    """The one-line refusal of a URL the run cannot use (a scheme no backend speaks, a backend
    that is not installed, no bucket), or None. Checked on the raw string: pathlib would turn
    "gs://b/r" into a local folder "gs:/b/r"."""
    scheme, _, rest = str(url).partition("://")
    if scheme in MOUNT:
        return (f"{flag}={url}: Orbax writes checkpoints to gs:// and local paths only; mount the "
                f"bucket ({MOUNT[scheme]}) and give the mounted path.")
    if scheme not in SCHEMES:
        return (f"{flag}={url}: {scheme}:// is not a storage scheme gpt_jax writes; use "
                f"{', '.join(s + '://' for s in SCHEMES)} or a local path.")
    bucket, _, folder = rest.partition("/")
    if not bucket or not folder.strip("/"):
        return (f"{flag}={url} names no folder in a bucket (a run's files would mix with the "
                f"bucket's); give {scheme}://BUCKET/FOLDER.")
    package = SCHEMES[scheme]
    # etils.epath uses TensorFlow's file system where TensorFlow is installed, fsspec elsewhere.
    if importlib.util.find_spec(package) is None and importlib.util.find_spec("tensorflow") is None:
        return (f"{flag}={url}: {scheme}:// URLs need the {package} package, which is not "
                f"installed; pip install {package} (or pip install '.[gcs]').")
    return None


def path(value: str | pathlib.Path) -> epath.Path | pathlib.Path:
    """A URL as an etils.epath.Path (what Orbax takes), a local path as an absolute pathlib.Path
    (`~` is not expanded: the shell does that, and a workdir's files must agree on its place)."""
    if is_url(value):
        return epath.Path(str(value))
    return pathlib.Path(value).resolve()


class LeaseLostError(ValueError):
    """Another run took this run's workdir lease: it stops writing there (one line)."""


class UploadError(OSError):
    """The run's last upload failed; the message names the local folder that keeps the files."""


def _signature(file: pathlib.Path) -> tuple[int, int]:
    st = file.stat()
    return st.st_size, st.st_mtime_ns


class Mirror:
    """The local copy of a URL workdir's small files; `local` is where the run writes them.

    The folder is made when the mirror is entered (`with`) and removed when it is left, unless
    the last upload (`finish`) did not complete: then it is kept, and named. `pull()` fills it
    from the URL; once `start_uploading(lease)` is called (by the process that holds the
    workdir's lease), `upload()` sends the files that changed since they were pulled or last
    sent, until that lease is lost.
    """

    def __init__(self, url: str, upload_every_s: float):
        self.url = epath.Path(url)
        self.upload_every_s = upload_every_s
        self.local = pathlib.Path()  # Set on entering.
        self._sent: dict[str, tuple[int, int]] = {}  # File (relative) → signature at the URL.
        self._lease: Any = None  # The held lock.LeaseLock, once uploading.
        self._keep = False
        self._last_upload = -float("inf")

    def pull(self) -> None:
        """Copies the URL's files (all but NOT_MIRRORED) into the local folder."""
        if not self.url.exists():
            return
        for remote in self._remote_files(self.url, top=True):
            rel = remote.relative_to(self.url).as_posix()
            local = self.local / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(remote.read_bytes())
            self._sent[rel] = _signature(local)

    def _remote_files(self, folder: epath.Path, top: bool = False):
        for entry in folder.iterdir():
            if top and entry.name in NOT_MIRRORED:
                continue
            if entry.is_dir():
                yield from self._remote_files(entry)
            else:
                yield entry

    def start_uploading(self, lease: Any) -> None:
        """From now on `upload` writes to the URL, while `lease` (a held lock.LeaseLock, or any
        object with a `lost` threading.Event) is not lost."""
        self._lease = lease

    def upload(self, force: bool = False) -> None:
        """Sends the files that changed, unless the last upload is under `upload_every_s`
        seconds old (`force`: regardless). Raises LeaseLostError once the lease is lost, and
        what the store raises."""
        if self._lease is None or (not force and
                                   time.monotonic() - self._last_upload < self.upload_every_s):
            return
        if self._lease.lost.is_set():
            self._keep = True
            raise LeaseLostError(
                f"another run took the lease of {self.url} (its .lock), so this run stopped "
                f"writing there; its newest files are kept in {self.local}.")
        self._last_upload = time.monotonic()
        for file in sorted(self.local.rglob("*")):
            if not file.is_file():
                continue
            rel = file.relative_to(self.local).as_posix()
            sig = _signature(file)
            if self._sent.get(rel) != sig:
                target = self.url / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(file.read_bytes())  # One object, replaced whole.
                self._sent[rel] = sig

    def try_upload(self, force: bool = False) -> None:
        """`upload(force)` during training: a failure of the store (the network, credentials)
        is a warning naming the local folder, and the files go with the next upload; a lost
        lease stops the run (LeaseLostError)."""
        try:
            self.upload(force)
        except LeaseLostError:
            raise
        except Exception as e:  # The store's errors have many types (HTTP, auth, OSError).
            logging.warning("could not upload the run's files to %s (%s: %s); they are in %s, "
                            "and go with the next upload.", self.url, type(e).__name__,
                            (str(e).splitlines() or [""])[0][:200], self.local)

    def finish(self) -> str | None:
        """The last upload (call it while the lease is still held): None when it is done, else
        the one-line problem (the local folder is then kept, and named in it)."""
        self._keep = True  # Until the upload completes: an interrupt keeps the files too.
        try:
            self.upload(force=True)
        except Exception as e:
            problem = (f"could not upload the run's files to {self.url} ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0][:200]}); they are kept in "
                       f"{self.local}: copy them there (gcloud storage cp -r "
                       f"{self.local}/* {self.url}/).")
            logging.error("%s", problem)
            return problem
        self._keep = False
        return None

    def __enter__(self) -> Mirror:
        self.local = pathlib.Path(tempfile.mkdtemp(prefix="gpt_jax-workdir-"))
        return self

    def __exit__(self, *exc: Any) -> None:
        """Removes the local folder, unless `finish` could not upload it."""
        if not self._keep:
            shutil.rmtree(self.local, ignore_errors=True)
