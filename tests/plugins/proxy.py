"""A TCP forwarder on loopback that tests can break on purpose.

Put it between a client and the real server to play a bad POS link:

- `hang()`: requests still reach the server, but its answers are held back
  (buffered, not forwarded), so the client times out although the server did
  the work: the case where a retry must not do it twice. `resume()` releases
  what was held and forwards normally again.
- `down()`: every open connection is cut and new ones are accepted and closed
  at once: the link is gone. `up()` lets connections through again.
- `blackhole()`: the connections open now go silent, both ways, for good
  (bytes accepted and dropped, nothing closed: a host gone behind a moved
  address, a NAT that forgot the flow); new connections work normally.

It runs on its own thread and event loop; `close()` (or the context manager)
stops it and closes every socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(eq=False)  # links are kept in a set, by identity
class _Link:
    client_writer: asyncio.StreamWriter
    upstream_writer: asyncio.StreamWriter
    held: list[bytes] = field(default_factory=list)
    silent: bool = False  # blackholed: everything it carries is dropped
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class TcpProxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        up_host, _, up_port = upstream.rpartition(":")
        self._upstream = (up_host, int(up_port))
        self._host = host
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._hanging = False
        self._down = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._writers: set[asyncio.StreamWriter] = set()  # every socket, to close at stop
        self.port = 0
        self.accepted = 0  # connections accepted and forwarded
        self.refused = 0  # connections cut at once because the link was down
        self.bytes_up = 0  # client -> server
        self.bytes_held = 0  # server -> client, held back while hanging
        self.answer_held = threading.Event()  # set when the server answered into a hang

    # -- lifecycle (any thread) ------------------------------------------

    @property
    def target(self) -> str:
        return f"{self._host}:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        self._run(self._start())
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            if not self._loop.is_closed():
                self._loop.close()
            return
        self._run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- breaking the link (any thread) ----------------------------------

    def hang(self) -> None:
        """Hold back everything the server sends from now on."""
        self._run(self._set(hanging=True))

    def resume(self) -> None:
        """Forward what was held back, and everything after it."""
        self._run(self._resume())

    def down(self) -> None:
        """Cut every connection and refuse new ones."""
        self._run(self._down_now())

    def up(self) -> None:
        """Accept and forward connections again."""
        self._run(self._set(down=False, hanging=False))

    def blackhole(self) -> None:
        """Silence the connections open now; later ones are forwarded."""
        self._run(self._silence())

    # -- on the proxy's loop ---------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        # Connections accepted just before the close have their _accept task
        # scheduled but not started: let them start (and close themselves).
        for _ in range(3):
            await asyncio.sleep(0)
        await self._cut_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        # A cut interrupted by the cancellation above may have closed a writer
        # without waiting for it: close whatever is left, then give the loop
        # the turns it needs to release the sockets before it is stopped
        # (a transport closes its socket one callback after close()).
        for writer in self._writers:
            writer.close()
        for _ in range(5):
            await asyncio.sleep(0)

    async def _set(self, *, hanging: bool | None = None, down: bool | None = None) -> None:
        if hanging is not None:
            self._hanging = hanging
        if down is not None:
            self._down = down

    async def _resume(self) -> None:
        self._hanging = False
        for link in list(self._links):
            held, link.held = link.held, []
            for chunk in held:
                link.client_writer.write(chunk)
            with contextlib.suppress(ConnectionError):
                await link.client_writer.drain()

    async def _silence(self) -> None:
        for link in self._links:
            link.silent = True

    async def _down_now(self) -> None:
        self._down = True
        self._hanging = False
        await self._cut_all()

    async def _cut_all(self) -> None:
        links, self._links = list(self._links), set()
        for link in links:
            await self._cut(link)

    async def _cut(self, link: _Link) -> None:
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()
        for task in link.tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await task
        for writer in (link.client_writer, link.upstream_writer):
            await _close(writer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Tracked like the pumps, so that stopping cancels a connection still
        # being made (Python 3.11's Server.wait_closed does not wait for it).
        me = asyncio.current_task()
        assert me is not None
        self._tasks.add(me)
        me.add_done_callback(self._tasks.discard)
        self._writers.add(writer)
        if self._down or self._stopping:
            self.refused += 1
            await _close(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            await _close(writer)
            return
        except asyncio.CancelledError:
            await _close(writer)
            raise
        self._writers.add(up_writer)
        if self._down or self._stopping:
            # cut (or stopped) while the upstream connection was being made:
            # the cut did not see this link, so close it here, not leak it
            self.refused += 1
            await _close(up_writer)
            await _close(writer)
            return
        self.accepted += 1
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, up_writer, upstream=True)),
            asyncio.create_task(self._pump(link, up_reader, writer, upstream=False)),
        ]
        for task in link.tasks:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, link: _Link, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if link.silent:
                    continue
                if upstream:
                    self.bytes_up += len(data)
                elif self._hanging:
                    link.held.append(data)
                    self.bytes_held += len(data)
                    self.answer_held.set()
                    continue
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        # One side closed: close the link (unless a cut is already doing it).
        if link in self._links:
            self._links.discard(link)
            await self._cut(link)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()
