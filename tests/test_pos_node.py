"""The independent Node.js POS client (clients/pos-node), written from
docs/TERMINAL_PROTOCOL.md and proto/ only, against a real server over mutual
TLS: the proof that the document is enough to build a terminal.

Its npm dependencies are installed by scripts/bootstrap (`npm ci`). Without
them these tests fail, never skip: a silently skipped interoperability test
proves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from fuelcard.v1 import account_pb2, common_pb2, transaction_pb2, transaction_pb2_grpc

from tests.plugins import logscan
from tests.plugins.terminals import Fixture
from tests.test_terminal_vectors import VECTORS

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "clients" / "pos-node"
TERMINAL = ("pos-KM-001-T2", "KM-001-T2", "KM-001")  # (certificate stem, CN, O)
PIN = "246810"


def node() -> str:
    exe = shutil.which("node")
    if exe is None:
        pytest.fail("node is not installed: the Node.js POS client cannot run")
    for package in ("@grpc/grpc-js", "@grpc/proto-loader", "protobufjs", "sm-crypto"):
        if not (CLIENT / "node_modules" / package / "package.json").is_file():
            pytest.fail(f"{CLIENT}/node_modules lacks {package}: run scripts/bootstrap (npm ci)")
    return exe


def run(script: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [node(), str(CLIENT / script), *args], capture_output=True, text=True, timeout=120,
        env={"PATH": os.environ.get("PATH", ""), **(env or {})}, check=False)
    assert done.stdout.strip(), f"{script} printed nothing; stderr: {done.stderr[-2000:]}"
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(answer, dict)
    return done.returncode, answer


def test_node_client_reproduces_every_vector() -> None:
    code, answer = run("vectors.js", str(ROOT / "docs" / "TERMINAL_PROTOCOL.md"))
    assert answer["failures"] == []
    assert answer["ok"] is True and code == 0
    assert sorted(answer["checked"]) == sorted(VECTORS)


def test_node_client_notices_a_wrong_vector(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "TERMINAL_PROTOCOL.md").read_text(encoding="utf-8")
    mac = VECTORS["mac/cancel"]["mac_hex"]
    assert isinstance(mac, bytes)
    wrong = bytes([mac[0] ^ 1]) + mac[1:]
    bad = tmp_path / "bad.md"
    bad.write_text(doc.replace(f"mac_hex = {mac.hex()}", f"mac_hex = {wrong.hex()}"), encoding="utf-8")
    code, answer = run("vectors.js", str(bad))
    assert code == 1 and answer["ok"] is False
    assert [(f["name"], f["key"]) for f in answer["failures"]] == [("mac/cancel", "mac_hex")]


def test_node_pos_flow_against_a_real_server(setup: Fixture) -> None:
    server = setup.server
    # A second card on the funded account, for the PIN the Node client sets.
    pin_card = setup.admin.IssueCard(account_pb2.IssueCardRequest(
        request_id=f"node-{uuid.uuid4().hex[:16]}", account_id=setup.account_id)).card_number
    logscan.register("card number", pin_card)
    logscan.register("PIN", PIN)
    stem, name, station = TERMINAL
    certs = server.certs
    code, out = run("flow.js", env={
        "FUELCARD_TARGET": server.target,
        "FUELCARD_CA": str(certs / "ca.pem"),
        "FUELCARD_CERT": str(certs / f"{stem}.pem"),
        "FUELCARD_KEY": str(certs / f"{stem}.key"),
        "FUELCARD_TERMINAL_ID": name,
        "FUELCARD_STATION_ID": station,
        "FUELCARD_CARD_NUMBER": setup.card_number,
        "FUELCARD_PIN_CARD_NUMBER": pin_card,
        "FUELCARD_PIN": PIN,
    })
    assert code == 0, out

    assert out["sign_on"]["ok"] and out["sign_on"]["working_key_bytes"] == 16

    auth = out["authorize"]
    assert (auth["ok"], auth["decision"], auth["state"], auth["amount_fen"]) == (
        True, "DECISION_APPROVED", "HOLD_STATE_AUTHORIZED", "30000")
    # Retries get the first answer: the same hold, not a second one.
    for replay in (out["replay_new_counter"], out["replay_same_bytes"]):
        assert (replay["ok"], replay["decision"], replay["hold_id"]) == (
            True, "DECISION_APPROVED", auth["hold_id"])

    assert (out["confirm"]["decision"], out["confirm"]["state"], out["confirm"]["settled_fen"]) == (
        "DECISION_APPROVED", "HOLD_STATE_CONFIRMED", "28850")
    assert out["confirm"]["balance_fen"] == str(100_000 - 28_850)
    assert out["confirm_replay"] == out["confirm"]
    assert (out["confirm_again"]["code"], out["confirm_again"]["reason"],
            out["confirm_again"]["error_infos"]) == ("FAILED_PRECONDITION", "HOLD_ALREADY_CONFIRMED", 1)
    assert out["get_hold"]["state"] == "HOLD_STATE_CONFIRMED"

    assert out["authorize_to_cancel"]["decision"] == "DECISION_APPROVED"
    assert out["cancel"]["ok"] and out["cancel"]["state"] == "HOLD_STATE_CANCELLED"
    assert out["cancel"]["hold_id"] == out["authorize_to_cancel"]["hold_id"]

    assert (out["decline"]["ok"], out["decline"]["decision"], out["decline"]["decline_reason"]) == (
        True, "DECISION_DECLINED", "DECLINE_REASON_INSUFFICIENT_FUNDS")

    # The PIN the Node client set from its own PIN block is the card's PIN.
    assert out["set_pin"] == {"ok": True}
    assert out["pin_missing"]["decline_reason"] == "DECLINE_REASON_PIN_REQUIRED"
    assert out["pin_wrong"]["decline_reason"] == "DECLINE_REASON_WRONG_PIN"
    assert out["pin_right"]["decision"] == "DECISION_APPROVED"
    assert out["pin_cancel"]["state"] == "HOLD_STATE_CANCELLED"

    # Refusals: the code and the single ErrorInfo, from grpc-status-details-bin.
    for step, code_name, reason in (
        ("mac_invalid", "UNAUTHENTICATED", "MAC_INVALID"),
        ("counter_replayed", "UNAUTHENTICATED", "COUNTER_REPLAYED"),
        ("mac_missing", "UNAUTHENTICATED", "MAC_MISSING"),
        ("terminal_mismatch", "PERMISSION_DENIED", "TERMINAL_MISMATCH"),
        ("card_not_found", "NOT_FOUND", "CARD_NOT_FOUND"),
    ):
        e = out[step]
        assert (e["ok"], e["code"], e["reason"], e["domain"], e["error_infos"]) == (
            False, code_name, reason, "fuelcard.v1", 1), (step, e)

    assert out["balance"]["balance"]["balance_fen"] == str(100_000 - 28_850)

    # And the server agrees, read over the Python stubs: one hold settled.
    hold = transaction_pb2_grpc.TransactionServiceStub(server.channel("admin-ops")).GetHold(
        transaction_pb2.GetHoldRequest(hold_id=auth["hold_id"])).hold
    assert (hold.state, hold.settled_fen, hold.terminal_id) == (
        common_pb2.HOLD_STATE_CONFIRMED, 28_850, name)
