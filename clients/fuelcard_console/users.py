"""Console users (fc.console_users): made by `fuelcard-api console-user add`
(and the demo), audited. The password is hashed with scrypt (the JSON API's
fuelcard_api.principals.hash_password); the TOTP secret is made here and
shown once, to be put into the user's authenticator app."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass

import psycopg
import pyotp
from fuelcard_api import principals
from fuelcard_server.db import one_shot
from fuelcard_server.locks import AUDIT_LOCK
from fuelcard_server.states import AccountType

from fuelcard_console.auth import ACCOUNT_ROLES, AUDIT_SQL, Role

INSERT_SQL = """
    INSERT INTO fc.console_users (login, role, account_id, password_hash, totp_secret, created_at)
    VALUES (%(login)s, %(role)s, (SELECT a.id FROM fc.accounts a WHERE a.uid = %(account)s::uuid
                                     AND a.kind <> fc.account_kind_system()),
            %(hash)s, %(totp)s, now())
    RETURNING uid::text"""
DISABLE_SQL = """
    WITH u AS (UPDATE fc.console_users SET disabled_at = now()
                WHERE login = %(login)s AND disabled_at IS NULL RETURNING id, uid::text),
         s AS (DELETE FROM fc.console_sessions WHERE user_id IN (SELECT id FROM u) RETURNING 1)
    SELECT u.uid, (SELECT count(*) FROM s) FROM u"""


class ConsoleUserError(Exception):
    """A user that cannot be made as asked (the message names no secret)."""


@dataclass(frozen=True)
class NewUser:
    user_id: str
    login: str
    role: Role
    account_id: str | None
    password: str
    totp_secret: str

    def totp_uri(self) -> str:
        """The otpauth:// URI an authenticator app reads (as a QR code)."""
        return pyotp.TOTP(self.totp_secret).provisioning_uri(name=self.login, issuer_name="fuelcard")


def add(url: str, *, login: str, role: str, account_id: str | None = None, password: str | None = None,
        totp_secret: str | None = None, by: str) -> NewUser:
    """Make a console user; a password and a TOTP secret are generated when
    none is given (the demo gives fixed ones)."""
    try:
        the_role = Role(role)
    except ValueError:
        raise ConsoleUserError(f"role must be one of {', '.join(r.value for r in Role)}") from None
    if (the_role in ACCOUNT_ROLES) != (account_id is not None):
        raise ConsoleUserError("a fleet manager or holder is made with --account, the other roles without")
    password = password if password is not None else secrets.token_urlsafe(12)
    if not principals.MIN_PASSWORD_CHARS <= len(password) <= principals.MAX_PASSWORD_CHARS:
        raise ConsoleUserError(f"the password must be {principals.MIN_PASSWORD_CHARS}-"
                               f"{principals.MAX_PASSWORD_CHARS} characters")
    totp_secret = totp_secret or pyotp.random_base32()
    with one_shot(url) as conn:
        if account_id is not None:
            try:
                uuid.UUID(account_id)
            except ValueError:
                raise ConsoleUserError("the account must be an account id (UUID)") from None
            row = conn.execute(principals.ACCOUNT_SQL, {"account": account_id}).fetchone()
            if row is None:
                raise ConsoleUserError("no such account")
            kind, top_level = row
            if not top_level:
                raise ConsoleUserError("the account must be a top-level account (a fleet or a family)")
            if the_role is Role.FLEET_MANAGER and kind != AccountType.CORPORATE:
                raise ConsoleUserError("a fleet manager's account must be a corporate account")
        try:
            made = conn.execute(INSERT_SQL, {
                "login": login, "role": the_role.value, "account": account_id,
                "hash": principals.hash_password(password), "totp": totp_secret}).fetchone()
        except psycopg.errors.UniqueViolation:
            raise ConsoleUserError("that login is taken") from None
        except psycopg.errors.CheckViolation:
            raise ConsoleUserError("a login is 3-64 letters, digits or . _ @ -") from None
        assert made is not None
        conn.execute(AUDIT_SQL, {"lock": AUDIT_LOCK, "actor": by, "method": "/fuelcard.console/AddUser",
                                 "target": made[0], "outcome": "OK"})
    return NewUser(made[0], login, the_role, account_id, password, totp_secret)


def disable(url: str, *, login: str, by: str) -> tuple[str, int]:
    """Stop a user from logging in and end their sessions, audited: (their id, sessions ended)."""
    with one_shot(url) as conn:
        row = conn.execute(DISABLE_SQL, {"login": login}).fetchone()
        if row is None:
            raise ConsoleUserError("no such login, or it is disabled already")
        conn.execute(AUDIT_SQL, {"lock": AUDIT_LOCK, "actor": by, "method": "/fuelcard.console/DisableUser",
                                 "target": row[0], "outcome": "OK"})
    return str(row[0]), int(row[1])
