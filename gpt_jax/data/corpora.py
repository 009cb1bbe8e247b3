"""Text corpora: the named ones (offline Python stdlib, tiny Shakespeare) and local files."""

import dataclasses
import hashlib
import os
import pathlib
import platform
import sysconfig
import tempfile
import urllib.error
import urllib.request

from absl import logging

CORPORA = ("pystdlib", "shakespeare")

# Corpus identity, not a setting: Karpathy's char-rnn tiny Shakespeare (1,115,394 bytes).
SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# Long enough for a slow link to fetch a few MB, short enough that an offline machine fails fast.
_DOWNLOAD_TIMEOUT_S = 60
_CHUNK_BYTES = 1 << 20
_PACKAGE_DIRS = frozenset({"site-packages", "dist-packages"})


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A whole corpus as one string, with where it came from and the sha256 of its UTF-8 text."""

    text: str
    description: str
    sha256: str


def pystdlib_files() -> list[pathlib.Path]:
    """Returns the running interpreter's stdlib `.py` files, sorted by path relative to the stdlib.

    Installed packages (site-packages, dist-packages) are excluded: they differ between machines,
    while the stdlib of one Python version is the same everywhere.
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        # Pruned, not filtered: site-packages can hold 100k files (1.5 s to list, 0.1 s pruned).
        subfolders[:] = [d for d in subfolders if d not in _PACKAGE_DIRS]
        files += [pathlib.Path(folder, n) for n in names if n.endswith(".py")]
    files = [path for path in files if path.is_file()]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _sha256_file(path: pathlib.Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def download(url: str, sha256: str, dest: pathlib.Path) -> pathlib.Path:
    """Returns `dest` holding the file at `url` whose sha256 is `sha256`, downloading if needed.

    A cached `dest` with the right checksum is reused. A download goes to a temporary file beside
    `dest` and is moved into place only once verified, so a failure leaves no partial file.
    """
    dest = pathlib.Path(dest)
    fix = "or download it yourself and pass the local file with --config.data.path=FILE"
    if dest.exists():
        got = _sha256_file(dest)
        if got == sha256:
            logging.info("Reusing %s (sha256 verified).", dest)
            return dest
        logging.warning("Cached %s has sha256 %s, expected %s: downloading again.", dest, got,
                        sha256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = pathlib.Path(tmp_name)
    try:
        digest = hashlib.sha256()
        logging.info("Downloading %s to %s.", url, dest)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                    while chunk := response.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise RuntimeError(
                    f"could not download {url}: {reason}; check the network {fix}."
                ) from e
        got = digest.hexdigest()
        if got != sha256:
            raise ValueError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}; the file "
                f"changed or the download was corrupted: retry, {fix}."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _load_files(paths: list[pathlib.Path], where: str) -> str:
    """Returns the UTF-8 files among `paths` joined with newlines; warns about skipped ones."""
    texts = []
    for path in paths:
        try:
            texts.append(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            # Binary files and legacy encodings in a folder are noise, not an error.
            continue
    if len(texts) < len(paths):
        logging.warning("Skipped %d of %d files under %s: not valid UTF-8.",
                        len(paths) - len(texts), len(paths), where)
    return "\n".join(texts)


def _load_path(path: pathlib.Path) -> tuple[str, str]:
    """Returns (text, description) of a local text file or of every file beneath a folder."""
    if not path.exists():
        raise FileNotFoundError(
            f"data.path {str(path)!r} does not exist; set --config.data.path to a text file or a "
            "folder of text files."
        )
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        files.sort(key=lambda p: p.relative_to(path).as_posix())
        return _load_files(files, str(path)), f"folder {path.resolve()} ({len(files)} files)"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data.path {str(path)!r} is not valid UTF-8 text: {e}") from e
    return text, f"file {path.resolve()}"


def _load_named(name: str, cache_dir: str) -> tuple[str, str]:
    """Returns (text, description) of the named corpus."""
    if name == "pystdlib":
        files = pystdlib_files()
        text = _load_files(files, sysconfig.get_paths()["stdlib"])
        return text, f"pystdlib (Python {platform.python_version()} stdlib, {len(files)} files)"
    if name == "shakespeare":
        dest = pathlib.Path(cache_dir) / "shakespeare" / "input.txt"
        download(SHAKESPEARE_URL, SHAKESPEARE_SHA256, dest)
        return dest.read_bytes().decode("utf-8"), f"shakespeare ({SHAKESPEARE_URL})"
    raise ValueError(f"unknown corpus {name!r}; valid names: {', '.join(CORPORA)}")


def load_corpus(name: str | None, path: str | None, cache_dir: str) -> Corpus:
    """Returns the corpus at `path` (a text file or a folder) if given, else the named corpus.

    Folders are read in sorted relative-path order, skipping files that are not UTF-8, and their
    documents joined with "\\n". Downloads are cached under `cache_dir`.
    """
    if path:
        text, description = _load_path(pathlib.Path(path))
    elif name:
        text, description = _load_named(name, cache_dir)
    else:
        raise ValueError(
            f"no corpus given: set data.corpus to one of {', '.join(CORPORA)} or data.path."
        )
    if not text:
        raise ValueError(f"corpus {description} is empty.")
    sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    logging.info("Loaded corpus %s: %d characters, sha256 %s.", description, len(text), sha256)
    return Corpus(text=text, description=description, sha256=sha256)
