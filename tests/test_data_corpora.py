"""Tests for gpt_jax.data.corpora, with downloads served by a local HTTP server."""

import functools
import hashlib
import http.server
import socket
import sysconfig
import threading

import pytest

from gpt_jax.data import corpora


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        del format, args


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1; yields (www dir, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # A short poll interval keeps shutdown (and so each test) fast.
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"


def test_pystdlib_files_sorted_and_without_packages():
    root = sysconfig.get_paths()["stdlib"]
    files = corpora.pystdlib_files()
    assert len(files) > 100
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in r or "dist-packages" in r for r in rel)
    assert "os.py" in rel


def test_folder_corpus_order_and_binary_skipped(tmp_path):
    data = tmp_path / "docs"
    (data / "b").mkdir(parents=True)
    (data / "b" / "2.txt").write_text("two", encoding="utf-8")
    (data / "a.txt").write_text("one", encoding="utf-8")
    (data / "c.txt").write_text("thrée", encoding="utf-8")
    (data / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    corpus = corpora.load_corpus(None, str(data), str(tmp_path / "cache"))
    assert corpus.text == "one\ntwo\nthrée"
    assert corpus.sha256 == _sha(corpus.text.encode("utf-8"))
    assert str(data.resolve()) in corpus.description


def test_file_corpus_takes_precedence_over_name(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("to be or not to be", encoding="utf-8")
    corpus = corpora.load_corpus("shakespeare", str(path), str(tmp_path / "cache"))
    assert corpus.text == "to be or not to be"
    assert not (tmp_path / "cache").exists()


def test_missing_path_names_the_config_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.path.*nope"):
        corpora.load_corpus(None, str(tmp_path / "nope"), str(tmp_path))


def test_unknown_name_and_empty_corpus(tmp_path):
    with pytest.raises(ValueError, match="pystdlib, shakespeare"):
        corpora.load_corpus("wikipedia", None, str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        corpora.load_corpus(None, str(empty), str(tmp_path))


def test_download_good_file_cached_and_reused(server, tmp_path):
    www, url = server
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    (www / "input.txt").write_bytes(payload)
    dest = tmp_path / "cache" / "shakespeare" / "input.txt"
    assert corpora.download(f"{url}/input.txt", _sha(payload), dest) == dest
    assert dest.read_bytes() == payload
    mtime = dest.stat().st_mtime_ns
    # Reuse must not touch the network: an unreachable URL still works once cached.
    assert corpora.download(_closed_port_url(), _sha(payload), dest) == dest
    assert dest.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in dest.parent.iterdir()) == ["input.txt"]


def test_download_replaces_corrupt_cache(server, tmp_path):
    www, url = server
    payload = b"the real thing"
    (www / "input.txt").write_bytes(payload)
    dest = tmp_path / "input.txt"
    dest.write_bytes(b"truncated")
    corpora.download(f"{url}/input.txt", _sha(payload), dest)
    assert dest.read_bytes() == payload


def test_download_bad_checksum_leaves_no_file(server, tmp_path):
    www, url = server
    (www / "input.txt").write_bytes(b"tampered")
    dest_dir = tmp_path / "cache"
    expected = _sha(b"original")
    with pytest.raises(ValueError, match=rf"{url}/input.txt.*expected sha256 {expected}, got") as e:
        corpora.download(f"{url}/input.txt", expected, dest_dir / "input.txt")
    assert "data.path" in str(e.value) and "\n" not in str(e.value)
    assert list(dest_dir.iterdir()) == []


def test_download_unreachable_is_a_clear_error(tmp_path):
    url = _closed_port_url()
    with pytest.raises(RuntimeError, match=rf"could not download {url}.*data\.path") as e:
        corpora.download(url, _sha(b"x"), tmp_path / "input.txt")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_download_http_error_is_a_clear_error(server, tmp_path):
    _, url = server
    dest_dir = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="could not download"):
        corpora.download(f"{url}/missing.txt", _sha(b"x"), dest_dir / "input.txt")
    assert list(dest_dir.iterdir()) == []


def test_shakespeare_downloads_into_cache_dir(server, tmp_path, monkeypatch):
    www, url = server
    payload = b"ROMEO:\nBut, soft!\n"
    (www / "input.txt").write_bytes(payload)
    monkeypatch.setattr(corpora, "SHAKESPEARE_URL", f"{url}/input.txt")
    monkeypatch.setattr(corpora, "SHAKESPEARE_SHA256", _sha(payload))
    corpus = corpora.load_corpus("shakespeare", None, str(tmp_path / "cache"))
    assert corpus.text == payload.decode()
    assert corpus.sha256 == _sha(payload)
    assert (tmp_path / "cache" / "shakespeare" / "input.txt").read_bytes() == payload
