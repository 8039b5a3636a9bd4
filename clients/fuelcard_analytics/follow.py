"""Following the server's event stream into the warehouse.

Each message of StreamEvents is one batch: applied with its cursor in one
store transaction (Warehouse.apply). On a broken stream the follower asks
again from the stored cursor, backing off up to MAX_BACKOFF_S; it never
keeps a position anywhere but in the store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from fuelcard.v1 import events_pb2, events_pb2_grpc

from fuelcard_analytics.warehouse import Warehouse

MAX_BACKOFF_S = 5.0
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                       grpc.StatusCode.CANCELLED})


@dataclass(frozen=True)
class Target:
    address: str
    # mutual TLS: the CA and this sidecar's certificate (role analytics);
    # None: plaintext (development, loopback)
    certs_dir: Path | None = None
    name: str = "analytics"

    def channel(self) -> grpc.Channel:
        if self.certs_dir is None:
            return grpc.insecure_channel(self.address)
        d = self.certs_dir
        creds = grpc.ssl_channel_credentials(
            root_certificates=(d / "ca.pem").read_bytes(),
            private_key=(d / f"{self.name}.key").read_bytes(),
            certificate_chain=(d / f"{self.name}.pem").read_bytes())
        return grpc.secure_channel(self.address, creds)


def follow(target: Target, warehouse: Warehouse, *, keep_following: bool, max_batch: int = 500,
           log: Callable[[str], None] = print, max_retries: int | None = None) -> int:
    """Apply the stream until caught up (or forever with keep_following);
    the final cursor."""
    backoff_s = 0.1
    failures = 0
    with target.channel() as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        while True:
            cursor = warehouse.cursor()
            try:
                for message in stub.StreamEvents(events_pb2.StreamEventsRequest(
                        after_position=cursor, follow=keep_following, max_batch=max_batch)):
                    cursor = warehouse.apply(message.events)
                    log(f"applied {len(message.events)} events through position {cursor}"
                        f" (head {message.head_position})")
                    backoff_s, failures = 0.1, 0
                if not keep_following:
                    return cursor
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in RETRYABLE:
                    raise
                failures += 1
                if max_retries is not None and failures > max_retries:
                    raise
                log(f"stream broke ({code.name}); resuming after {cursor} in {backoff_s:.1f} s")
                time.sleep(backoff_s)
                backoff_s = min(MAX_BACKOFF_S, backoff_s * 2)
