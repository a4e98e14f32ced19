"""Observability: OpenTelemetry traces of each request's life in the engine, and
Prometheus metrics.

The engine only keeps a short timeline of plain records per request (`timeline`); spans
are built from it after the request finishes, off the engine thread. Nothing here is
imported by the engine except `timeline`, so the engine never loads OpenTelemetry.
"""
