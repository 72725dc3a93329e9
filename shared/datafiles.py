"""Locating dataset files: data directory resolution, checksummed downloads, missing-file errors.

The data directory is ``--data-dir`` if given, else ``$PIPELINES_DATA_DIR``, else the
cache folder ``$XDG_CACHE_HOME/rnn-pipelines/data`` (``~/.cache/rnn-pipelines/data``).
Each dataset lives in a subfolder such as ``translation/multi30k``. A file that is
missing is downloaded from its canonical URL into the data directory and accepted only
if its sha256 matches. A failed download leaves nothing behind. When files are still
missing (offline, say), one `DataError` lists every expected file and how to provide it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

from shared.errors import DataError

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "PIPELINES_DATA_DIR"
DOWNLOAD_TIMEOUT_SECONDS = 30


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """A dataset file: its path inside the data directory, where to download it, its sha256."""

    path: str
    url: str | None = None
    sha256: str | None = None


def default_cache_dir() -> Path:
    """Return the cache folder used when neither --data-dir nor $PIPELINES_DATA_DIR is set."""
    cache_root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_root) / "rnn-pipelines" / "data"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Return the data directory: the argument, else $PIPELINES_DATA_DIR, else the cache folder."""
    if data_dir:
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return default_cache_dir()


def compute_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, target: Path, sha256: str | None) -> None:
    """Download ``url`` to ``target`` atomically, verifying ``sha256`` when given.

    Raises:
        OSError: the download failed (no network, HTTP error, timeout).
        DataError: the downloaded bytes do not match the expected sha256.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
        tmp_path = Path(tmp.name)
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
                shutil.copyfileobj(response, tmp)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
    actual = compute_sha256(tmp_path)
    if sha256 and actual != sha256:
        tmp_path.unlink(missing_ok=True)
        raise DataError(
            f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}. "
            "The download is corrupt or the source changed; nothing was written."
        )
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # tempfile makes it owner-only; give the usual mode.
    tmp_path.replace(target)
    logger.info("Downloaded %s to %s (sha256 %s)", url, target, actual)


def ensure_files(
    dataset: str,
    files: Sequence[RemoteFile],
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
) -> dict[str, Path]:
    """Return the local path of every file of ``dataset``, downloading the missing ones.

    Args:
        dataset: human-readable dataset name used in messages, e.g. "Multi30k".
        files: the files the dataset needs, relative to the data directory.
        data_dir: explicit data directory; see `resolve_data_dir` for the fallbacks.
        download: try canonical URLs for missing files.

    Returns:
        A mapping from each `RemoteFile.path` to its absolute local path.

    Raises:
        DataError: some files are missing and could not be downloaded; the message lists
            every expected file, its source and how to provide it.
    """
    root = resolve_data_dir(data_dir)
    found: dict[str, Path] = {}
    missing: list[tuple[RemoteFile, str]] = []
    for remote in files:
        local = root / remote.path
        if local.is_file():
            found[remote.path] = local
            continue
        reason = "no download URL"
        if download and remote.url:
            try:
                download_file(remote.url, local, remote.sha256)
                found[remote.path] = local
                continue
            except (OSError, urllib.error.URLError) as error:
                reason = f"download failed: {error}"
        missing.append((remote, reason))
    if missing:
        raise DataError(format_missing_files(dataset, root, files, missing))
    return found


def format_missing_files(
    dataset: str,
    root: Path,
    files: Iterable[RemoteFile],
    missing: Sequence[tuple[RemoteFile, str]],
) -> str:
    """Build the message listing every expected file of a dataset and how to provide it."""
    missing_paths = {remote.path for remote, _ in missing}
    reasons = {remote.path: reason for remote, reason in missing}
    lines = [f"{dataset}: {len(missing)} file(s) missing under the data directory {root}."]
    lines.append("Expected files:")
    for remote in files:
        status = f"MISSING ({reasons[remote.path]})" if remote.path in missing_paths else "ok"
        source = f" from {remote.url}" if remote.url else ""
        lines.append(f"  {root / remote.path}  [{status}]{source}")
    fix = (
        "To fix: copy the files to those paths, or point --data-dir (or $PIPELINES_DATA_DIR) "
        "at a folder that contains them."
    )
    if any(remote.url for remote, _ in missing):
        fix += " Files with a source URL are downloaded and checked when the network is reachable."
    lines.append(fix)
    return "\n".join(lines)
