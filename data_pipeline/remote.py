"""Shard locations beyond the local file system: ``s3://``, ``gs://``, ``http(s)://`` URLs and ``pipe:CMD``.

URLs go through fsspec (s3fs for ``s3://``, gcsfs for ``gs://`` when installed, aiohttp for
HTTP), so credentials and endpoints come from each client's standard environment and config
files (for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
``AWS_PROFILE``, ``~/.aws/config``); nothing here reads or logs a credential. ``pipe:CMD`` is
webdataset's convention: the shard is the standard output of the shell command ``CMD``.

This module moves bytes (list, read a small file, download one file); caching, retries and
eviction live in ``shard_cache.py``.
"""
from __future__ import annotations

import os
import posixpath
import re
import subprocess
import sys
import weakref
from typing import Any

import braceexpand

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "http://", "https://")
PIPE = "pipe:"
_GLOB = re.compile(r"[*?\[]")
_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
_QUERY = re.compile(r"(?P<url>[a-z][a-z0-9+.-]*://[^\s?]*)\?\S*", re.IGNORECASE)


class RemoteError(OSError):
    """A remote shard or manifest could not be read (after the retries, where they apply)."""


def is_remote(spec: str) -> bool:
    """True for the URL schemes and ``pipe:`` commands handled here (not for local paths)."""
    return spec.startswith(PIPE) or spec.lower().startswith(REMOTE_SCHEMES)


def redact(spec: str) -> str:
    """``spec`` safe to log: user:password@ and query strings (presigned signatures) removed."""
    spec = _USERINFO.sub(lambda m: m.group("scheme") + "***@", spec)
    return _QUERY.sub(lambda m: m.group("url") + "?***", spec)


_PINNED: list[Any] = []


def _before_fork() -> None:
    """Make a fork (DataLoader workers) safe for the fsspec clients of this process.

    fsspec's async clients share one event loop thread; a forked child inherits the loop and
    the clients' sockets, and its clean-up of them unregisters the parent's sockets and wake-up
    pipe from the epoll set both processes share: the parent's next remote read then waits for
    its 5-minute timeout. So before a fork the cached clients are closed here, in the parent
    (a later call opens new ones), and the loop is held in a list the child inherits, so the
    child never garbage-collects (closes) it.
    """
    asyn = sys.modules.get("fsspec.asyn")
    if asyn is None:
        return
    _PINNED[:] = [asyn.loop[0]]
    registry = sys.modules["fsspec.registry"].registry
    for cls in list(registry.values()):
        if getattr(cls, "async_impl", False):
            for fs in list(getattr(cls, "_cache", {}).values()):
                _close(fs)
            cls.clear_instance_cache()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork)


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # e.g. gs:// without gcsfs
        raise RemoteError(f"{redact(url)}: the client for this scheme is not installed ({e})") from None


def _close(fs: Any) -> int:
    """Run the clean-ups fsspec registered for ``fs`` (``weakref.finalize``: close the HTTP/S3
    session and its sockets) now; returns how many ran."""
    done = 0
    for fin in [f for f in list(weakref.finalize._registry) if (info := f.peek()) is not None and info[0] is fs]:
        fin()
        done += 1
    return done


def expand_remote(pattern: str) -> list[str]:
    """Brace expansion, then a listing for globs (object stores only); ordered like the pattern."""
    out: list[str] = []
    for spec in braceexpand.braceexpand(pattern):
        if not _GLOB.search(spec.split("://", 1)[-1]) or spec.startswith(PIPE):
            out.append(spec)
            continue
        if not spec.lower().startswith(("s3://", "gs://", "gcs://")):
            raise RemoteError(f"{redact(spec)}: globs need a listing, which only s3:// and gs:// provide; "
                              f"use brace patterns ({{000..099}}) or a manifest")
        proto = spec.split("://", 1)[0]
        fs, path = _fs(spec)
        out.extend(f"{proto}://{p}" for p in sorted(fs.glob(path)))
    return out


def read_bytes(spec: str, timeout_s: float = 600.0) -> bytes:
    """Whole content of a (small) remote file or of a ``pipe:`` command's output."""
    if spec.startswith(PIPE):
        proc = subprocess.run(spec[len(PIPE):], shell=True, capture_output=True, timeout=timeout_s)
        if proc.returncode:
            err = proc.stderr.decode("utf-8", "replace").strip()[-300:]
            raise RemoteError(f"{redact(spec)}: exit status {proc.returncode}: {redact(err)}")
        return proc.stdout
    fs, path = _fs(spec)
    try:
        return fs.cat_file(path)
    except Exception as e:  # client errors vary by backend (aiohttp, botocore, gcsfs)
        raise RemoteError(f"{redact(spec)}: {type(e).__name__}: {redact(str(e))[:300]}") from None


def download(spec: str, dest: str, timeout_s: float = 3600.0) -> int:
    """Copy a remote file / a command's output to the local path ``dest``; returns the byte count.

    Raises ``RemoteError`` when the transfer fails or ends short of the size the server announced.
    """
    if spec.startswith(PIPE):
        with open(dest, "wb") as f:
            proc = subprocess.run(spec[len(PIPE):], shell=True, stdout=f, stderr=subprocess.PIPE, timeout=timeout_s)
        if proc.returncode:
            err = proc.stderr.decode("utf-8", "replace").strip()[-300:]
            raise RemoteError(f"{redact(spec)}: exit status {proc.returncode}: {redact(err)}")
        with open(dest, "rb") as f:
            return f.seek(0, 2)
    fs, path = _fs(spec)
    try:
        expected = fs.info(path).get("size")
        fs.get_file(path, dest)
    except Exception as e:  # client errors vary by backend (aiohttp, botocore, gcsfs)
        raise RemoteError(f"{redact(spec)}: {type(e).__name__}: {redact(str(e))[:300]}") from None
    with open(dest, "rb") as f:
        got = f.seek(0, 2)
    if expected is not None and got != int(expected):
        raise RemoteError(f"{redact(spec)}: got {got} of {expected} bytes")
    return got


def join(base: str, rel: str) -> str:
    """A manifest entry's location: absolute paths/URLs stay, relative ones are next to the manifest."""
    if is_remote(rel) or rel.startswith("/"):
        return rel
    if base.startswith(PIPE):
        raise RemoteError(f"{redact(base)}: a manifest read through pipe: must list absolute locations, got {rel!r}")
    return posixpath.join(posixpath.dirname(base), rel)


__all__ = ["RemoteError", "is_remote", "redact", "expand_remote", "read_bytes", "download", "join", "PIPE"]
