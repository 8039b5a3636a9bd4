"""The JSON API (fuelcard-api) over real HTTP, in front of a real core with
mutual TLS: its OpenAPI document validates; a family's main holder and a
fleet manager go through their journeys; expired sessions, other fleets'
cards and floods are refused. Money is set up through a development-mode
core on the same database (recharges and sales are the channels' and the
pumps' work, not the API's)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web
from fuelcard.v1 import account_pb2
from fuelcard_api import principals
from fuelcard_api.app import Api, ApiSettings
from fuelcard_api.openapi import document
from fuelcard_api.throttle import Throttle
from fuelcard_server.audit import actor_of
from fuelcard_server.certs import DevPki
from fuelcard_server.clock import ManualClock
from fuelcard_server.identity import ON_BEHALF_OF, Caller, Role, acting_for
from fuelcard_server.stepup import FileOtpSender
from openapi_spec_validator import validate

from tests.plugins.server import RunningServer, ServerThread, make_settings
from tests.support import builders
from tests.support import control_builders as cb
from tests.support.ledger_asserts import Conn

PASSWORD = "correct horse battery"


def http(base: str, method: str, path: str, body: Any = None, token: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One real HTTP request: (status, the JSON body or None)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        request.add_header(k, v)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        exc.close()
        return exc.code, json.loads(raw) if raw else None


@dataclass
class Edge:
    """The core (mutual TLS, step-up on limit raises) and the JSON API."""

    url: str
    api: Api
    otp: FileOtpSender
    clock: list[dt.datetime]
    database_url: str
    loop: asyncio.AbstractEventLoop  # the API's

    def call(self, method: str, path: str, body: Any = None, token: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        return http(self.url, method, path, body, token, headers)

    def login(self, login: str, password: str = PASSWORD) -> str:
        status, body = self.call("POST", "/v1/sessions", {"login": login, "password": password})
        assert status == 201, body
        token: str = body["token"]
        return token


class ApiThread:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="fuelcard-api")
        self.runner: web.AppRunner | None = None

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def start(self) -> int:
        self.thread.start()

        async def up() -> int:
            await self.api.start()
            self.runner = web.AppRunner(self.api.app(), access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            port: int = self.runner.addresses[0][1]
            return port

        port: int = self._run(up())
        return port

    def stop(self) -> None:
        async def down() -> None:
            if self.runner is not None:
                await self.runner.cleanup()
            await self.api.stop()

        self._run(down())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def _start_edge(database_url: str, tmp_path: Path, dev_certs: Path, **api: Any) -> Iterator[Edge]:
    DevPki(dev_certs).client(Role.ADMIN, "fuelcard-api")
    outbox = tmp_path / "otp-outbox.jsonl"
    settings = make_settings(tmp_path, insecure=False, tls_dir=dev_certs, step_up_limit_raises=True,
                             otp_outbox_file=outbox)
    core = ServerThread(settings, database_url, ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC)))
    port = core.start()
    clock = [dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC)]
    api_settings = ApiSettings(target=f"127.0.0.1:{port}", ca=dev_certs / "ca.pem",
                               cert=dev_certs / "admin-fuelcard-api.pem",
                               key=dev_certs / "admin-fuelcard-api.key", database_url=database_url,
                               session_ttl_s=600, pool_max=4)
    the_api = Api(dataclasses.replace(api_settings, **api), now=lambda: clock[0])
    thread = ApiThread(the_api)
    try:
        api_port = thread.start()
        yield Edge(f"http://127.0.0.1:{api_port}", the_api, FileOtpSender(outbox), clock, database_url,
                   thread.loop)
    finally:
        thread.stop()
        core.stop()


@pytest.fixture
def edge(database_url: str, tmp_path: Path, dev_certs: Path) -> Iterator[Edge]:
    yield from _start_edge(database_url, tmp_path, dev_certs)


def _principal(edge: Edge, login: str, kind: str, account_id: str) -> str:
    made = principals.add(edge.database_url, login=login, kind=kind, account_id=account_id,
                          password=PASSWORD, phone="13800138000", by="test")
    return made.principal_id


def _family(server: RunningServer) -> tuple[str, list[builders.FundedCard]]:
    main = server.accounts.OpenAccount(account_pb2.OpenAccountRequest(
        request_id=builders.rid("open"), type=account_pb2.ACCOUNT_TYPE_FAMILY,
        holder=account_pb2.Holder(name="张伟", phone="13912345678"))).account.account_id
    builders.recharge(server, main, 500_000)
    members = []
    for name in ("妻子", "儿子"):
        sub = cb.open_account(server, parent=main, mode=cb.SHARED, label=name)
        members.append(cb.issue_card(server, sub.account_id))
    return main, members


def _fleet(server: RunningServer, plates: tuple[str, ...] = ("云A·12345", "云A·D7788")) -> cb.Fleet:
    return cb.open_fleet(server, 1_000_000, [cb.ALLOCATED] * len(plates), labels=list(plates))


def test_the_openapi_document_validates_and_is_served(edge: Edge) -> None:
    validate(document())
    status, served = edge.call("GET", "/openapi.json")
    assert status == 200
    assert served == json.loads(json.dumps(document()))
    assert served["openapi"] == "3.1.0"
    assert {"/v1/sessions", "/v1/top-ups", "/v1/accounts/{account_id}/sub-accounts"} <= set(served["paths"])
    # every documented operation is served (and asks for a session, login aside)
    for path, operations in served["paths"].items():
        concrete = path.replace("{account_id}", str(uuid.uuid4())).replace("{card_id}", str(uuid.uuid4()))
        for method, operation in operations.items():
            status, refused = edge.call(method.upper(), concrete, {} if method != "get" else None)
            expected = (400, "FIELD_INVALID") if operation.get("security") == [] else (
                401, "SESSION_MISSING")
            assert (status, refused["error"]["reason"]) == expected, (method, path)
    # a broken document is caught by the validator (the check can fail)
    broken = json.loads(json.dumps(document()))
    broken["paths"]["/v1/me"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] = {
        "$ref": 42}
    with pytest.raises(Exception):  # noqa: B017 - the validator's error types vary by version
        validate(broken)


def test_family_journey(edge: Edge, server: RunningServer, db: Conn) -> None:
    main, (wife, son) = _family(server)
    cb.sale(server, son, 30_000)  # 300 points to the son
    principal_id = _principal(edge, "zhang.wei", "holder", main)
    token = edge.login("zhang.wei")

    status, me = edge.call("GET", "/v1/me", token=token)
    assert status == 200
    assert me["principal"] == {"principal_id": principal_id, "kind": "holder", "account_id": main}
    assert me["account"]["balance"]["balance_fen"] == 500_000 - 30_000

    status, subs = edge.call("GET", f"/v1/accounts/{main}/sub-accounts", token=token)
    assert status == 200
    assert [(a["account_id"], a["label"], a["funding_mode"]) for a in subs["accounts"]] == [
        (wife.account_id, "妻子", "shared"), (son.account_id, "儿子", "shared")]
    status, cards = edge.call("GET", f"/v1/accounts/{son.account_id}/cards", token=token)
    assert status == 200 and [c["card_id"] for c in cards["cards"]] == [son.card_id]

    # a cap on the son's card: lowering needs no step-up
    status, caps = edge.call("PUT", f"/v1/cards/{son.card_id}/limits",
                             {"limits": {"per_transaction_fen": 20_000, "daily_fen": 50_000}}, token=token)
    assert status == 200, caps
    assert caps == {"per_transaction_fen": 20_000, "daily_fen": 50_000, "monthly_fen": 0}

    # a temporary raise: refused without a step-up, granted with the code the holder received
    start = dt.datetime(2026, 11, 25, 9, 0, tzinfo=dt.UTC)
    raise_body = {"limits": {"per_transaction_fen": 80_000, "daily_fen": 100_000, "monthly_fen": 300_000},
                  "start_time": start.isoformat(), "end_time": (start + dt.timedelta(days=2)).isoformat()}
    status, refused = edge.call("POST", f"/v1/cards/{son.card_id}/raises", raise_body, token=token)
    assert status == 409 and refused["error"]["reason"] == "STEP_UP_REQUIRED"
    status, challenge = edge.call("POST", "/v1/step-up-challenges", {
        "kind": "limit_raise", "subject_id": son.card_id, "amount_fen": 300_000}, token=token)
    assert status == 201, challenge
    assert challenge["masked_destination"] == "139****5678"
    code = edge.otp.read_code(challenge["challenge_id"])
    assert code is not None
    status, wrong = edge.call("POST", f"/v1/cards/{son.card_id}/raises", raise_body | {
        "step_up": {"challenge_id": challenge["challenge_id"], "code": "000000" if code != "000000"
                    else "111111"}}, token=token)
    assert status == 403 and wrong["error"]["reason"] == "STEP_UP_FAILED"
    status, granted = edge.call("POST", f"/v1/cards/{son.card_id}/raises", raise_body | {
        "step_up": {"challenge_id": challenge["challenge_id"], "code": code}}, token=token)
    assert status == 201, granted
    assert granted["raise_id"]

    # points pooling: the son's points to the main account
    status, pooled = edge.call("POST", "/v1/points-transfers", {
        "from_account_id": son.account_id, "to_account_id": main, "points": 200}, token=token)
    assert status == 201, pooled
    assert pooled == {"from_points_balance": 100, "to_points_balance": 200}

    # the core's audit trail names the edge and the person for every change
    actors = {row[0] for row in db.execute(
        "SELECT actor FROM fc.audit_log WHERE method IN ('/fuelcard.v1.ControlService/SetSpendingLimits',"
        " '/fuelcard.v1.ControlService/GrantTemporaryRaise', '/fuelcard.v1.ControlService/TransferPoints')")}
    assert actors == {f"admin::fuelcard-api for principal:{principal_id}"}
    assert db.execute("SELECT count(*) FROM fc.audit_log WHERE method = '/fuelcard.api/Login'"
                      " AND actor = %s", (f"api:principal:{principal_id}",)).fetchone() == (1,)


def test_fleet_journey(edge: Edge, server: RunningServer) -> None:
    fleet = _fleet(server)
    _principal(edge, "fleet.manager", "fleet_manager", fleet.parent_id)
    token = edge.login("fleet.manager")
    status, vehicles = edge.call("GET", f"/v1/accounts/{fleet.parent_id}/sub-accounts?page_size=1",
                                 token=token)
    assert status == 200 and len(vehicles["accounts"]) == 1 and vehicles["next_page_token"]
    status, rest = edge.call("GET", f"/v1/accounts/{fleet.parent_id}/sub-accounts?page_size=1&page_token="
                             + vehicles["next_page_token"], token=token)
    assert status == 200 and rest["next_page_token"] == ""
    plates = [v["label"] for v in vehicles["accounts"] + rest["accounts"]]
    assert plates == ["云A·12345", "云A·D7788"]

    a, b = (s.account_id for s in fleet.subs)
    body = {"lines": [{"account_id": a, "amount_fen": 30_000}, {"account_id": b, "amount_fen": 12_345}]}
    status, done = edge.call("POST", "/v1/top-ups", body, token=token, headers={"Idempotency-Key": "t-1"})
    assert status == 201, done
    assert done == {"total_fen": 42_345, "parent_balance_fen": 1_000_000 - 42_345}
    # the same Idempotency-Key: the first answer again, nothing moves twice
    status, again = edge.call("POST", "/v1/top-ups", body, token=token, headers={"Idempotency-Key": "t-1"})
    assert (status, again) == (201, done)

    cb.sale(server, fleet.subs[0], 8_000)
    status, history = edge.call("GET", f"/v1/accounts/{a}/transactions", token=token)
    assert status == 200
    assert [(t["kind"], t["amount_fen"]) for t in history["transactions"]] == [
        ("purchase", -8_000), ("allocation", 30_000)]
    status, vehicle = edge.call("GET", f"/v1/accounts/{a}", token=token)
    assert status == 200 and vehicle["balance"]["balance_fen"] == 22_000


def test_a_principal_cannot_touch_another_fleets_card(edge: Edge, server: RunningServer) -> None:
    mine, theirs = _fleet(server), _fleet(server, ("云B·00001",))
    _principal(edge, "manager.a", "fleet_manager", mine.parent_id)
    token = edge.login("manager.a")
    their_card, their_vehicle = theirs.subs[0].card_id, theirs.subs[0].account_id
    for method, path, body in (
            ("GET", f"/v1/cards/{their_card}/limits", None),
            ("PUT", f"/v1/cards/{their_card}/limits", {"limits": {"daily_fen": 1}}),
            ("GET", f"/v1/accounts/{their_vehicle}/transactions", None),
            ("GET", f"/v1/accounts/{theirs.parent_id}/sub-accounts", None),
            ("POST", "/v1/top-ups", {"lines": [{"account_id": their_vehicle, "amount_fen": 100}]})):
        status, refused = edge.call(method, path, body, token=token)
        assert status == 403, (path, refused)
        assert refused["error"]["reason"] in ("NOT_YOUR_CARD", "NOT_YOUR_ACCOUNT")
    # nothing moved on their side
    assert cb.balance_of(server, their_vehicle) == (0, 0)
    # and mine works with the same session
    status, _ = edge.call("GET", f"/v1/cards/{mine.subs[0].card_id}/limits", token=token)
    assert status == 200


def test_sessions_expire_end_and_bad_logins_are_refused(edge: Edge, server: RunningServer) -> None:
    fleet = _fleet(server, ("云A·1",))
    _principal(edge, "manager.b", "fleet_manager", fleet.parent_id)
    status, refused = edge.call("POST", "/v1/sessions", {"login": "manager.b", "password": "wrong one"})
    assert (status, refused["error"]["reason"]) == (401, "LOGIN_FAILED")
    status, refused = edge.call("POST", "/v1/sessions", {"login": "nobody.here", "password": PASSWORD})
    assert (status, refused["error"]["reason"]) == (401, "LOGIN_FAILED")
    status, refused = edge.call("GET", "/v1/me")
    assert (status, refused["error"]["reason"]) == (401, "SESSION_MISSING")

    token = edge.login("manager.b")
    assert edge.call("GET", "/v1/me", token=token)[0] == 200
    edge.clock[0] += dt.timedelta(seconds=599)
    assert edge.call("GET", "/v1/me", token=token)[0] == 200
    edge.clock[0] += dt.timedelta(seconds=1)  # the session's 600 s are over
    status, refused = edge.call("GET", "/v1/me", token=token)
    assert (status, refused["error"]["reason"]) == (401, "SESSION_INVALID")
    swept = asyncio.run_coroutine_threadsafe(edge.api.sweep(), edge.loop).result(timeout=30)
    assert swept == 1

    token = edge.login("manager.b")
    assert edge.call("DELETE", "/v1/sessions/current", token=token)[0] == 204
    assert edge.call("GET", "/v1/me", token=token)[0] == 401

    # a disabled principal: its sessions end at once, and it cannot log in again
    token = edge.login("manager.b")
    assert principals.disable(edge.database_url, login="manager.b", by="test")[1] == 1
    assert edge.call("GET", "/v1/me", token=token)[0] == 401
    status, refused = edge.call("POST", "/v1/sessions", {"login": "manager.b", "password": PASSWORD})
    assert (status, refused["error"]["reason"]) == (401, "LOGIN_FAILED")


@pytest.fixture
def tight_edge(database_url: str, tmp_path: Path, dev_certs: Path) -> Iterator[Edge]:
    # buckets that never refill: the n+1st request is refused whatever the timing
    yield from _start_edge(database_url, tmp_path, dev_certs, principal_rate=0.0, principal_burst=3,
                           ip_rate=0.0, ip_burst=8)


def test_rate_limits_answer_429_per_principal_then_per_ip(tight_edge: Edge, server: RunningServer) -> None:
    edge = tight_edge
    fleet = _fleet(server, ("云A·1",))
    _principal(edge, "manager.c", "fleet_manager", fleet.parent_id)
    _principal(edge, "manager.d", "fleet_manager", fleet.parent_id)
    token = edge.login("manager.c")  # IP request 1
    for _ in range(3):  # IP 2-4; principal 1-3
        assert edge.call("GET", "/v1/me", token=token)[0] == 200
    status, refused = edge.call("GET", "/v1/me", token=token)  # IP 5
    assert (status, refused["error"]["reason"]) == (429, "RATE_LIMITED")
    # another principal from the same address still gets through, until the address's burst is spent
    other = edge.login("manager.d")  # IP 6
    assert edge.call("GET", "/v1/me", token=other)[0] == 200  # IP 7
    assert edge.call("GET", "/v1/me", token=other)[0] == 200  # IP 8
    status, refused = edge.call("GET", "/v1/me", token=other)  # IP 9
    assert (status, refused["error"]["reason"]) == (429, "RATE_LIMITED")
    status, refused = edge.call("POST", "/v1/sessions", {"login": "manager.d", "password": PASSWORD})
    assert status == 429


def test_only_an_admin_callers_well_formed_principal_is_taken() -> None:
    principal = "principal:0b6f1a52-6c1e-4c7e-9b3a-123456789012"
    edge_cert = Caller(role=Role.ADMIN, name="fuelcard-api")
    acting = acting_for(edge_cert, ((ON_BEHALF_OF, principal),))
    assert acting.on_behalf_of == principal
    assert acting.key == edge_cert.key  # the idempotency scope stays the edge's
    # all twelve digits of the uuid's last group are kept: a uuid is not a phone number
    assert actor_of(acting) == f"admin::fuelcard-api for {principal}"
    assert actor_of(edge_cert) == "admin::fuelcard-api"
    terminal = Caller(role=Role.POS, name="KM-001-T1", scope="KM-001")
    assert acting_for(terminal, ((ON_BEHALF_OF, principal),)) == terminal
    for bad in ("principal:13800138000", "principal:" + principal, "x" * 30 + ":" + principal[10:]):
        assert acting_for(edge_cert, ((ON_BEHALF_OF, bad),)) == edge_cert, bad


def test_the_throttle_keeps_at_most_max_keys_and_refills_at_its_rate() -> None:
    now = [0.0]
    throttle = Throttle(rate=1.0, burst=2, max_keys=3, clock=lambda: now[0])
    assert [throttle.take("a") for _ in range(3)] == [0.0, 0.0, 1.0]
    now[0] = 0.5
    assert throttle.take("a") == 0.5  # half a token back, half a second to wait for the next
    now[0] = 1.0
    assert throttle.take("a") == 0.0
    for key in ("b", "c", "d"):
        throttle.take(key)
    assert len(throttle) == 3  # "a", the least recently used, went
    assert throttle.take("a") == 0.0  # and comes back with a full bucket
    assert Throttle(rate=0.0, burst=1).take("x") == 0.0
    never = Throttle(rate=0.0, burst=1)
    never.take("x")
    assert never.take("x") == float("inf")


def test_fuelcard_api_serve_runs_as_its_own_process(database_url: str, dev_certs: Path,
                                                    tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    DevPki(dev_certs).client(Role.ADMIN, "fuelcard-api")
    port_file = tmp_path / "port"
    exe = Path(sys.executable).parent / "fuelcard-api"
    proc = subprocess.Popen([str(exe), "serve", "--listen", "127.0.0.1:0", "--certs", str(dev_certs),
                             "--target", "127.0.0.1:1", "--database-url", database_url,
                             "--port-file", str(port_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60  # readiness, not a timing assertion
        while not (port_file.exists() and port_file.read_text()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "fuelcard-api did not start"
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port_file.read_text()}"
        status, served = http(base, "GET", "/openapi.json")
        assert status == 200 and served["info"]["title"] == "fuelcard JSON API"
        status, refused = http(base, "POST", "/v1/sessions", {"login": "nobody.here", "password": "x"})
        assert (status, refused["error"]["reason"]) == (401, "LOGIN_FAILED")
        status, refused = http(base, "GET", "/v1/nowhere")
        assert (status, refused["error"]["reason"]) == (404, "NOT_FOUND")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
