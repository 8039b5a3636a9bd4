"""A fake SMS gateway for tests: the codes it was given to send, by
challenge id (an SMS gateway cannot exist here)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field


@dataclass
class SentCode:
    destination: str
    code: str
    challenge_id: str
    kind: int


@dataclass
class FakeOtpSender:
    sent: list[SentCode] = field(default_factory=list)
    # Set to make the next sends fail, as a gateway outage would.
    failing: bool = False
    # Set to a cleared Event to hold every send until it is set (a slow
    # gateway); `waiting` counts the sends that got there.
    held: threading.Event | None = None
    waiting: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def send(self, destination: str, code: str, *, challenge_id: str, kind: int) -> None:
        if self.held is not None:
            with self._lock:
                self.waiting += 1
            await asyncio.to_thread(self.held.wait, 30)
        if self.failing:
            raise ConnectionError("gateway down")
        with self._lock:
            self.sent.append(SentCode(destination, code, challenge_id, kind))

    def code(self, challenge_id: str) -> str:
        with self._lock:
            codes = [s.code for s in self.sent if s.challenge_id == challenge_id]
        assert len(codes) == 1, f"{len(codes)} codes sent for {challenge_id}"
        return codes[0]
