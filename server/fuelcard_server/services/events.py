"""EventService: the committed-transaction stream for analytics callers.

A server-streaming RPC, so it cannot use the unary `rpc` decorator: it makes
the same checks (admission, caller identity, role) and writes the same audit
record (one per stream, when it opens) itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from fuelcard.v1 import events_pb2, events_pb2_grpc

from fuelcard_server import errors
from fuelcard_server.events import Sequencer
from fuelcard_server.identity import Role
from fuelcard_server.identity import of as identity_of
from fuelcard_server.overload import Priority
from fuelcard_server.services.handling import Deps, Servicer
from fuelcard_server.validation import Violations

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]

ALLOWED = frozenset({Role.ANALYTICS, Role.ADMIN})
BATCH_DEFAULT = 500
BATCH_MAX = 5000
_SHED_ATTRIBUTES = {"rpc.method": "/fuelcard.v1.EventService/StreamEvents",
                    "priority_class": Priority.REPORTS.label}


class EventService(Servicer, events_pb2_grpc.EventServiceServicer):
    def __init__(self, deps: Deps, sequencer: Sequencer) -> None:
        super().__init__(deps)
        self.seq = sequencer

    async def _admit(self, request: events_pb2.StreamEventsRequest, context: Ctx) -> None:
        caller = None
        error: errors.ApiError | None = None
        try:
            caller = identity_of(context, tls=self.d.tls)
            if caller is None:
                raise errors.unauthenticated("NO_CLIENT_IDENTITY",
                                             "the client certificate names no fuelcard role")
            if not caller.may(ALLOWED):
                raise errors.permission_denied("ROLE_NOT_ALLOWED")
            v = Violations()
            if request.after_position < 0:
                v.add("after_position", "must be >= 0", "AFTER_POSITION_NEGATIVE")
            if not 0 <= request.max_batch <= BATCH_MAX:
                v.add("max_batch", f"must be 0..{BATCH_MAX}", "MAX_BATCH_OUT_OF_RANGE")
            v.raise_if_any()
            head, pruned = await self.seq.head()
            if request.after_position < pruned:
                raise errors.failed_precondition("CURSOR_EXPIRED")
            if request.after_position > head:
                # A cursor from another database (or a restored backup).
                raise errors.failed_precondition("CURSOR_AHEAD_OF_STREAM")
        except errors.ApiError as exc:
            error = exc
        error = await self.d.audit.rpc_done(type(self), "StreamEvents", ALLOWED, caller, request,
                                            None, error)
        if error is not None:
            raise error

    async def StreamEvents(self, request: events_pb2.StreamEventsRequest, context: Ctx
                           ) -> AsyncIterator[events_pb2.StreamEventsResponse]:
        admission = self.d.admission
        admitted = False
        try:
            if admission is not None:
                # Shed like a report call, before any work (no audit record,
                # no database); while open, counted against max_event_streams.
                if not admission.enter_stream():
                    self.d.telemetry.shed.add(1, _SHED_ATTRIBUTES)
                    shed: Callable[[grpc.Status], Awaitable[None]] = context.abort_with_status  # type: ignore[attr-defined]
                    await shed(admission.statuses[Priority.REPORTS])
                admitted = True
            await self._admit(request, context)
            limit = request.max_batch or BATCH_DEFAULT
            cursor = request.after_position
            # A round that started after the call found nothing to position:
            # everything committed before the call is readable now.
            settled = False
            while True:
                # Positioned events only, through the read pool: the stream
                # never runs the sequencer (the background loop does), so an
                # open stream takes nothing from the transaction pool.
                batch = await self.seq.read(cursor, limit)
                if batch and batch[0].position != cursor + 1:
                    # Positions are given without gaps: the events after the
                    # cursor were pruned while this stream was behind (after
                    # the check at its start). End it as that check would,
                    # rather than skip them.
                    raise errors.failed_precondition("CURSOR_EXPIRED")
                if batch:
                    head, _ = await self.seq.head()
                    cursor = batch[-1].position
                    yield events_pb2.StreamEventsResponse(events=batch,
                                                          head_position=max(head, cursor))
                    continue
                if settled:
                    return  # caught up with everything committed
                if request.follow:
                    await self.seq.wait()  # the loop's next round, or POLL_S
                    continue
                positioned = await self.seq.round()
                settled = positioned == 0
                if positioned < 0:  # another process is sequencing (or no round came)
                    await self.seq.wait()
        except errors.ApiError as exc:
            abort: Callable[[grpc.Status], Awaitable[None]] = context.abort_with_status  # type: ignore[attr-defined]
            await abort(exc.to_status())
        except (grpc.aio.AbortError, grpc.aio.UsageError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug; the client gets INTERNAL, we get the type
            log.exception("unhandled %s in StreamEvents", type(exc).__name__)
            abort = context.abort_with_status  # type: ignore[attr-defined]
            await abort(errors.internal().to_status())
        finally:
            # ended, failed, cancelled by the client or by the server's stop
            if admitted:
                assert admission is not None
                admission.leave_stream()
