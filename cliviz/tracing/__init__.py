"""Recording gates through nnsight (`trace`) and the trace file (`Trace`, `TraceSet`)."""

from cliviz.tracing.record import trace, trace_batch
from cliviz.tracing.schema import SCHEMA_VERSION, Trace, TraceMeta

__all__ = ["SCHEMA_VERSION", "Trace", "TraceMeta", "trace", "trace_batch"]
