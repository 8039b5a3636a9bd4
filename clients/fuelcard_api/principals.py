"""Principals of the JSON API (fc.principals, migration 0005): who may log
in, with what password, and over which account they have authority.

Passwords are kept as scrypt hashes (hashlib.scrypt, n=2^14, r=8, p=1: about
16 MiB and tens of milliseconds per guess), salted per principal. A login
that names no principal still costs one scrypt, so that the answer time does
not tell which logins exist.

Authority: a principal acts on its own account and on that account's
sub-accounts (a family's secondary cards, a fleet's vehicles) and their cards.
The core checks the rest (a sub-account's caps are set by its parent, ...).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass

import psycopg
from fuelcard_server.locks import AUDIT_LOCK
from fuelcard_server.states import AccountType

KINDS = {"holder": 1, "fleet_manager": 2}
KIND_NAMES = {v: k for k, v in KINDS.items()}
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 14, 8, 1
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 256

INSERT_SQL = """
    INSERT INTO fc.principals (login, kind, account_id, password_hash, phone, created_at)
    SELECT %(login)s, %(kind)s, a.id, %(hash)s, %(phone)s, now()
      FROM fc.accounts a WHERE a.uid = %(account)s::uuid AND a.kind <> fc.account_kind_system()
    RETURNING uid::text"""
ACCOUNT_SQL = ("SELECT kind, parent_id IS NULL FROM fc.accounts"
               " WHERE uid = %(account)s::uuid AND kind <> fc.account_kind_system()")
# Disabling ends every session at once: the sessions go with it.
DISABLE_SQL = """
    WITH p AS (UPDATE fc.principals SET disabled_at = now()
                WHERE login = %(login)s AND disabled_at IS NULL RETURNING id, uid::text),
         s AS (DELETE FROM fc.api_sessions WHERE principal_id IN (SELECT id FROM p) RETURNING 1)
    SELECT p.uid, (SELECT count(*) FROM s) FROM p"""
AUDIT_SQL = (
    "SELECT fc.audit_append(p_lock => %(lock)s, p_actor => %(actor)s, p_method => %(method)s,"
    " p_target => %(target)s::uuid, p_outcome => %(outcome)s)")


class PrincipalError(Exception):
    """A principal that cannot be made as asked (the message names no secret)."""


@dataclass(frozen=True)
class Principal:
    principal_id: str
    login: str
    kind: str
    account_id: str


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**SCRYPT_LOG2_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=32)
    return f"scrypt${SCRYPT_LOG2_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


# Checked against when a login names no principal: the same work as a real one.
_DUMMY = hash_password(secrets.token_hex(16))


def check_password(password: str, stored: str | None) -> bool:
    """Whether the password matches the stored hash; None (no such login)
    costs the same and never matches."""
    try:
        scheme, log2_n, r, p, salt, digest = (stored or _DUMMY).split("$")
        if scheme != "scrypt" or len(password) > MAX_PASSWORD_CHARS:
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=2 ** int(log2_n),
                             r=int(r), p=int(p), dklen=len(digest) // 2)
    except ValueError:
        return False
    return stored is not None and hmac.compare_digest(got.hex(), digest)


def add(url: str, *, login: str, kind: str, account_id: str, password: str, phone: str,
        by: str) -> Principal:
    """Create a principal (`fuelcard admin principal add`), audited."""
    if kind not in KINDS:
        raise PrincipalError(f"kind must be one of {', '.join(KINDS)}")
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise PrincipalError(f"the password must be {MIN_PASSWORD_CHARS}-{MAX_PASSWORD_CHARS} characters")
    if phone and not (phone.isascii() and phone.isdigit() and 5 <= len(phone) <= 20):
        raise PrincipalError("the phone must be 5-20 digits")
    try:
        uuid.UUID(account_id)
    except ValueError:
        raise PrincipalError("the account must be an account id (UUID)") from None
    with psycopg.connect(url) as conn:
        row = conn.execute(ACCOUNT_SQL, {"account": account_id}).fetchone()
        if row is None:
            raise PrincipalError("no such account")
        account_kind, top_level = row
        if kind == "fleet_manager" and not (account_kind == AccountType.CORPORATE and top_level):
            raise PrincipalError("a fleet manager's account must be a top-level corporate account")
        try:
            made = conn.execute(INSERT_SQL, {"login": login, "kind": KINDS[kind], "account": account_id,
                                             "hash": hash_password(password), "phone": phone}).fetchone()
        except psycopg.errors.UniqueViolation:
            raise PrincipalError("that login is taken") from None
        except psycopg.errors.CheckViolation:
            raise PrincipalError("a login is 3-64 letters, digits or . _ @ -") from None
        assert made is not None
        conn.execute(AUDIT_SQL, {"lock": AUDIT_LOCK, "actor": by, "method": "/fuelcard.api/AddPrincipal",
                                 "target": made[0], "outcome": "OK"})
    return Principal(made[0], login, kind, account_id)


def disable(url: str, *, login: str, by: str) -> tuple[str, int]:
    """Stop a principal from logging in and end its sessions
    (`fuelcard admin principal disable`), audited: (its id, sessions ended)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(DISABLE_SQL, {"login": login}).fetchone()
        if row is None:
            raise PrincipalError("no such login, or it is disabled already")
        conn.execute(AUDIT_SQL, {"lock": AUDIT_LOCK, "actor": by,
                                 "method": "/fuelcard.api/DisablePrincipal", "target": row[0],
                                 "outcome": "OK"})
    return str(row[0]), int(row[1])
