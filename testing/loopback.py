"""Real shard servers on 127.0.0.1 for tests and benches: HTTP with injectable faults, S3 (moto)
and Google Cloud Storage (gcp-storage-emulator).

``HTTPShardServer(root)`` serves the files under ``root`` (stdlib ``http.server`` in a thread,
an ephemeral port) with a fixed per-request ``latency_s`` and faults queued per file:
``"drop"`` (announce the full length, send half, close the connection) or ``"500"``; files in
``unreachable`` always answer 503. ``S3ShardServer`` is moto's ``ThreadedMotoServer`` (needs the
``moto[server]`` test extra) with the same latency; ``upload(root, bucket)`` copies a shard
folder into a bucket, and the context manager points ``AWS_ENDPOINT_URL`` (and dummy
credentials) at it, exactly how a user points a run at MinIO or another S3-compatible store.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections import Counter, defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class HTTPShardServer:
    """Files of ``root`` at ``http://127.0.0.1:PORT/<relative path>``; see the module docstring."""

    def __init__(self, root: str | Path, latency_s: float = 0.0) -> None:
        self.root, self.latency_s = Path(root).resolve(), float(latency_s)
        self.faults: defaultdict[str, deque[str]] = defaultdict(deque)  # name -> faults for the next GETs
        self.unreachable: set[str] = set()
        self.requests: Counter = Counter()  # (method, name) -> count
        self.faults_served: Counter = Counter()
        self._mu = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def url(self, name: str | Path) -> str:
        rel = Path(name).resolve().relative_to(self.root) if Path(name).is_absolute() else Path(name)
        return f"{self.base_url}/{rel.as_posix()}"

    def inject(self, name: str, *faults: str) -> None:
        """Queue faults ("drop", "500") for the next GETs of ``name`` (a path relative to root)."""
        with self._mu:
            self.faults[name].extend(faults)

    def _next_fault(self, name: str) -> str | None:
        with self._mu:
            if name in self.unreachable:
                return "503"
            q = self.faults.get(name)
            return q.popleft() if q else None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                return None

            def _serve(self, body: bool) -> None:
                time.sleep(server.latency_s)
                name = self.path.split("?", 1)[0].lstrip("/")
                with server._mu:
                    server.requests[(self.command, name)] += 1
                path = (server.root / name).resolve()
                if server.root not in path.parents or not path.is_file():
                    self.send_error(404)
                    return
                fault = server._next_fault(name) if body else (("503" if name in server.unreachable else None))
                if fault in ("500", "503"):
                    server.faults_served[fault] += 1
                    self.send_error(int(fault))
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not body:
                    return
                if fault == "drop":
                    server.faults_served["drop"] += 1
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve(True)

            def do_HEAD(self) -> None:
                self._serve(False)

        return Handler

    def start(self) -> "HTTPShardServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "HTTPShardServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _delayed(app: Callable, latency_s: float) -> Callable:
    def wrapped(environ: dict, start_response: Callable) -> Any:
        time.sleep(latency_s)
        return app(environ, start_response)
    return wrapped


class S3ShardServer:
    """moto's S3 in server mode on 127.0.0.1; as a context manager it sets ``AWS_ENDPOINT_URL``
    and dummy credentials in ``os.environ`` (restored on exit)."""

    def __init__(self, latency_s: float = 0.0) -> None:
        from moto.server import DomainDispatcherApplication, ThreadedMotoServer, create_backend_app
        from werkzeug.serving import make_server

        latency = float(latency_s)

        class Server(ThreadedMotoServer):  # moto's threaded server with a per-request delay
            def _server_entry(self) -> None:
                from moto.server import MotoRequestHandler
                app = _delayed(DomainDispatcherApplication(create_backend_app), latency)
                self._server = make_server(self._ip_address, self._port, app, True,
                                           request_handler=MotoRequestHandler)
                self._server_ready_event.set()
                self._server.serve_forever()

        self._server = (Server if latency > 0 else ThreadedMotoServer)(ip_address="127.0.0.1", port=0, verbose=False)
        self._saved: dict[str, str | None] = {}

    @property
    def endpoint(self) -> str:
        host, port = self._server.get_host_and_port()
        return f"http://{host}:{port}"

    def __enter__(self) -> "S3ShardServer":
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self._server.start()
        self._saved = _set_env({**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint})
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.stop()
        _set_env(self._saved)

    def upload(self, root: str | Path, bucket: str, prefix: str = "") -> str:
        """Create ``bucket`` and copy the files under ``root`` into it; returns ``s3://bucket/prefix``."""
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials())
        s3.create_bucket(Bucket=bucket)
        for path, key in _files(root):
            s3.upload_file(str(path), bucket, f"{prefix}{key}")
        return f"s3://{bucket}/{prefix}".rstrip("/")


class GCSShardServer:
    """A Google Cloud Storage emulator (``gcp-storage-emulator``, in memory, the ``gcs`` test
    extra) on 127.0.0.1; as a context manager it sets ``STORAGE_EMULATOR_HOST``, which gcsfs and
    Google's clients read, exactly how a user points a run at an emulator (restored on exit)."""

    def __init__(self) -> None:
        from gcp_storage_emulator.server import create_server

        self._server = create_server("127.0.0.1", 0, in_memory=True)
        self._saved: dict[str, str | None] = {}

    @property
    def endpoint(self) -> str:
        host, port = self._server._api._httpd.server_address  # the ephemeral port, once started
        return f"http://{host}:{port}"

    def __enter__(self) -> "GCSShardServer":
        logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
        self._server.start()
        self._saved = _set_env({"STORAGE_EMULATOR_HOST": self.endpoint})
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.stop()
        _set_env(self._saved)

    def upload(self, root: str | Path, bucket: str, prefix: str = "") -> str:
        """Create ``bucket`` and copy the files under ``root`` into it; returns ``gs://bucket/prefix``."""
        import gcsfs

        fs = gcsfs.GCSFileSystem(skip_instance_cache=True)
        fs.mkdir(bucket)
        for path, key in _files(root):
            fs.pipe_file(f"{bucket}/{prefix}{key}", path.read_bytes())
        return f"gs://{bucket}/{prefix}".rstrip("/")


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]}


def _files(root: str | Path) -> list[tuple[Path, str]]:
    """The files under ``root`` with their object keys (relative POSIX paths), sorted."""
    root = Path(root)
    return [(p, p.relative_to(root).as_posix()) for p in sorted(root.rglob("*")) if p.is_file()]


def _set_env(values: dict[str, str | None]) -> dict[str, str | None]:
    """Set (None: unset) environment variables; returns their previous values, for a later call to
    put back. fsspec caches filesystem objects: a new endpoint in the environment needs fresh ones,
    so the cached s3fs and gcsfs instances are dropped."""
    previous = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    for module, cls in (("s3fs", "S3FileSystem"), ("gcsfs", "GCSFileSystem")):
        try:
            getattr(importlib.import_module(module), cls).clear_instance_cache()
        except ImportError:
            continue
    return previous


__all__ = ["HTTPShardServer", "S3ShardServer", "GCSShardServer"]
