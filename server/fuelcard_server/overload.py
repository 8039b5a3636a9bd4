"""Graceful degradation (服务降级): bounded concurrency per priority class.

Every RPC belongs to one class, in order of importance:

  PAYMENTS  the POS path: authorize, confirm, cancel (and the terminal's other
            calls: sign-on, balance, hold lookups, PIN changes)
  FUNDING   recharges from payment adapters
  ADMIN     back-office writes and lookups
  REPORTS   reports, histories and analytics reads

Each class has a cap on its RPCs in flight in this process. A call past its
class's cap is refused at once, before it touches the database, with
RESOURCE_EXHAUSTED (reason OVERLOADED, a RetryInfo hint). And while anything
waits for a connection of the transaction pool, every class below PAYMENTS
is refused as well: the pool is what payments need, and they get it first.
Refused calls cost a few microseconds and no database work.
"""

from __future__ import annotations

import enum
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
        self.retry_delay_ms = settings.shed_retry_ms
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
        if n >= self.limits[priority] or (priority is not Priority.PAYMENTS
                                          and self._pool_waiting() > 0):
            return False
        self.inflight[priority] = n + 1
        return True

    def leave(self, priority: Priority) -> None:
        self.inflight[priority] -= 1
