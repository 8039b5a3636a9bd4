"""One generator process: grpc.aio on uvloop, several channels, one of the
two load models.

* Closed loop: `concurrency` tasks, each running operations back to back.
* Open loop: arrivals on a fixed timetable (`rate` per second); each arrival
  is its own task, so a slow answer never delays the next arrival, and each
  latency is measured from the arrival's *scheduled* time (no coordinated
  omission). Arrivals beyond `max_inflight` outstanding are dropped and
  counted as CLIENT_BACKLOG errors, which bounds the generator's memory.

Money accounting: every mutating request is remembered before it is sent and
forgotten once its outcome is known. Requests whose outcome is unknown (a
transport error, a deadline, a task cut off at the end of the drain) are
resent after the run with the *same* request_id: the server's idempotency
answers with the original outcome, or performs the operation once. Holds left
open are then cancelled. So the generator knows exactly which money it saw
move, and the ledger check can compare it to the fen.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any, TypeVar

import grpc
from fuelcard.v1 import (
    common_pb2,
    funding_pb2,
    funding_pb2_grpc,
    points_pb2,
    points_pb2_grpc,
    refund_pb2,
    refund_pb2_grpc,
    transaction_pb2,
    transaction_pb2_grpc,
)
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuelcard_loadtest import terminals
from fuelcard_loadtest.scenarios import Layout, Mix
from fuelcard_loadtest.seed import account_uid, card_number
from fuelcard_loadtest.stats import Recorder

APPROVED = common_pb2.DECISION_APPROVED
PRODUCTS = (common_pb2.PRODUCT_GASOLINE_92, common_pb2.PRODUCT_GASOLINE_95,
            common_pb2.PRODUCT_DIESEL_0, common_pb2.PRODUCT_GASOLINE_98)
AMOUNT_MIN_FEN, AMOUNT_MAX_FEN = 5_000, 50_000      # a 50-500 yuan hold
UNIT_PRICE_FEN = 785                                 # 7.85 yuan per litre
# An overrun goes at most this far past its hold: within the server's default
# tolerance (overrun_tolerance_fen, 1 000 fen), whatever the hold.
OVERRUN_MAX_FEN = 500
RECHARGE_MIN_FEN, RECHARGE_MAX_FEN = 10_000, 200_000
REDEEM_MAX_POINTS = 500
EARNED_RING = 4096
RESOLVE_ATTEMPTS = 3
RESOLVE_BUDGET_S = 60.0
RESOLVE_CONCURRENCY = 32
# Codes after which the request certainly did nothing.
DEFINITIVE = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                        grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
                        grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.OUT_OF_RANGE})
CHANNEL_OPTIONS = [
    # Own TCP connection per channel: channels with equal arguments would
    # otherwise share one subchannel, and SO_REUSEPORT balances connections.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


@dataclass(frozen=True)
class WorkerConfig:
    index: int
    target: str
    channels: int
    workload: str          # "pump" (the scenario's mix) or "health" (no-op RPC)
    scenario: str
    tag: int
    cards: int
    concurrency: int       # closed loop: tasks in this process (0 in open loop)
    rate: float            # open loop: arrivals per second in this process (0 in closed)
    phase_s: float         # open loop: offset of this process's timetable
    warmup_s: float
    duration_s: float
    drain_s: float
    pump_min_ms: float
    pump_max_ms: float
    mix: Mix
    run_id: str
    rpc_timeout_s: float
    max_inflight: int
    max_ops: int           # operations this process may start, at most
    bucket_s: float
    seed: int
    progress_s: float = 1.0
    # production mode (terminals.py): the directory of this run's terminal
    # certificates, the one with the CA and the admin certificate, and how
    # many terminals this process drives; None/0: plaintext, unsigned
    terminal_certs: str | None = None
    tls_dir: str | None = None
    terminals: int = 0


TERMINAL_RPCS = frozenset({"authorize", "confirm", "cancel", "reverse"})


@dataclass
class Stubs:
    pos: transaction_pb2_grpc.TransactionServiceAsyncStub
    funding: funding_pb2_grpc.FundingServiceAsyncStub
    points: points_pb2_grpc.PointsServiceAsyncStub
    health: Any
    refunds: refund_pb2_grpc.RefundServiceAsyncStub


@dataclass
class Lane:
    """Where an operation's requests go. Production: one signed-on terminal
    (its own certificate, channel and counter; one request in flight) and
    the admin channel for back-office calls. Plaintext: a channel for both."""

    stubs: Stubs
    admin: Stubs
    signer: terminals.Signer | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def stub_of(self, rpc: str) -> Stubs:
        return self.stubs if rpc in TERMINAL_RPCS else self.admin


@dataclass
class Tally:
    ok: int = 0
    declined: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "declined": self.declined, "errors": dict(self.errors)}


class Generator:
    def __init__(self, cfg: WorkerConfig, queue: Queue[Any], go: Event,
                 start_at: Synchronized[float]) -> None:
        self.cfg = cfg
        self.queue = queue
        self.go = go
        self.start_at = start_at
        self.rng = random.Random(cfg.seed)
        self.layout = Layout(cfg.scenario, cfg.cards) if cfg.workload == "pump" else None
        self.rec = Recorder(cfg.bucket_s)
        self.window = Tally()
        self.warmup = Tally()
        self.ops: Counter[str] = Counter()
        self.cycles = 0
        self.seq = itertools.count()
        self.started_ops = 0
        self.station = f"LT-{cfg.run_id}"
        self.terminal = f"LT-{cfg.run_id}-{cfg.index}"
        self.lanes: list[Lane] = []
        self.free: asyncio.Queue[Lane] | None = None
        # money the generator saw move
        self.confirmed_fen = 0
        self.confirmed_count = 0
        self.recharged_fen = 0
        self.recharge_count = 0
        self.redeemed_points = 0
        self.cancelled = 0
        self.refunded_fen = 0
        self.refund_count = 0
        self.reversed = 0     # holds a reversal released (outcome RELEASED)
        self.pending: dict[str, tuple[str, Message, Lane]] = {}
        self.open_holds: dict[str, tuple[str, Lane]] = {}
        self.earned: dict[str, int] = {}
        self.earned_ring: list[str] = []
        self.error_samples: list[str] = []
        self.dropped = 0
        self.max_lag_s = 0.0
        self.start = self.measure_from = self.stop_at = 0.0
        self.measured_end = 0.0

    # -- calls -----------------------------------------------------------------
    def _tally(self, started: float) -> Tally:
        return self.window if started >= self.measure_from else self.warmup

    def _error(self, rpc: str, code: str, details: str, started: float) -> None:
        self._tally(started).errors[code] += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(f"{rpc}: {code}: {details}")

    async def _call(self, lane: Lane, rpc: str, method: Callable[..., Awaitable[Resp]],
                    request: Message, started: float, rid: str | None) -> Resp | None:
        """Send one request (signed, if the lane is a terminal's); record its
        latency from `started` (the scheduled or intended start) and its
        outcome."""
        if rid is not None:
            self.pending[rid] = (rpc, request, lane)
        if lane.signer is not None and rpc in TERMINAL_RPCS:
            lane.signer.sign(request)  # type: ignore[arg-type]
        try:
            response = await method(request, timeout=self.cfg.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if rid is not None and code in DEFINITIVE:
                del self.pending[rid]
            self._error(rpc, code.name, exc.details() or "", started)
            return None
        end = time.monotonic()
        if rid is not None:
            del self.pending[rid]
        tally = self._tally(started)
        if started >= self.measure_from:
            self.rec.latency(rpc, end - started, started - self.measure_from)
        if _approved(response):
            tally.ok += 1
        else:
            tally.declined += 1
        return response

    def _rid(self) -> str:
        return f"{self.cfg.run_id}-{self.cfg.index}-{next(self.seq)}"

    # -- operations ------------------------------------------------------------
    async def _op(self, lane: Lane, started: float) -> None:
        cfg = self.cfg
        if cfg.workload == "health":
            self.ops["health"] += 1
            r = await self._call(lane, "health", lane.stubs.health.Check,
                                 health_pb2.HealthCheckRequest(), started, None)
            if r is not None and started >= self.measure_from:
                self.cycles += 1
                self.rec.cycle_done(started - self.measure_from)
            return
        roll = self.rng.random()
        if roll < cfg.mix.recharge:
            await self._recharge(lane, started)
        elif roll < cfg.mix.recharge + cfg.mix.redeem and self.earned_ring:
            await self._redeem(lane, started)
        else:
            await self._pump(lane, started)

    async def _pump(self, lane: Lane, started: float) -> None:
        cfg, rng = self.cfg, self.rng
        n = next(self.seq)
        rid = f"{cfg.run_id}-{cfg.index}-{n}"
        amount = rng.randint(AMOUNT_MIN_FEN, AMOUNT_MAX_FEN)
        request = transaction_pb2.AuthorizeRequest(
            request_id=rid + "a", card_number=card_number(cfg.tag, rng.randrange(cfg.cards)),
            amount_fen=amount, station_id=self.station,
            terminal_id=lane.signer.name if lane.signer else self.terminal,
            nozzle=n % 100, product=PRODUCTS[n % len(PRODUCTS)])
        self.ops["authorize"] += 1
        auth = await self._call(lane, "authorize", lane.stubs.pos.Authorize, request, started,
                                request.request_id)
        if auth is None or auth.decision != APPROVED:
            return
        hold_id = auth.hold.hold_id
        self.open_holds[hold_id] = (auth.hold.account_id, lane)
        authorized = time.monotonic()
        pump_s = rng.uniform(cfg.pump_min_ms, cfg.pump_max_ms) / 1000.0
        if pump_s > 0:
            await asyncio.sleep(pump_s)
        intended = authorized + pump_s
        ending = rng.random()
        if cfg.mix.cancel <= ending < cfg.mix.cancel + cfg.mix.reverse:
            # the POS that never learned the answer: reverse by request id
            self.ops["reverse"] += 1
            reverse = transaction_pb2.ReverseAuthorizationRequest(
                request_id=rid + "v", original_request_id=request.request_id)
            answer = await self._call(lane, "reverse", lane.stubs.pos.ReverseAuthorization, reverse,
                                      intended, reverse.request_id)
            if answer is not None:
                self._reversed(answer)
            return
        if ending < cfg.mix.cancel:
            self.ops["cancel"] += 1
            cancel = transaction_pb2.CancelRequest(request_id=rid + "x", hold_id=hold_id)
            if await self._call(lane, "cancel", lane.stubs.pos.Cancel, cancel, intended,
                                cancel.request_id):
                self.open_holds.pop(hold_id, None)
                self.cancelled += 1
            return
        if rng.random() < cfg.mix.overrun:
            # The pump ran on past its preset: above the hold, within the
            # server's overrun tolerance (at least OVERRUN_MAX_FEN), so it is
            # booked; what the balance cannot pay becomes a receivable.
            final = amount + rng.randint(1, OVERRUN_MAX_FEN)
            self.ops["overrun"] += 1
        else:
            final = rng.randint(max(1, amount * 3 // 10), amount - 1)
        confirm = transaction_pb2.ConfirmRequest(
            request_id=rid + "c", hold_id=hold_id, final_amount_fen=final,
            volume_ml=final * 1000 // UNIT_PRICE_FEN, unit_price_fen=UNIT_PRICE_FEN)
        self.ops["confirm"] += 1
        done = await self._call(lane, "confirm", lane.stubs.pos.Confirm, confirm, intended,
                                confirm.request_id)
        if done is None:
            return
        self.open_holds.pop(hold_id, None)
        if done.decision == APPROVED:
            self._confirmed(final, auth.hold.account_id, done.points_earned)
            if started >= self.measure_from:
                self.cycles += 1
                self.rec.cycle_done(started - self.measure_from)
            if rng.random() < cfg.mix.refund:
                await self._refund(lane, hold_id, final, rid, time.monotonic())

    def _reversed(self, answer: transaction_pb2.ReverseAuthorizationResponse) -> None:
        if answer.outcome == transaction_pb2.REVERSAL_OUTCOME_RELEASED:
            self.open_holds.pop(answer.hold.hold_id, None)
            self.reversed += 1

    async def _refund(self, lane: Lane, hold_id: str, final: int, rid: str,
                      started: float) -> None:
        """A partial refund of the sale just confirmed (below the step-up
        threshold: a sale is at most 500 yuan)."""
        request = refund_pb2.RefundSaleRequest(
            request_id=rid + "f", hold_id=hold_id, amount_fen=self.rng.randint(1, final),
            reason=self.station)
        self.ops["refund"] += 1
        if await self._call(lane, "refund", lane.admin.refunds.RefundSale, request, started,
                            request.request_id) is not None:
            self._refunded(request)

    def _refunded(self, request: refund_pb2.RefundSaleRequest) -> None:
        self.refunded_fen += request.amount_fen
        self.refund_count += 1

    def _confirmed(self, final: int, account: str, points: int) -> None:
        self.confirmed_fen += final
        self.confirmed_count += 1
        if points > 0:
            if account not in self.earned:
                if len(self.earned_ring) < EARNED_RING:
                    self.earned_ring.append(account)
                else:
                    self.earned_ring[self.rng.randrange(EARNED_RING)] = account
            self.earned[account] = self.earned.get(account, 0) + points

    async def _recharge(self, lane: Lane, started: float) -> None:
        cfg = self.cfg
        assert self.layout is not None
        rid = self._rid()
        request = funding_pb2.RechargeRequest(
            request_id=rid + "r",
            account_id=account_uid(cfg.tag, self.rng.randrange(self.layout.accounts)),
            channel=funding_pb2.Channel.ValueType(self.rng.randint(1, 5)), channel_txn_id=f"lt-{rid}",
            amount_fen=self.rng.randint(RECHARGE_MIN_FEN, RECHARGE_MAX_FEN))
        self.ops["recharge"] += 1
        r = await self._call(lane, "recharge", lane.admin.funding.Recharge, request, started,
                             request.request_id)
        if r is not None and r.decision == APPROVED:
            self.recharged_fen += request.amount_fen
            self.recharge_count += 1

    async def _redeem(self, lane: Lane, started: float) -> None:
        account = self.earned_ring[self.rng.randrange(len(self.earned_ring))]
        have = self.earned.get(account, 0)
        if have <= 0:
            await self._pump(lane, started)
            return
        points = self.rng.randint(1, min(have, REDEEM_MAX_POINTS))
        request = points_pb2.RedeemPointsRequest(
            request_id=self._rid() + "p", account_id=account, points=points,
            description=self.station)
        self.ops["redeem"] += 1
        r = await self._call(lane, "redeem", lane.admin.points.RedeemPoints, request, started,
                             request.request_id)
        if r is not None and r.decision == APPROVED:
            self.redeemed_points += points
            self.earned[account] = have - points

    # -- load models -----------------------------------------------------------
    async def _closed_task(self, k: int) -> None:
        # production: a terminal per task (terminals == concurrency)
        lane = self.lanes[k % len(self.lanes)]
        while self.started_ops < self.cfg.max_ops:
            now = time.monotonic()
            if now >= self.stop_at:
                return
            self.started_ops += 1
            await self._op(lane, now)

    async def _arrival(self, k: int, due: float) -> None:
        """An open-loop arrival: on the next free terminal (production; the
        wait for one counts in its latency, as at a busy station), or on the
        next channel."""
        if self.free is None:
            await self._op(self.lanes[k % len(self.lanes)], due)
            return
        lane = await self.free.get()
        try:
            await self._op(lane, due)
        finally:
            self.free.put_nowait(lane)

    async def _open_schedule(self, tasks: set[asyncio.Task[None]]) -> None:
        cfg = self.cfg
        interval = 1.0 / cfg.rate
        first = self.start + cfg.phase_s
        for k in range(cfg.max_ops):
            due = first + k * interval
            if due >= self.stop_at:
                return
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.max_lag_s = max(self.max_lag_s, -delay)
            if len(tasks) >= cfg.max_inflight:
                self.dropped += 1
                self._error("arrival", "CLIENT_BACKLOG", "too many outstanding arrivals", due)
                continue
            task = asyncio.create_task(self._arrival(k, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.progress_s)
            w = self.window
            self.queue.put(("progress", self.cfg.index, {
                "cycles": self.cycles, "ok": w.ok + self.warmup.ok,
                "declined": w.declined + self.warmup.declined,
                "errors": sum(w.errors.values()) + sum(self.warmup.errors.values()),
                "in_window": time.monotonic() >= self.measure_from}))

    # -- after the run: settle every unknown outcome ----------------------------
    async def _resolve(self) -> list[str]:
        """Resend every request whose outcome is unknown (same request_id),
        then cancel the holds left open. Bounded: RESOLVE_ATTEMPTS per
        request, RESOLVE_BUDGET_S in all."""
        def method(lane: Lane, rpc: str) -> Callable[..., Awaitable[Any]]:
            stubs = lane.stub_of(rpc)
            methods: dict[str, Callable[..., Awaitable[Any]]] = {
                "authorize": stubs.pos.Authorize, "confirm": stubs.pos.Confirm,
                "cancel": stubs.pos.Cancel, "recharge": stubs.funding.Recharge,
                "redeem": stubs.points.RedeemPoints, "reverse": stubs.pos.ReverseAuthorization,
                "refund": stubs.refunds.RefundSale}
            return methods[rpc]

        deadline = time.monotonic() + RESOLVE_BUDGET_S
        gate = asyncio.Semaphore(RESOLVE_CONCURRENCY)
        unresolved: list[str] = []
        timeout = max(self.cfg.rpc_timeout_s, 5.0)

        async def settle(what: str, rpc: str, request: Message, lane: Lane) -> Any:
            # one request at a time per terminal: its counters must arrive in order
            async with gate, lane.lock:
                for attempt in range(RESOLVE_ATTEMPTS):
                    if time.monotonic() > deadline:
                        unresolved.append(f"{what}: out of time")
                        return None
                    if lane.signer is not None and rpc in TERMINAL_RPCS:
                        lane.signer.sign(request)  # type: ignore[arg-type]
                    try:
                        return await method(lane, rpc)(request, timeout=timeout)
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() in DEFINITIVE:
                            if rpc == "cancel" and what.startswith("open hold"):
                                unresolved.append(f"{what}: {exc.code().name} {exc.details()}")
                            return None
                        if attempt + 1 == RESOLVE_ATTEMPTS:
                            unresolved.append(f"{what}: {exc.code().name} {exc.details()}")
                            return None
                    await asyncio.sleep(0.2 * (attempt + 1))
                return None

        # authorizations first (they may open holds), then what settles holds
        # (a reversal after its authorize: it releases what that one held; a
        # refund after the confirms: it refunds a sale they booked)
        for phase in (("authorize",), ("confirm", "cancel", "recharge", "redeem", "reverse"),
                      ("refund",)):
            batch = [(rid, rpc, req, lane) for rid, (rpc, req, lane) in self.pending.items()
                     if rpc in phase]
            answers = await asyncio.gather(*(settle(f"{rpc} {rid}", rpc, req, lane)
                                             for rid, rpc, req, lane in batch))
            for (_rid, rpc, req, lane), answer in zip(batch, answers, strict=True):
                if answer is not None:
                    self._apply_late(rpc, req, answer, lane)
        self.pending.clear()
        cancels = [(transaction_pb2.CancelRequest(request_id=self._rid() + "z", hold_id=h), lane)
                   for h, (_account, lane) in self.open_holds.items()]
        answers = await asyncio.gather(*(settle(f"open hold {c.hold_id}", "cancel", c, lane)
                                         for c, lane in cancels))
        self.cancelled += sum(1 for a in answers if a is not None)
        self.open_holds.clear()
        return unresolved

    def _apply_late(self, rpc: str, request: Message, r: Any, lane: Lane) -> None:
        """The outcome of a request that was in doubt."""
        if rpc == "authorize":
            if r.decision == APPROVED:
                self.open_holds[r.hold.hold_id] = (r.hold.account_id, lane)
        elif rpc == "confirm":
            assert isinstance(request, transaction_pb2.ConfirmRequest)
            self.open_holds.pop(request.hold_id, None)
            if r.decision == APPROVED and request.final_amount_fen > 0:
                self._confirmed(request.final_amount_fen, r.hold.account_id, r.points_earned)
        elif rpc == "cancel":
            assert isinstance(request, transaction_pb2.CancelRequest)
            self.open_holds.pop(request.hold_id, None)
            self.cancelled += 1
        elif rpc == "recharge":
            assert isinstance(request, funding_pb2.RechargeRequest)
            if r.decision == APPROVED:
                self.recharged_fen += request.amount_fen
                self.recharge_count += 1
        elif rpc == "redeem":
            assert isinstance(request, points_pb2.RedeemPointsRequest)
            if r.decision == APPROVED:
                self.redeemed_points += request.points
        elif rpc == "reverse":
            self._reversed(r)
        elif rpc == "refund":
            assert isinstance(request, refund_pb2.RefundSaleRequest)
            self._refunded(request)

    # -- the whole life of the process -----------------------------------------
    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        channels: list[grpc.aio.Channel] = []
        try:
            await self._connect(channels)
            self.queue.put(("ready", cfg.index, None))
            loop = asyncio.get_running_loop()
            if not await loop.run_in_executor(None, self.go.wait, 120.0):
                raise RuntimeError("no start signal from the parent within 120 s")
            self.start = time.monotonic() + (self.start_at.value - time.time())
            self.measure_from = self.start + cfg.warmup_s
            self.stop_at = self.measure_from + cfg.duration_s
            await asyncio.sleep(max(self.start - time.monotonic(), 0))
            cpu0 = time.process_time()
            progress = asyncio.create_task(self._progress())
            tasks: set[asyncio.Task[None]] = set()
            if cfg.rate > 0:
                await self._open_schedule(tasks)
            else:
                tasks.update(asyncio.create_task(self._closed_task(k))
                             for k in range(cfg.concurrency))
            if tasks:
                _done, late = await asyncio.wait(
                    tasks, timeout=max(self.stop_at - time.monotonic(), 0) + cfg.drain_s)
                for task in late:
                    task.cancel()
                results = await asyncio.gather(*_done, *late, return_exceptions=True)
                for res in results:
                    if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
                        raise res
            self.measured_end = time.monotonic()
            cpu_s = time.process_time() - cpu0
            progress.cancel()
            unresolved = await self._resolve()
            return self._result(cpu_s, unresolved)
        finally:
            for ch in channels:
                await ch.close(None)

    async def _connect(self, channels: list[grpc.aio.Channel]) -> None:
        """Open the channels (appended to `channels`, for closing) and, in
        production mode, sign every terminal on."""
        cfg = self.cfg
        if cfg.terminal_certs is None or cfg.tls_dir is None:
            for _ in range(cfg.channels):
                ch = grpc.aio.insecure_channel(cfg.target, options=CHANNEL_OPTIONS)
                channels.append(ch)
                await asyncio.wait_for(ch.channel_ready(), timeout=30)
                stubs = _stubs(ch)
                self.lanes.append(Lane(stubs, stubs))
            return
        run_dir, tls_dir = Path(cfg.terminal_certs), Path(cfg.tls_dir)
        ca = tls_dir / "ca.pem"
        admin = grpc.aio.secure_channel(
            cfg.target, terminals.credentials(tls_dir, terminals.ADMIN_STEM, ca),
            options=CHANNEL_OPTIONS)
        channels.append(admin)
        admin_stubs = _stubs(admin)

        async def lane(k: int) -> Lane:
            name = terminals.terminal_name(cfg.run_id, cfg.index, k)
            ch = grpc.aio.secure_channel(
                cfg.target, terminals.credentials(run_dir, terminals.stem(name), ca),
                options=CHANNEL_OPTIONS)
            channels.append(ch)
            await asyncio.wait_for(ch.channel_ready(), timeout=30)
            return Lane(_stubs(ch), admin_stubs, await terminals.sign_on(ch, name))

        self.lanes = list(await asyncio.gather(*(lane(k) for k in range(cfg.terminals))))
        if cfg.rate > 0:
            self.free = asyncio.Queue()
            for one in self.lanes:
                self.free.put_nowait(one)

    def _result(self, cpu_s: float, unresolved: list[str]) -> dict[str, Any]:
        return {
            "index": self.cfg.index,
            **self.window.as_dict(),
            "warmup": self.warmup.as_dict(),
            "cycles": self.cycles,
            "ops": dict(self.ops),
            "measured_s": max(self.measured_end - self.measure_from, 1e-9),
            "cpu_s": cpu_s,
            "dropped": self.dropped,
            "max_schedule_lag_ms": self.max_lag_s * 1000.0,
            "confirmed_fen": self.confirmed_fen,
            "confirmed_count": self.confirmed_count,
            "recharged_fen": self.recharged_fen,
            "recharge_count": self.recharge_count,
            "redeemed_points": self.redeemed_points,
            "cancelled": self.cancelled,
            "refunded_fen": self.refunded_fen,
            "refund_count": self.refund_count,
            "reversed": self.reversed,
            "mac_requests": sum(lane.signer.signed for lane in self.lanes if lane.signer),
            "terminals": sum(1 for lane in self.lanes if lane.signer),
            "unresolved": unresolved,
            "error_samples": self.error_samples,
            "stats": self.rec.encode(),
        }


def _stubs(ch: grpc.aio.Channel) -> Stubs:
    return Stubs(transaction_pb2_grpc.TransactionServiceStub(ch),
                 funding_pb2_grpc.FundingServiceStub(ch), points_pb2_grpc.PointsServiceStub(ch),
                 health_pb2_grpc.HealthStub(ch), refund_pb2_grpc.RefundServiceStub(ch))


def _approved(response: Message) -> bool:
    if "decision" in response.DESCRIPTOR.fields_by_name:
        return bool(getattr(response, "decision") == APPROVED)  # noqa: B009
    return True


def main(cfg: WorkerConfig, queue: Queue[Any], go: Event, start_at: Synchronized[float]) -> None:
    """Process entry point (multiprocessing, spawn)."""
    import uvloop

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(Generator(cfg, queue, go, start_at).run())
        queue.put(("done", cfg.index, result))
    except BaseException:
        queue.put(("failed", cfg.index, traceback.format_exc()))
