"""A fault-injecting HTTP proxy on loopback, in front of a real S3 endpoint (the moto server).

The client (pyarrow's S3 client, in the driver and in Ray workers) talks to the proxy as if it were
S3. The proxy forwards each request to the upstream and, on the first attempt of every `every`-th
distinct request (method, path, query, range), injects one transient fault instead, in turn:

- ``slowdown``     answer 503 SlowDown (S3's throttling error) without forwarding;
- ``reset``        read the request, then reset the connection (TCP RST) without forwarding;
- ``reset_after``  for GET/HEAD: forward, then reset instead of answering (the server did the work,
                   the client never hears of it); other methods get ``reset``.

A retry of the same request is forwarded, so a client that retries loses nothing; one that does not
fails. `counts` says what was injected.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULTS = ("slowdown", "reset", "reset_after")
SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'  # as AWS S3 words it
            b"<Message>Please reduce your request rate.</Message><RequestId>4442587FB7D0A2F9</RequestId>"
            b"<HostId>eftixk72aD6Ap51TnqcoF8eFidJG9Z/2mkiDFu8yU9AS1ed4OpIszj7UDNEHGran</HostId></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "trailer", "expect"}


class FaultProxy:
    def __init__(self, upstream: str, every: int = 3):
        self.upstream = urlparse(upstream)
        self.every = every
        self.counts = {"requests": 0, "forwarded": 0, **{f: 0 for f in FAULTS}}
        self._seen: set = set()
        self._distinct = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reset(self):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            def _handle(self):
                body = self._body()
                fault = proxy._decide(self.command, self.path, self.headers.get("Range"))
                if fault == "slowdown":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOWDOWN)
                    return
                if fault == "reset":
                    return self._reset()
                status, headers, data = proxy._forward(self.command, self.path, self.headers, body)
                if fault == "reset_after":
                    return self._reset()
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
                self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def finish(self):
                try:
                    super().finish()
                except OSError:
                    pass

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _decide(self, method: str, path: str, range_: str | None) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            key = (method, path, range_)
            if key in self._seen:
                return None  # a retry: let it through
            self._seen.add(key)
            self._distinct += 1
            if self._distinct % self.every:
                return None
            fault = FAULTS[(self._distinct // self.every) % len(FAULTS)]
            if fault == "reset_after" and method not in ("GET", "HEAD"):
                fault = "reset"
            self.counts[fault] += 1
            return fault

    def _forward(self, method, path, headers, body):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            out = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"}
            out["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=out)
            resp = conn.getresponse()
            data = resp.read()
            with self._lock:
                self.counts["forwarded"] += 1
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
