"""Structured JSON log lines, desensitised before they are written.

A line written while an RPC is served carries its method, its request_id
and the trace id of its span (the caller's, when it sent a traceparent):
RpcContext fills them in from context variables the rpc decorator sets.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time

from opentelemetry import trace

from fuelcard_server.privacy import scrub

_HEX_ID = re.compile(r"[0-9a-f]{16}|[0-9a-f]{32}")
_CARD_SIZED_DIGITS = re.compile(r"\d{16}")

# Set by the rpc decorator for the RPC being served (one task per RPC).
METHOD: contextvars.ContextVar[str | None] = contextvars.ContextVar("fuelcard_method",
                                                                    default=None)
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("fuelcard_request_id",
                                                                        default=None)


class RpcContext(logging.Filter):
    """Adds method, request_id and trace_id of the RPC being served."""

    def filter(self, record: logging.LogRecord) -> bool:
        method = METHOD.get()
        if method is not None and not hasattr(record, "method"):
            record.method = method
        request_id = REQUEST_ID.get()
        if request_id and not hasattr(record, "request_id"):
            record.request_id = request_id
        ctx = trace.get_current_span().get_span_context()
        if ctx.trace_id and not hasattr(record, "trace_id"):
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for key in ("request_id", "method"):
            value = getattr(record, key, None)
            if value is not None:
                line[key] = scrub(str(value))
        # Trace and span ids are W3C hex identifiers (RpcContext formats them
        # from integers) and exist so a log line can be joined to its trace;
        # a run of eleven decimal digits occurs in about one trace id in
        # twenty, and masking it would break that join.
        for key in ("trace_id", "span_id"):
            value = getattr(record, key, None)
            if value is not None:
                line[key] = _hex_id(value)
        if record.exc_info and record.exc_info[0] is not None:
            line["exc_type"] = record.exc_info[0].__name__
            line["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False)


def _hex_id(value: object) -> str:
    text = str(value)
    # Anything that is not a plain hex id (a record given trace_id by hand)
    # is free text again and scrubbed like the rest; so is an id with room
    # for a card number in it (16 decimal digits in a row: a caller's
    # traceparent is the caller's choice), about one random trace id in
    # three hundred.
    if not _HEX_ID.fullmatch(text) or _CARD_SIZED_DIGITS.search(text):
        return scrub(text)
    return text


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RpcContext())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # psycopg's pool logs connection strings at debug; keep it quiet.
    logging.getLogger("psycopg").setLevel(logging.WARNING)
