"""OpenTelemetry set-up, driven only by the standard ``OTEL_*`` environment variables.

Tracing is off unless ``OTEL_TRACES_EXPORTER`` names an exporter or an OTLP
endpoint is configured. ``otlp`` honours ``OTEL_EXPORTER_OTLP_PROTOCOL``
(``http/protobuf`` by default, or ``grpc``) and the usual endpoint, header and
timeout variables, which the exporters read themselves. Spans are exported by a
background batch processor, so a collector that is down never blocks a request.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

logger = logging.getLogger(__name__)


def _exporter_names() -> list[str]:
    configured = os.environ.get("OTEL_TRACES_EXPORTER")
    if configured is None:
        has_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        )
        return ["otlp"] if has_endpoint else []
    return [n.strip() for n in configured.split(",") if n.strip() and n.strip() != "none"]


def _make_exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        protocol = os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        )
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            return GrpcExporter()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"unsupported OTEL_TRACES_EXPORTER {name!r} (use otlp, console or none)")


def setup_tracing(default_service_name: str) -> TracerProvider | None:
    """Install a global tracer provider for this process; returns it, or None when
    tracing is disabled (``OTEL_SDK_DISABLED=true`` or no exporter configured).

    ``OTEL_SERVICE_NAME`` overrides ``default_service_name``; the sampler comes
    from ``OTEL_TRACES_SAMPLER`` through the SDK's own defaults.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    names = _exporter_names()
    if not names:
        return None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", default_service_name)})
    provider = TracerProvider(resource=resource)
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_make_exporter(name)))
    trace.set_tracer_provider(provider)
    logger.info("tracing enabled: exporters=%s", ",".join(names))
    return provider


def inject_context() -> dict[str, str]:
    """The current trace context as W3C headers, to travel inside a job."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(carrier: dict[str, str]):  # -> opentelemetry.context.Context
    """The trace context carried by a job, to parent the generator's span."""
    return propagate.extract(carrier)
