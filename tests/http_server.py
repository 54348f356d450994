"""Threaded HTTP file server on 127.0.0.1 with Range support and switchable faults, for tests.

The server listens on a free port, serves the files of one folder and records every GET.
Faults apply to the next ``count`` requests (all requests when ``count`` is None) and are
replaced by each ``set_faults`` call.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Faults:
    """Misbehaviour for the next requests; byte counts are of the response body."""

    status: int | None = None  # respond with this status and a short text body
    truncate_after: int | None = None  # send this many bytes, then close the connection cleanly
    drop_after: int | None = None  # send this many bytes, then reset the connection (TCP RST)
    stall_s: float = 0.0  # pause this many seconds, at the point set by stall_after
    stall_after: int | None = None  # pause after this many bytes; None pauses before the status line
    ignore_range: bool = False  # respond 200 with the whole file even to a Range request
    wrong_content_range: bool = False  # respond 206 from byte 0 whatever the requested start
    count: int | None = None  # number of requests the faults apply to; None means every request


@dataclass(frozen=True)
class RequestRecord:
    """One GET as the server saw it: the path, the Range header and the status sent."""

    path: str
    range: str | None
    status: int


class FileServer:
    """Serve the files under ``root`` at ``url`` until ``stop`` is called."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.records: list[RequestRecord] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._faults = Faults()
        self._faulty_left: int | None = None
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.file_server = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``http://127.0.0.1:40123``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FileServer:
        """Start serving in a background thread and return self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """End stalls in progress, stop accepting requests and close the listening socket."""
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def set_faults(self, **fields: object) -> None:
        """Replace the current faults with ``Faults(**fields)``; no fields clears them."""
        faults = Faults(**fields)  # type: ignore[arg-type]
        with self._lock:
            self._faults = faults
            self._faulty_left = faults.count

    def take_faults(self) -> Faults:
        """Return the faults for one new request and count it against ``Faults.count``."""
        with self._lock:
            if self._faulty_left is None:
                return self._faults
            if self._faulty_left <= 0:
                return Faults()
            self._faulty_left -= 1
            return self._faults

    def record(self, path: str, range_header: str | None, status: int) -> None:
        with self._lock:
            self.records.append(RequestRecord(path, range_header, status))

    def resolve(self, request_path: str) -> Path | None:
        """Return the served file for a request path, or None if it is missing or outside root."""
        relative = unquote(urlsplit(request_path).path).lstrip("/")
        candidate = (self.root / relative).resolve()
        if not candidate.is_relative_to(self.root) or not candidate.is_file():
            return None
        return candidate


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        app: FileServer = self.server.file_server  # type: ignore[attr-defined]
        faults = app.take_faults()
        range_header = self.headers.get("Range")
        path = app.resolve(self.path)
        data = path.read_bytes() if path is not None else b""
        if faults.status is not None or path is None:
            status, start = (faults.status if faults.status is not None else 404), 0
        else:
            status, start = self._choose_range(range_header, len(data), faults)
        # Record before any stall, so tests that time out still see the request.
        app.record(self.path, range_header, status)
        if faults.stall_s and faults.stall_after is None:
            app.stopping.wait(faults.stall_s)

        if faults.status is not None or path is None:
            self._send_text(status, f"status {status} for {self.path}\n")
            return
        if status == 416:
            self._send_text(416, "range not satisfiable\n", {"Content-Range": f"bytes */{len(data)}"})
            return
        self._send_file_part(data, status, start)
        self._send_body(data[start:], faults, app)

    def _choose_range(self, range_header: str | None, size: int, faults: Faults) -> tuple[int, int]:
        """Return the status and first byte for a request; only ``bytes=N-`` ranges are honoured."""
        if faults.wrong_content_range:
            return 206, 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if faults.ignore_range or match is None:
            return 200, 0
        start = int(match.group(1))
        if start >= size:
            return 416, start
        return 206, start

    def _send_file_part(self, data: bytes, status: int, start: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Connection", "close")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        self.close_connection = True

    def _send_body(self, body: bytes, faults: Faults, app: FileServer) -> None:
        try:
            if faults.stall_s and faults.stall_after is not None:
                self._write(body[: faults.stall_after])
                app.stopping.wait(faults.stall_s)
                self._write(body[faults.stall_after:])
            elif faults.truncate_after is not None:
                self._write(body[: faults.truncate_after])
            elif faults.drop_after is not None:
                self._write(body[: faults.drop_after])
                time.sleep(0.1)  # let the client read what was sent before the reset
                self._reset_connection()
            else:
                self._write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as timeout tests expect

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def _reset_connection(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def _send_text(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True
        self.wfile.write(body)
