"""Graceful degradation (服务降级): bounded concurrency per priority class.

Every RPC belongs to one class, in order of importance:

  PAYMENTS  the POS path: authorize, confirm, cancel (and the terminal's other
            calls: sign-on, balance, hold lookups, PIN changes)
  FUNDING   recharges from payment adapters
  ADMIN     back-office writes and lookups
  REPORTS   reports, histories and analytics reads

Each class has a cap on its RPCs in flight in this process (and reports
also a cap on how many start per second: a cheap report run back-to-back
would otherwise take a CPU share that no concurrency cap bounds). A call past
its class's cap is refused at once, before it touches the database, with
RESOURCE_EXHAUSTED (reason OVERLOADED, a RetryInfo hint). And while payments
are in flight and calls wait for a connection of the transaction pool, every
class below PAYMENTS is refused as well: the pool is what payments need, and
they get it first.
Refused calls cost a few microseconds and no database work.

StreamEvents (server-streaming, outside the unary decorator) is admitted by
`enter_stream`: its opening passes the REPORTS checks, and while open it
counts against max_event_streams rather than the reports cap, which a
stream that lives for hours would otherwise hold.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping

import grpc

from fuelcard_server.errors import ApiError
from fuelcard_server.identity import Role
from fuelcard_server.settings import Settings


class Priority(enum.IntEnum):
    PAYMENTS = 0
    FUNDING = 1
    ADMIN = 2
    REPORTS = 3

    @property
    def label(self) -> str:
        return self.name.lower()


# Names of report-type reads (besides any List*/Stream* method): they go to
# the lowest class whatever roles may call them.
_REPORT_SUFFIXES = ("Report", "History", "Stats")
_REPORT_PREFIXES = ("List", "Stream", "Export")


def classify(method: str, roles: frozenset[Role]) -> Priority:
    """The class of an RPC, from its name and the roles that may call it."""
    if Role.POS in roles:
        return Priority.PAYMENTS
    if method.startswith(_REPORT_PREFIXES) or method.endswith(_REPORT_SUFFIXES) \
            or Role.ANALYTICS in roles:
        return Priority.REPORTS
    if Role.ADAPTER in roles:
        return Priority.FUNDING
    return Priority.ADMIN


class Admission:
    """Counts RPCs in flight per class (one event loop: no locks)."""

    def __init__(self, settings: Settings,
                 pool_waiting: Callable[[], int] = lambda: 0) -> None:
        self.limits = {
            Priority.PAYMENTS: settings.max_inflight_payments,
            Priority.FUNDING: settings.max_inflight_funding,
            Priority.ADMIN: settings.max_inflight_admin,
            Priority.REPORTS: settings.max_inflight_reports,
        }
        self.inflight = dict.fromkeys(Priority, 0)
        self.max_streams = settings.max_event_streams
        self.streams = 0
        self.retry_delay_ms = settings.shed_retry_ms
        # token bucket for REPORTS: refills at max_reports_per_s, holds at
        # most max_inflight_reports tokens (the largest burst)
        self._report_rate = settings.max_reports_per_s
        self._report_burst = float(settings.max_inflight_reports)
        self._report_tokens = self._report_burst
        self._report_refilled = time.monotonic()
        self._pool_waiting = pool_waiting
        self._errors: Mapping[Priority, ApiError] = {
            p: ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED",
                        "the server is shedding load of this priority; retry later",
                        metadata={"priority_class": p.label},
                        retry_delay_ms=self.retry_delay_ms * (1 + int(p)))
            for p in Priority}
        # Built once: a refusal must stay cheap under a flood.
        self.statuses: Mapping[Priority, grpc.Status] = {
            p: e.to_status() for p, e in self._errors.items()}

    def enter(self, priority: Priority) -> bool:
        """Admit a call (True), or refuse it (False: answer statuses[priority])."""
        n = self.inflight[priority]
        if n >= self.limits[priority]:
            return False
        if priority is not Priority.PAYMENTS and self.inflight[Priority.PAYMENTS] \
                and self._pool_waiting() > 0:
            return False
        if priority is Priority.REPORTS and self._report_rate > 0 and not self._report_token():
            return False
        self.inflight[priority] = n + 1
        return True

    def _report_token(self) -> bool:
        now = time.monotonic()
        self._report_tokens = min(self._report_burst, self._report_tokens
                                  + (now - self._report_refilled) * self._report_rate)
        self._report_refilled = now
        if self._report_tokens < 1.0:
            return False
        self._report_tokens -= 1.0
        return True

    def leave(self, priority: Priority) -> None:
        self.inflight[priority] -= 1

    def enter_stream(self) -> bool:
        """Admit an event stream (True: call leave_stream when it ends), or
        refuse it (False: answer statuses[Priority.REPORTS])."""
        if self.streams >= self.max_streams or not self.enter(Priority.REPORTS):
            return False
        self.leave(Priority.REPORTS)  # the opening passed; the stream counts on its own
        self.streams += 1
        return True

    def leave_stream(self) -> None:
        self.streams -= 1
