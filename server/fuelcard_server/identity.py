"""Who is calling: roles, and the identity a client certificate carries.

Terminals and payment adapters (and internal services) authenticate with
client certificates (mutual TLS). The certificate's subject says who:
  CN = the caller's id (terminal id, adapter name, service name)
  OU = its role (pos, adapter, admin, reviewer, analytics)
  O  = its scope: the station of a terminal, the channel of an adapter
Every RPC declares the roles that may call it (permissions.py).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID


class Role(enum.StrEnum):
    POS = "pos"
    ADAPTER = "adapter"
    ADMIN = "admin"
    REVIEWER = "reviewer"
    ANALYTICS = "analytics"


@dataclass(frozen=True)
class Caller:
    role: Role | None  # None: development mode without TLS, every role
    name: str
    scope: str = ""  # station of a terminal, channel of an adapter
    # The person an edge (the JSON API, with an admin certificate) acts for,
    # from the call's ON_BEHALF_OF metadata: recorded in the audit trail as
    # part of the actor; never part of `key` (the edge's own request_ids).
    on_behalf_of: str = ""

    @property
    def key(self) -> str:
        """Scope of idempotency keys: one caller's request_ids never meet
        another's."""
        if self.role is None:
            return ""
        return f"{self.role.value}:{self.scope}:{self.name}"

    def may(self, roles: frozenset[Role]) -> bool:
        return self.role is None or self.role in roles


DEVELOPMENT = Caller(role=None, name="development")

# Call metadata an admin caller (an edge) sets to name the principal it acts
# for, e.g. "principal:<uuid>". Other roles' values are ignored: a terminal
# speaks for itself.
ON_BEHALF_OF = "fuelcard-on-behalf-of"
# "<kind>:<uuid>": an internal id, never a login, phone or name, so that it
# can go into the audit trail as it is.
_ON_BEHALF_OF_FORM = re.compile(
    r"[a-z_]{1,20}:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def acting_for(caller: Caller, metadata: Any) -> Caller:
    """The caller with the principal its metadata names, if it is an admin
    (or development mode) and the value is well-formed; a malformed value is
    dropped rather than written into the audit trail."""
    if caller.role not in (Role.ADMIN, None) or not metadata:
        return caller
    for key, value in metadata:
        if key == ON_BEHALF_OF and isinstance(value, str) and _ON_BEHALF_OF_FORM.fullmatch(value):
            return dataclasses.replace(caller, on_behalf_of=value)
    return caller


@functools.lru_cache(maxsize=4096)
def from_pem(pem: bytes) -> Caller | None:
    """The caller a verified client certificate names; None if it names no
    known role. Cached: a connection presents the same certificate on every
    call, and parsing it costs more than the RPC."""
    cert = x509.load_pem_x509_certificate(pem)
    subject = cert.subject

    def first(oid: x509.ObjectIdentifier) -> str:
        values = subject.get_attributes_for_oid(oid)
        value = values[0].value if values else ""
        return value if isinstance(value, str) else value.decode()

    try:
        role = Role(first(NameOID.ORGANIZATIONAL_UNIT_NAME))
    except ValueError:
        return None
    return Caller(role=role, name=first(NameOID.COMMON_NAME),
                  scope=first(NameOID.ORGANIZATION_NAME))


def of(context: grpc.aio.ServicerContext[Any, Any], *, tls: bool) -> Caller | None:
    """The caller of this RPC; None if a TLS peer shows no usable identity."""
    if not tls:
        return DEVELOPMENT
    pems = list(context.auth_context().get("x509_pem_cert") or ())
    if not pems:
        return None
    return from_pem(pems[0])
