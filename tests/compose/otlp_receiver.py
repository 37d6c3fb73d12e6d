"""An OTLP/HTTP trace receiver for the compose test: POST /v1/traces is accepted (200, an
empty ExportTraceServiceResponse), GET /received answers how many exports arrived and which
of the given service names appear in them (protobuf keeps strings as they are)."""

import gzip
import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SERVICES = ("chatstream-api", "chatstream-generator")
bodies: list[bytes] = []


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path == "/v1/traces":
            bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        found = sorted(name for name in SERVICES if any(name.encode() in body for body in bodies))
        out = json.dumps({"exports": len(bodies), "services": found}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


# As the container's process 1 it gets no default SIGTERM handling: without this, docker stop
# (and compose down) waits out its whole timeout before killing it.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
ThreadingHTTPServer(("0.0.0.0", 4318), Handler).serve_forever()
