"""Fetch a raw corpus: a local path as is, or an http(s) URL through a sha256-checked cache.

Nothing falls back silently: without network or cache the error names the URL and the fix.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ml_playground.errors import DataError
from ml_playground.files import atomic_file
from ml_playground.sections import is_url

DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """``$ML_PLAYGROUND_CACHE``, else ``$XDG_CACHE_HOME/ml-playground`` (``~/.cache`` default)."""
    explicit = os.environ.get("ML_PLAYGROUND_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ml-playground"


def cached_path_for(url: str) -> Path:
    """Where ``fetch`` keeps ``url``: ``<cache>/downloads/<url hash>/<file name>``."""
    url_hash = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = Path(urllib.parse.urlsplit(url).path).name or "download"
    return cache_dir() / "downloads" / url_hash / name


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check(path: Path, expected: str | None, fix: str) -> None:
    if expected is None:
        return
    actual = _sha256_of(path)
    if actual != expected:
        raise DataError(f"sha256 mismatch for {path}: expected {expected}, got {actual}; {fix}")


def _download(url: str, dest: Path, expected: str | None, timeout: float) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "ml-playground"})
    with atomic_file(dest) as f:  # cached only once whole and checked
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                while chunk := resp.read(_CHUNK):
                    digest.update(chunk)
                    f.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise DataError(
                f"could not download {url} ({reason}); put the file at {dest} "
                "or set prepare.source to a local file"
            ) from None
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise DataError(
                f"sha256 mismatch for download of {url}: expected {expected}, got {actual}; "
                "the file was not cached - check the URL and prepare.source_sha256"
            )


def fetch(source: str | Path, expected: str | None, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Local path of ``source``, downloading an http(s) URL into the cache when needed.

    ``expected`` (a sha256 in lowercase hex, as ``prepare.source_sha256`` admits) is checked
    when given.
    """
    if is_url(source):
        url = str(source)
        cached = cached_path_for(url)
        if cached.is_file():
            _check(cached, expected, f"delete it to download {url} again")
        else:
            _download(url, cached, expected, timeout)
        return cached
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"source {path} does not exist; fix prepare.source (a URL or local file)")
    if expected is not None:
        if not path.is_file():
            raise DataError(
                f"prepare.source_sha256 needs a single file, but {path} is not one; "
                "drop source_sha256 or point prepare.source at the file"
            )
        _check(path, expected, "replace the file or fix prepare.source_sha256")
    return path
