"""A fault-injecting HTTP proxy for the S3 tests: forwards to an upstream server, but answers
503 SlowDown to GETs of keys containing "flaky" (the first N times) or "broken" (always).

Run: python tests/faultproxy.py UPSTREAM_PORT LISTEN_PORT [FLAKY_FAILURES]
"""

from __future__ import annotations

import http.client
import sys
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


def make_handler(upstream: int, flaky_failures: int):
    seen: Counter[str] = Counter()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _forward(self):
            path = self.path.split("?", 1)[0]
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
    up, listen = int(sys.argv[1]), int(sys.argv[2])
    flaky = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    ThreadingHTTPServer(("127.0.0.1", listen), make_handler(up, flaky)).serve_forever()
