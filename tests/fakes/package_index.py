"""A tiny package index on 127.0.0.1 for the environment tests: one real wheel (``WHEEL_NAME``,
with ``PAYLOAD_BYTES`` of incompressible data, so its size is what it weighs) served from a
PEP 503 simple index with its PEP 658 metadata beside it, and a record of every request in
order, so a test can say what pip fetched and when. No network is needed."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import os
import threading
import zipfile
from pathlib import Path

PROJECT = "harness-size-probe"
MODULE = "harness_size_probe"
VERSION = "1.0"
WHEEL_NAME = f"{MODULE}-{VERSION}-py3-none-any.whl"
PAYLOAD_BYTES = 300_000


def build_wheel(folder: Path) -> tuple[Path, bytes]:
    """A minimal valid wheel and its METADATA."""
    metadata = f"Metadata-Version: 2.1\nName: {PROJECT}\nVersion: {VERSION}\n".encode()
    dist_info = f"{MODULE}-{VERSION}.dist-info"
    files = {f"{MODULE}/__init__.py": b"VALUE = 42\n",
             f"{MODULE}/payload.bin": os.urandom(PAYLOAD_BYTES),
             f"{dist_info}/METADATA": metadata,
             f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: "
                                   b"true\nTag: py3-none-any\n"}
    record = io.StringIO()
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.write(f"{name},sha256={digest},{len(data)}\n")
    record.write(f"{dist_info}/RECORD,,\n")
    path = folder / WHEEL_NAME
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist_info}/RECORD", record.getvalue())
    return path, metadata


class PackageIndex:
    """``url``: the simple index; ``requests``: (method, path) in the order they came;
    ``wheel``: the served file."""

    def __init__(self, folder: Path):
        self.wheel, metadata = build_wheel(folder)
        self.requests: list[tuple[str, str]] = []
        digest = hashlib.sha256(metadata).hexdigest()
        page = (f'<html><body><a href="/files/{WHEEL_NAME}" data-core-metadata="sha256={digest}" '
                f'data-dist-info-metadata="sha256={digest}">{WHEEL_NAME}</a></body></html>')
        routes = {f"/simple/{PROJECT}/": ("text/html", page.encode()),
                  f"/files/{WHEEL_NAME}": ("application/octet-stream", self.wheel.read_bytes()),
                  f"/files/{WHEEL_NAME}.metadata": ("text/plain", metadata)}
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                index.requests.append(("GET", self.path))
                kind, body = routes.get(self.path, (None, None))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def requirements(self) -> str:
        """A requirements file installing the wheel from this index only."""
        return f"--index-url {self.url}\n{PROJECT}=={VERSION}\n"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
