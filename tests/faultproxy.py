"""A fault-injecting HTTP proxy for the S3 tests: forwards to an upstream server, but

- answers 503 SlowDown to GETs of keys containing "flaky" (the first N times) or "broken"
  (always);
- while the file given as ``--down-file`` exists, drops every connection without an answer
  (the endpoint "goes away", as in an outage);
- with ``--latency-ms``, waits that long before forwarding each request (a distant region);
- with ``--hold GLOB``, holds GETs of keys containing "held" until a file matches GLOB (at
  most ``HOLD_MAX_S`` after the first such GET, then never again), so a test can make a read wait for an event it can see on disk.

Run: python tests/faultproxy.py UPSTREAM_PORT LISTEN_PORT [FLAKY_FAILURES] [--down-file F]
     [--latency-ms N] [--hold GLOB]
"""

from __future__ import annotations

import argparse
import glob
import http.client
import os
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOLD_MAX_S = 90.0

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


def make_handler(
    upstream: int,
    flaky_failures: int,
    down_file: str | None = None,
    latency_ms: float = 0.0,
    hold: str | None = None,
):
    seen: Counter[str] = Counter()

    released = threading.Event()  # once let go (by the file or the time limit), for good
    deadline: list[float] = []  # set by the first held GET

    def wait_for_hold() -> None:
        if not deadline:
            deadline.append(time.monotonic() + HOLD_MAX_S)
        while not released.is_set() and not glob.glob(hold) and time.monotonic() < deadline[0]:
            time.sleep(0.05)
        released.set()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _forward(self):
            if down_file and os.path.exists(down_file):
                self.close_connection = True  # no answer at all: the endpoint is gone
                self.connection.close()
                return
            if latency_ms:
                time.sleep(latency_ms / 1000)
            path = self.path.split("?", 1)[0]
            if hold and self.command == "GET" and "held" in path:
                wait_for_hold()
            if self.command == "GET" and ("broken" in path or "flaky" in path):
                seen[path] += 1
                if "broken" in path or seen[path] <= flaky_failures:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("upstream", type=int)
    parser.add_argument("listen", type=int)
    parser.add_argument("flaky", type=int, nargs="?", default=2)
    parser.add_argument("--down-file")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--hold")
    a = parser.parse_args()
    handler = make_handler(a.upstream, a.flaky, a.down_file, a.latency_ms, a.hold)
    ThreadingHTTPServer(("127.0.0.1", a.listen), handler).serve_forever()
