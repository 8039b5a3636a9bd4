"""Structured JSON log lines, desensitised before they are written.

A line written while an RPC is served carries its method, its request_id
and the trace id of its span (the caller's, when it sent a traceparent):
RpcContext fills them in from context variables the rpc decorator sets.
Every line carries the process id and the worker number (`serve --workers
N`: 0..N-1), so the lines of several workers in one stream can be told apart.

What `configure()` sets up for a serving process:

- One JSON line per record on stderr, and Python-side gRPC loggers
  (`grpc._server`, `grpc.aio`, `grpc._cython.cygrpc`) go through it like ours.
- gRPC's C core writes its own lines (absl logging) straight to file
  descriptor 2, not through Python logging. `route_native_stderr()` puts a
  pipe behind descriptor 2 and turns every line arriving there that is not
  already JSON into a record of logger `grpc.core` (level from absl's
  I/W/E/F prefix; other text, such as an interpreter's traceback, as logger
  `stderr`), desensitised like the rest. The C core logs errors only unless
  told otherwise: set GRPC_VERBOSITY=INFO (or DEBUG) and, for the internals,
  GRPC_TRACE=http,api,... in the server's environment before it starts
  (gRPC reads them when it is imported; lines it writes before configure()
  runs still appear as plain text).
- Warnings and errors repeated during an outage are rate-limited
  (RepeatLimiter): of identical lines (same logger and message template,
  digits aside) at most `limit` per `window_s` are written; when the window
  ends one line says how many more were suppressed.
- An access line per RPC, sampled (logger fuelcard_server.access, see
  telemetry.Telemetry.access): method, status code, duration in
  microseconds and the caller's role; never a request field.
"""

from __future__ import annotations

import atexit
import contextvars
import json
import logging
import multiprocessing
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

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


# Which worker of `serve --workers N` this process is; configure() sets it.
_WORKER = 0


def worker_number() -> int:
    """This process's worker number: the N of the `fuelcard-worker-N`
    process name `serve --workers` gives its workers, else 0 (one worker)."""
    name = multiprocessing.current_process().name
    prefix = "fuelcard-worker-"
    if name.startswith(prefix) and name[len(prefix):].isdigit():
        return int(name[len(prefix):])
    return 0


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
            "pid": record.process,
            "worker": _WORKER,
        }
        for key in ("request_id", "method"):
            value = getattr(record, key, None)
            if value is not None:
                line[key] = scrub(str(value))
        # Structured fields a record carries (the access line, a summary of
        # suppressed lines): numbers as they are, text scrubbed.
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                if key not in line:
                    line[str(key)] = (value if isinstance(value, int | float) and
                                      not isinstance(value, bool) else scrub(str(value)))
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


# Repeated lines: at most this many identical ones per window.
REPEAT_LIMIT = 5
REPEAT_WINDOW_S = 10.0
_DIGITS = re.compile(r"\d+")


@dataclass
class _Window:
    start: float
    written: int = 0
    suppressed: int = 0
    levelno: int = logging.WARNING
    template: str = ""


class RepeatLimiter:
    """Counts warning and error lines by (logger, message template with its
    digits blanked, so an f-string's changing numbers still match). Of each,
    the first `limit` in a window of `window_s` pass; later ones are counted
    instead, and when the window ends a summary record says how many were
    suppressed. A database outage makes every call fail alike: without this
    one outage wrote 92 lines in 15 s, drowning the first, useful ones."""

    def __init__(self, limit: int = REPEAT_LIMIT, window_s: float = REPEAT_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._windows: dict[tuple[str, str], _Window] = {}
        # windows that suppressed something: summaries owed when they end
        self._owed: dict[tuple[str, str], _Window] = {}
        self._lock = threading.Lock()

    def admit(self, record: logging.LogRecord) -> tuple[bool, list[logging.LogRecord]]:
        """Whether to write the record, and the summaries of windows that
        have ended (to write before it)."""
        now = self.clock()
        with self._lock:
            due = self._take_due(now)
            if record.levelno < logging.WARNING:
                return True, due
            template = str(record.msg)
            key = (record.name, _DIGITS.sub("#", template))
            w = self._windows.get(key)
            if w is None or now - w.start >= self.window_s:
                if w is not None and w.suppressed:  # ended, its summary not yet taken
                    self._owed.pop(key, None)
                    due.append(self._summary(key, w))
                if len(self._windows) > 10_000:  # bounded: forget windows that ended
                    self._windows = {k: v for k, v in self._windows.items()
                                     if now - v.start < self.window_s}
                w = self._windows[key] = _Window(now, template=template)
            if w.written < self.limit:
                w.written += 1
                return True, due
            w.suppressed += 1
            w.levelno = max(w.levelno, record.levelno)
            self._owed[key] = w
            return False, due

    def due(self) -> list[logging.LogRecord]:
        """Summaries of windows that have ended (for a timer to write when
        no further line comes to carry them)."""
        with self._lock:
            return self._take_due(self.clock())

    def next_due(self) -> float | None:
        """When the earliest owed summary is due (clock time), if any."""
        with self._lock:
            return min((w.start + self.window_s for w in self._owed.values()), default=None)

    def _take_due(self, now: float) -> list[logging.LogRecord]:
        if not self._owed:
            return []
        ended = [k for k, w in self._owed.items() if now - w.start >= self.window_s]
        out = []
        for key in ended:
            w = self._owed.pop(key)
            out.append(self._summary(key, w))
            w.suppressed = 0
        return out

    def _summary(self, key: tuple[str, str], w: _Window) -> logging.LogRecord:
        record = logging.LogRecord(
            key[0], w.levelno, __file__, 0,
            f"suppressed {w.suppressed} similar lines in {self.window_s:g} s: {w.template}",
            None, None)
        record.fields = {"suppressed": w.suppressed, "window_s": self.window_s}
        return record


class JsonHandler(logging.StreamHandler[IO[str]]):
    """JSON lines on a stream, repeated warnings and errors rate-limited.

    Summaries of suppressed lines are written when the next line comes or,
    with `timer`, by a timer at the end of the window, whichever is first."""

    def __init__(self, stream: IO[str] | None = None, limiter: RepeatLimiter | None = None,
                 timer: bool = True) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self.setFormatter(JsonFormatter())
        self.addFilter(RpcContext())
        self.limiter = limiter or RepeatLimiter()
        self._timer_on = timer
        self._timer: threading.Timer | None = None

    def handle(self, record: logging.LogRecord) -> bool:
        if not self.filter(record):
            return False
        admitted, due = self.limiter.admit(record)
        with self.lock:  # type: ignore[union-attr]
            for summary in due:
                self.emit(summary)
            if admitted:
                self.emit(record)
        if not admitted:
            self._arm()
        return admitted

    def write_due(self) -> int:
        """Write the summaries of windows that have ended; how many."""
        due = self.limiter.due()
        with self.lock:  # type: ignore[union-attr]
            for summary in due:
                self.emit(summary)
        return len(due)

    def _arm(self) -> None:
        if not self._timer_on or (self._timer is not None and self._timer.is_alive()):
            return
        at = self.limiter.next_due()
        if at is None:
            return
        self._timer = threading.Timer(max(at - self.limiter.clock(), 0.0) + 0.05, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.write_due()
        self._arm()  # another window may still owe one

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.write_due()
        super().close()


# absl's prefix: severity letter, MMDD, time, thread id, file:line]
_ABSL = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ (.*)$")
_ABSL_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
NATIVE_LOGGER = "grpc.core"


class NativeStderr:
    """File descriptor 2 behind a pipe; lines written to it by native code
    (gRPC's C core) become JSON records. See route_native_stderr()."""

    def __init__(self) -> None:
        self.saved_fd = os.dup(2)
        # line-buffered: our JSON lines leave at once, also on a crash
        self.stream: IO[str] = os.fdopen(os.dup(self.saved_fd), "w", buffering=1,
                                          encoding="utf-8", errors="replace")
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._reader = os.fdopen(read_fd, "rb")
        self._thread = threading.Thread(target=self._pump, name="fuelcard-native-stderr",
                                        daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        native = logging.getLogger(NATIVE_LOGGER)
        other = logging.getLogger("stderr")
        for raw in self._reader:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not text:
                continue
            if text.startswith("{") and text.endswith("}"):
                self.stream.write(text + "\n")  # a JSON line already (a handler on fd 2)
                continue
            m = _ABSL.match(text)
            if m:
                native.log(_ABSL_LEVELS[m.group(1)], m.group(2))
            else:
                other.warning(text)

    def restore(self) -> None:
        """Descriptor 2 back as it was; what is still in the pipe is written."""
        sys.stderr.flush()
        os.dup2(self.saved_fd, 2)  # the pipe's last writer gone: the pump sees its end
        self._thread.join(timeout=2)


_NATIVE: NativeStderr | None = None


def route_native_stderr() -> NativeStderr:
    """Route what native code writes to descriptor 2 into the JSON stream
    (once per process; a serving worker does it, telemetry.install_global).
    The root logger's JSON handlers then write to the real stderr directly,
    not through the pipe. Not for a process that shares descriptor 2 with
    others it does not own (a test runner capturing it)."""
    global _NATIVE
    if _NATIVE is None:
        _NATIVE = NativeStderr()
        atexit.register(_NATIVE.restore)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, JsonHandler):
                handler.setStream(_NATIVE.stream)
    return _NATIVE


def configure(level: str = "INFO", *, native: bool = False, worker: int | None = None,
              limiter: RepeatLimiter | None = None) -> JsonHandler:
    """Log JSON lines to stderr for this process (a serving worker, or a
    command). With `native`, gRPC's C-core lines join them (see the module
    docstring and route_native_stderr)."""
    global _WORKER
    _WORKER = worker_number() if worker is None else worker
    handler = JsonHandler(_NATIVE.stream if _NATIVE is not None else sys.stderr, limiter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # psycopg's pool logs connection strings at debug; keep it quiet.
    logging.getLogger("psycopg").setLevel(logging.WARNING)
    # C-core lines come at the level GRPC_VERBOSITY lets through; do not
    # filter them again here.
    logging.getLogger(NATIVE_LOGGER).setLevel(logging.DEBUG)
    if native:
        route_native_stderr()
    return handler
