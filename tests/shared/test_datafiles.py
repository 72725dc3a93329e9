"""Tests for data directory resolution, checksummed downloads and the missing-file error."""

import hashlib
import os

import pytest

from shared.datafiles import DATA_DIR_ENV, RemoteFile, ensure_files, resolve_data_dir
from shared.errors import DataError


def test_flag_beats_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"


def test_environment_beats_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"


def test_cache_folder_fallback(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir(None) == tmp_path / "cache" / "rnn-pipelines" / "data"


def test_existing_files_found(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "a.txt").write_text("x")
    found = ensure_files("Toy", [RemoteFile("toy/a.txt")], tmp_path)
    assert found == {"toy/a.txt": tmp_path / "toy" / "a.txt"}


def test_missing_files_listed_together(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "a.txt").write_text("x")
    files = [RemoteFile("toy/a.txt"), RemoteFile("toy/b.txt"), RemoteFile("toy/c.txt", url="https://example.org/c")]
    with pytest.raises(DataError) as raised:
        ensure_files("Toy", files, tmp_path, download=False)
    message = str(raised.value)
    assert "2 file(s) missing" in message
    assert f"{tmp_path / 'toy' / 'b.txt'}  [MISSING" in message
    assert "https://example.org/c" in message
    assert "--data-dir" in message


def test_download_verifies_checksum(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"real data")
    digest = hashlib.sha256(b"real data").hexdigest()
    remote = RemoteFile("toy/data.bin", url=source.as_uri(), sha256=digest)
    found = ensure_files("Toy", [remote], tmp_path / "data")
    assert found["toy/data.bin"].read_bytes() == b"real data"


def test_download_checksum_mismatch_writes_nothing(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"tampered")
    remote = RemoteFile("toy/data.bin", url=source.as_uri(), sha256="0" * 64)
    with pytest.raises(DataError, match="checksum mismatch"):
        ensure_files("Toy", [remote], tmp_path / "data")
    assert list((tmp_path / "data" / "toy").iterdir()) == []


def test_failed_download_reported(tmp_path):
    remote = RemoteFile("toy/data.bin", url=(tmp_path / "absent.bin").as_uri())
    with pytest.raises(DataError, match=r"MISSING \(download failed"):
        ensure_files("Toy", [remote], tmp_path / "data")


def test_missing_without_url_promises_no_download(tmp_path):
    with pytest.raises(DataError) as raised:
        ensure_files("Toy", [RemoteFile("toy/a.txt")], tmp_path)
    assert "downloaded" not in str(raised.value)


def test_downloaded_file_has_default_mode(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"real data")
    remote = RemoteFile("toy/data.bin", url=source.as_uri())
    found = ensure_files("Toy", [remote], tmp_path / "data")
    umask = os.umask(0)
    os.umask(umask)
    assert found["toy/data.bin"].stat().st_mode & 0o777 == 0o666 & ~umask
