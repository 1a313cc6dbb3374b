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
from typing import Any, Callable, TypeVar

import braceexpand

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "http://", "https://")
PIPE = "pipe:"
T = TypeVar("T")
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


def _pin_fsspec_loop() -> None:
    """Before a fork: hold fsspec's event loop in a list the child inherits. fsspec drops the
    loop in the child; without this reference the child would garbage-collect it, and closing
    it there unregisters the parent's wake-up pipe from the epoll set both processes share, so
    the parent's next remote read would wait for its 5-minute timeout."""
    asyn = sys.modules.get("fsspec.asyn")
    _PINNED[:] = [asyn.loop[0]] if asyn is not None else []


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_pin_fsspec_loop)


def _with_fs(url: str, fn: Callable[[Any, str], T]) -> T:
    """``fn(filesystem, path)`` on a fresh fsspec filesystem, closed before returning.

    Not fsspec's shared instances: a process that forks DataLoader workers while one of them
    holds pooled keep-alive connections hangs on its next request (the children's clean-up of
    the inherited async client unregisters the parent's sockets from the shared epoll set). A
    fresh client per call costs a connection set-up per shard or manifest, small next to a shard.
    """
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True)
    except ImportError as e:  # e.g. gs:// without gcsfs
        raise RemoteError(f"{redact(url)}: the client for this scheme is not installed ({e})") from None
    try:
        return fn(fs, path)
    finally:
        _close(fs)


def _close(fs: Any) -> int:
    """Run the clean-ups fsspec registered for ``fs`` (``weakref.finalize``: close the HTTP/S3
    session and its sockets) now, in this process, instead of whenever the garbage collector
    gets to the client's reference cycles; returns how many ran."""
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
        out.extend(f"{proto}://{p}" for p in sorted(_with_fs(spec, lambda fs, path: fs.glob(path))))
    return out


def read_bytes(spec: str, timeout_s: float = 600.0) -> bytes:
    """Whole content of a (small) remote file or of a ``pipe:`` command's output."""
    if spec.startswith(PIPE):
        proc = subprocess.run(spec[len(PIPE):], shell=True, capture_output=True, timeout=timeout_s)
        if proc.returncode:
            err = proc.stderr.decode("utf-8", "replace").strip()[-300:]
            raise RemoteError(f"{redact(spec)}: exit status {proc.returncode}: {redact(err)}")
        return proc.stdout
    try:
        return _with_fs(spec, lambda fs, path: fs.cat_file(path))
    except RemoteError:
        raise
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
    def get(fs: Any, path: str) -> Any:
        size = fs.info(path).get("size")
        fs.get_file(path, dest)
        return size

    try:
        expected = _with_fs(spec, get)
    except RemoteError:
        raise
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
