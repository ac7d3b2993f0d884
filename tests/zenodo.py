"""A local stand-in for Zenodo on 127.0.0.1: the record API and file downloads, with faults on demand.

It answers what ``https://zenodo.org/api/records/ID`` answers (the fields the
downloader reads, in Zenodo's layout: ``files: [{id, key, size, checksum:
"md5:...", links: {self: ".../api/records/ID/files/KEY/content"}}]``) and
serves the files with HTTP ``Range`` support.  Faults, per file:

* ``cut_at=N`` (``cut_times=K``): send the headers of the whole file, then
  only N bytes, then close the connection (an interrupted transfer);
* ``truncate_to=N``: the file on the server is only N bytes long;
* ``status=CODE`` (``status_times=K``): answer the file request with an HTTP error;
* ``ignore_range=True``: answer every request with the whole file (200).

The record itself can fail with ``record_status``; ``published`` overrides
what the record says about a file (a wrong checksum, another size);
``zenodo_links=True`` makes the links point at https://zenodo.org (a
verbatim copy of Zenodo's JSON, as a mirror might serve).
Every request is logged as ``(path, Range header)``.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RECORD = "15739280"


class FakeZenodo:
    def __init__(self, record: str = RECORD) -> None:
        self.record = record
        self.files: dict[str, bytes] = {}
        self.published: dict[str, dict] = {}
        self.faults: dict[str, dict] = {}
        self.record_status: int | None = None
        self.zenodo_links = False
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, key: str, data: bytes) -> None:
        self.files[key] = data

    def file_requests(self, key: str) -> list[str | None]:
        """The Range headers of the requests for one file, in order (None: no range)."""
        return [r for p, r in self.requests if p.endswith(f"/files/{key}/content")]

    def record_json(self) -> dict:
        host = "https://zenodo.org" if self.zenodo_links else self.base
        files = []
        for key, data in self.files.items():
            entry = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, key)), "key": key, "size": len(data),
                     "checksum": "md5:" + hashlib.md5(data).hexdigest(),
                     "links": {"self": f"{host}/api/records/{self.record}/files/{key}/content"}}
            entry.update(self.published.get(key, {}))
            files.append(entry)
        return {"id": int(self.record), "recid": self.record,
                "metadata": {"title": "SCOREQ ONNX models (test stand-in)", "license": {"id": "cc-by-4.0"}},
                "files": files}

    def __enter__(self) -> FakeZenodo:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _handler(z: FakeZenodo):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:  # noqa: N802
            rng = self.headers.get("Range")
            with z.lock:
                z.requests.append((self.path, rng))
            api = f"/api/records/{z.record}"
            if self.path == api:
                if z.record_status:
                    self.send_error(z.record_status)
                    return
                body = json.dumps(z.record_json()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            prefix, suffix = f"{api}/files/", "/content"
            if not (self.path.startswith(prefix) and self.path.endswith(suffix)):
                self.send_error(404)
                return
            key = self.path[len(prefix):-len(suffix)]
            if key not in z.files:
                self.send_error(404)
                return
            self._serve(key, rng)

        def _serve(self, key: str, rng: str | None) -> None:
            fault = z.faults.get(key, {})
            data = z.files[key][: fault["truncate_to"]] if "truncate_to" in fault else z.files[key]
            with z.lock:
                if fault.get("status") and fault.get("status_times", 1) > 0:
                    fault["status_times"] = fault.get("status_times", 1) - 1
                    code = fault["status"]
                else:
                    code = None
                cut = None
                if fault.get("cut_at") is not None and fault.get("cut_times", 1) > 0:
                    fault["cut_times"] = fault.get("cut_times", 1) - 1
                    cut = fault["cut_at"]
            if code:
                self.send_error(code)
                return
            start = 0
            if rng and not fault.get("ignore_range"):
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if cut is not None:
                self.wfile.write(body[: max(0, cut - start)])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # the transfer dies mid-file
                self.close_connection = True
                return
            for i in range(0, len(body), 1 << 16):
                self.wfile.write(body[i:i + (1 << 16)])

    return Handler
