"""Personal data of account holders, sealed at rest (issue 15, item 5; PIPL).

A holder's phone and ID number are stored SM4-GCM sealed (gm.seal) under a key
derived from the data key, the way card-number segments are
(card_numbers.py), and found by an HMAC-SM3 blind index under another derived
key: fc.account_holders holds no digit of either, and without the root key
(which the data key is sealed under: key_custody.py) a dump shows none. Each
sealed value is bound (associated data) to its field and to its own blind
index, so a phone cannot be passed off as an ID number or as another
holder's. The name stays readable: it is what an operator recognises an
account by, and erasure replaces it.

An older database held both in plaintext. The key is not in the database, so
migration 0009 cannot seal them: it keeps them in *_plaintext columns, and the
server seals them in batches when it starts (`fuelcard privacy seal` does the
same by hand); reads meanwhile take a row either way.

The data-subject export (fc.holder_export, with the holder data opened here)
and the erasure of a closed account (fc.erase_holder) are served by
AccountService.ExportHolderData / EraseHolderData and `fuelcard privacy
export|erase`.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any

from fuelcard_server import gm, keys
from fuelcard_server.db import one_shot

log = logging.getLogger(__name__)

FIELDS = ("phone", "id_number")
SEAL_BATCH = 500

HOLDERS_TO_SEAL_SQL = "SELECT account_id, phone, id_number FROM fc.holders_to_seal(p_limit => %s)"
SEAL_HOLDER_SQL = (
    "SELECT fc.seal_holder(p_account_id => %(account_id)s, p_phone_sealed => %(phone_sealed)s,"
    " p_phone_index => %(phone_index)s, p_id_number_sealed => %(id_number_sealed)s,"
    " p_id_number_index => %(id_number_index)s, p_seal_key_id => %(seal_key_id)s)")
HOLDER_EXPORT_SQL = "SELECT fc.holder_export(p_account_uid => %s::uuid)"
HOLDER_ACCOUNTS_SQL = ("SELECT fc.holder_accounts(p_phone_index => %(phone_index)s,"
                       " p_id_number_index => %(id_number_index)s)")
ERASE_HOLDER_SQL = "SELECT fc.erase_holder(p_account_uid => %(account_uid)s::uuid, p_now => %(now)s)"


class HolderDataMismatch(Exception):
    """A stored value that does not open (tampered with, or sealed under another
    data key). The message never holds the value."""


def _normalise(field: str, value: str) -> str:
    # An ID number's check character is X or x alike; the index must not care.
    return value.upper() if field == "id_number" else value


@dataclass(frozen=True)
class SealedField:
    sealed: bytes | None
    index: bytes | None


class HolderSeal:
    """Seals, opens and indexes holder fields under keys derived from the data
    key (`provider`: key_custody.ServingKeys.data)."""

    def __init__(self, provider: keys.KeyProvider) -> None:
        data = provider.root_key()
        self.key_id = keys.root_key_id(data)
        self._seal_key = gm.sm3_kdf(data, keys.canonical("fuelcard", "holder-seal/v1"), 16)
        self._index_key = gm.sm3_kdf(data, keys.canonical("fuelcard", "holder-index/v1"), 32)

    def index(self, field: str, value: str) -> bytes:
        """The blind index of a value: equal values, equal indexes; nothing else
        to be learnt from it without the key."""
        return gm.hmac_sm3(self._index_key, keys.canonical("fuelcard/holder-index/v1", field,
                                                            _normalise(field, value)))

    @staticmethod
    def _aad(field: str, index: bytes) -> bytes:
        return keys.canonical("fuelcard/holder/v1", field, index)

    def seal(self, field: str, value: str) -> SealedField:
        """The value sealed, with its blind index; (None, None) for '' (none given)."""
        if field not in FIELDS:
            raise ValueError(f"not a sealed holder field: {field}")
        if not value:
            return SealedField(None, None)
        index = self.index(field, value)
        return SealedField(gm.seal(self._seal_key, value.encode(), self._aad(field, index)), index)

    def open(self, field: str, sealed: bytes, index: bytes) -> str:
        try:
            return gm.unseal(self._seal_key, sealed, self._aad(field, index)).decode()
        except (gm.AuthenticationError, UnicodeDecodeError):
            raise HolderDataMismatch(f"the holder's {field} does not open under this data key") from None

    def opened(self, d: dict[str, Any]) -> dict[str, Any]:
        """An account as fc.account_json answers it (holder fields as stored:
        fc.holder_sealed_json), with holder_phone and holder_id_number in
        plaintext ('' when none) in place of the stored forms."""
        out = {k: v for k, v in d.items() if not k.startswith(("holder_phone", "holder_id_number"))}
        out.pop("holder_seal_key_id", None)
        for field in FIELDS:
            out[f"holder_{field}"] = self.open_stored(field, d, "holder_")
        return out

    def open_stored(self, field: str, d: dict[str, Any], prefix: str = "") -> str:
        """One field of a fc.holder_sealed_json object: opened, or the plaintext
        an upgrade left, or ''."""
        sealed, index = d.get(f"{prefix}{field}_sealed"), d.get(f"{prefix}{field}_index")
        if sealed and index:
            return self.open(field, base64.b64decode(sealed), base64.b64decode(index))
        plaintext = d.get(f"{prefix}{field}_plaintext")
        return str(plaintext) if plaintext else ""

    def params(self, phone: str, id_number: str) -> dict[str, bytes | str | None]:
        """The sealed-field parameters of fc.open_account and fc.seal_holder."""
        p = self.seal("phone", phone)
        i = self.seal("id_number", id_number)
        return {"phone_sealed": p.sealed, "phone_index": p.index, "id_number_sealed": i.sealed,
                "id_number_index": i.index, "seal_key_id": self.key_id}

    def lookup_params(self, phone: str = "", id_number: str = "") -> dict[str, bytes | None]:
        """The parameters of fc.holder_accounts for a phone and/or an ID number."""
        return {"phone_index": self.index("phone", phone) if phone else None,
                "id_number_index": self.index("id_number", id_number) if id_number else None}

    def opened_export(self, d: dict[str, Any]) -> dict[str, Any]:
        """fc.holder_export's answer with the holder's data opened."""
        return {**d, "account": self.opened(d["account"])}


def seal_plaintext(database_url: str, seal: HolderSeal, batch: int = SEAL_BATCH) -> int:
    """Seal every holder row an upgrade left in plaintext, `batch` rows per
    transaction (a large table is not locked at once, and a stop loses at most
    one batch of work, redone next time); the number of rows sealed."""
    total = 0
    with one_shot(database_url, autocommit=True) as conn:
        while True:
            with conn.transaction():
                rows = conn.execute(HOLDERS_TO_SEAL_SQL, (batch,)).fetchall()
                for account_id, phone, id_number in rows:
                    conn.execute(SEAL_HOLDER_SQL, {"account_id": account_id,
                                                   **seal.params(phone or "", id_number or "")})
            total += len(rows)
            if len(rows) < batch:
                break
    if total:
        log.info("sealed the personal data of %d holders", total)
    return total
