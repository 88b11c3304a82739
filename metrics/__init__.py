"""Observability: lifecycle events -> exporter -> ClickHouse (or embedded chDB),
the stats queries over them, Prometheus metrics and OpenTelemetry tracing."""
