"""Anchors of the audit chain's head, kept outside the database.

The hash chain (audit.py) shows a record edited, deleted or moved, but not a
chain cut short at its end, nor one rewritten wholesale by someone with
database rights who recomputed every later hash: such a chain is consistent
in itself. `fuelcard audit anchor` notes the current head - its record id and
hash - signed with the server's SM2 key, as one line appended to a file the
operator keeps elsewhere (another host, WORM storage); `fuelcard audit verify
--anchor FILE` then fails unless the chain still extends every anchored head:
each anchored record is still there with the same hash.

One anchor per line, UTF-8 JSON:
  {"format": "fuelcard-audit-anchor/1", "record_id": 42,
   "hash": "<64 hex digits>", "anchored_at": "2026-11-25T22:00:00.123456+00:00",
   "signature": "<128 hex digits>"}
The signature (SM2 with SM3, signer id "1234567812345678", 64 bytes r || s,
as RechargeResponse.signature) is over the tagged encoding of
fuelcard_server.keys.canonical:
  E("AuditAnchor", record_id, hash (32 bytes), anchored_at as integer
    microseconds since 1970-01-01 UTC)
so a line cannot be edited (nor made up by whoever can write the file but
lacks the server's key) without failing verification.

The journal's hash chain (journal_chain.py) is anchored the same way by
`fuelcard journal anchor` (Chain JOURNAL): format "fuelcard-journal-anchor/1",
"record_id" the journal entry id, "hash" its chain hash, and the signature
over E("JournalAnchor", entry_id, hash, anchored_at): an audit anchor is
never taken for a journal one, nor the other way round.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fuelcard_server import gm, keys

FORMAT = "fuelcard-audit-anchor/1"


@dataclass(frozen=True)
class Chain:
    """Which hash chain an anchor file is of: its lines' format and the tag
    their signatures are over."""

    format: str
    tag: str


AUDIT = Chain(FORMAT, "AuditAnchor")
JOURNAL = Chain("fuelcard-journal-anchor/1", "JournalAnchor")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# A line longer than this is not an anchor (about 300 bytes are).
MAX_LINE_BYTES = 4096


class AnchorError(Exception):
    """An anchor file that cannot be trusted: a line unreadable or not signed
    by the server's key. The message names the line, never its content."""


def _micros(at: dt.datetime) -> int:
    return (at - EPOCH) // dt.timedelta(microseconds=1)


def signing_input(record_id: int, head_hash: bytes, anchored_at: dt.datetime,
                  chain: Chain = AUDIT) -> bytes:
    return keys.canonical(chain.tag, record_id, head_hash, _micros(anchored_at))


@dataclass(frozen=True)
class Anchor:
    record_id: int
    hash: bytes
    anchored_at: dt.datetime
    signature: bytes
    chain: Chain = AUDIT

    @classmethod
    def make(cls, key: gm.Sm2PrivateKey, record_id: int, head_hash: bytes,
             anchored_at: dt.datetime, chain: Chain = AUDIT) -> Anchor:
        at = anchored_at.astimezone(dt.UTC)
        return cls(record_id, head_hash, at,
                   gm.sm2_sign(key, signing_input(record_id, head_hash, at, chain)), chain)

    def verifies(self, public: gm.Sm2PublicKey) -> bool:
        return gm.sm2_verify(public, signing_input(self.record_id, self.hash, self.anchored_at,
                                                   self.chain),
                             self.signature)

    def to_line(self) -> str:
        return json.dumps({"format": self.chain.format, "record_id": self.record_id,
                           "hash": self.hash.hex(), "anchored_at": self.anchored_at.isoformat(),
                           "signature": self.signature.hex()}) + "\n"

    @classmethod
    def from_line(cls, line: str, chain: Chain = AUDIT) -> Anchor:
        """Parse one line; ValueError if it is not an anchor of this format."""
        d = json.loads(line)
        if not isinstance(d, dict) or d.get("format") != chain.format:
            raise ValueError(f"not a {chain.format} anchor")
        record_id, digest = d["record_id"], bytes.fromhex(d["hash"])
        at = dt.datetime.fromisoformat(d["anchored_at"])
        if (not isinstance(record_id, int) or isinstance(record_id, bool) or record_id < 1
                or len(digest) != 32 or at.tzinfo is None):
            raise ValueError("bad anchor fields")
        return cls(record_id, digest, at.astimezone(dt.UTC), bytes.fromhex(d["signature"]),
                   chain)


def read(path: Path, public: gm.Sm2PublicKey, chain: Chain = AUDIT) -> list[Anchor]:
    """Every anchor in the file, in file order, each checked against the
    server's public key. AnchorError on the first line that is not a
    well-formed anchor signed by that key (blank lines are skipped);
    OSError if the file cannot be read."""
    anchors = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise AnchorError(f"{path}: line {number} is not an anchor (too long)")
            if not raw.strip():
                continue
            try:
                anchor = Anchor.from_line(raw.decode(), chain)
            except (ValueError, KeyError, TypeError) as exc:
                raise AnchorError(f"{path}: line {number} is not an anchor "
                                  f"({type(exc).__name__})") from None
            if not anchor.verifies(public):
                raise AnchorError(f"{path}: line {number} is not signed by the server's key "
                                  "(edited, or made by someone else)")
            anchors.append(anchor)
    return anchors


def append(path: Path, anchor: Anchor) -> None:
    """Append one line (O_APPEND: one write, never over what is there) and
    flush it to disk before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = anchor.to_line().encode()
        if os.write(fd, data) != len(data):
            raise OSError(f"{path}: short write")
        os.fsync(fd)
    finally:
        os.close(fd)
