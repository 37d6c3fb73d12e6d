"""A minimal OTLP/HTTP trace receiver for tests: collects every span it is sent."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass(frozen=True)
class ReceivedSpan:
    """The parts of a span the tests look at."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict
    events: tuple[str, ...]


def _value(any_value) -> object:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OtlpReceiver:
    """Listens on a loopback port; ``endpoint`` is what OTEL_EXPORTER_OTLP_ENDPOINT takes."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                request = ExportTraceServiceRequest.FromString(body)
                with lock:
                    for resource_spans in request.resource_spans:
                        service = next(
                            (_value(a.value) for a in resource_spans.resource.attributes if a.key == "service.name"), ""
                        )
                        for scope_spans in resource_spans.scope_spans:
                            for span in scope_spans.spans:
                                receiver.spans.append(
                                    ReceivedSpan(
                                        service=str(service),
                                        name=span.name,
                                        trace_id=span.trace_id.hex(),
                                        span_id=span.span_id.hex(),
                                        parent_span_id=span.parent_span_id.hex(),
                                        kind=span.kind,
                                        attributes={a.key: _value(a.value) for a in span.attributes},
                                        events=tuple(e.name for e in span.events),
                                    )
                                )
                payload = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def in_trace(self, trace_id: str) -> list[ReceivedSpan]:
        """Spans received so far for one trace."""
        return [s for s in list(self.spans) if s.trace_id == trace_id]

    def close(self) -> None:
        """Stop listening."""
        self._server.shutdown()
        self._server.server_close()
