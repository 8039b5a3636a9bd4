"""SM2 (GB/T 32918, SM3, signer id "1234567812345678") for adapters: signing
notifications to the core and checking the core's signed answers.

Signatures travel as raw r || s (64 bytes), the core's form; GmSSL (C, via
gmssl_pyx) speaks DER, converted here. Keys are hex as `gmssl` writes them:
private 64 hex digits, public X || Y 128 hex digits. The signing inputs use
the core's tagged encoding (funding.proto: a tag byte, a 4-byte length, the
value; "s" text, "i" minimal signed big-endian integers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gmssl_pyx


def canonical(*parts: str | int) -> bytes:
    out = bytearray()
    for part in parts:
        if isinstance(part, str):
            tag, raw = b"s", part.encode()
        else:
            tag, raw = b"i", part.to_bytes(part.bit_length() // 8 + 1, "big", signed=True)
        out += tag + len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def _der_int(v: int) -> bytes:
    body = v.to_bytes(v.bit_length() // 8 + 1, "big")
    return b"\x02" + bytes([len(body)]) + body


def raw_to_der(sig: bytes) -> bytes:
    body = _der_int(int.from_bytes(sig[:32], "big")) + _der_int(int.from_bytes(sig[32:], "big"))
    return b"\x30" + bytes([len(body)]) + body


def der_to_raw(der: bytes) -> bytes:
    if len(der) < 8 or der[0] != 0x30 or der[2] != 0x02:
        raise ValueError("not a DER SM2 signature")
    r_len = der[3]
    r = int.from_bytes(der[4:4 + r_len], "big")
    s_at = 4 + r_len
    if der[s_at] != 0x02:
        raise ValueError("not a DER SM2 signature")
    s = int.from_bytes(der[s_at + 2:s_at + 2 + der[s_at + 1]], "big")
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@dataclass(frozen=True)
class Sm2Signer:
    """An SM2 key pair that signs (raw r || s)."""

    secret: bytes = field(repr=False)
    public: bytes  # X || Y

    @classmethod
    def generate(cls) -> Sm2Signer:
        public, secret = gmssl_pyx.sm2_key_generate()
        return cls(secret, public)

    @property
    def public_hex(self) -> str:
        return self.public.hex()

    def sign(self, data: bytes) -> bytes:
        return der_to_raw(gmssl_pyx.sm2_sign(self.secret, self.public, data))


def sm2_verify(public: bytes, data: bytes, sig: bytes) -> bool:
    """Whether `sig` (raw r || s) signs `data` under `public` (X || Y)."""
    if len(sig) != 64 or len(public) != 64:
        return False
    try:
        return bool(gmssl_pyx.sm2_verify(public, data, raw_to_der(sig)))
    except (gmssl_pyx.GmsslInnerError, gmssl_pyx.InvalidValueError, ValueError):
        return False


def sorted_pairs(params: dict[str, str], *, exclude: tuple[str, ...]) -> bytes:
    """The "k1=v1&k2=v2" string most Chinese channels sign (Alipay, UnionPay,
    e-CNY acquirers): every non-empty parameter but the excluded ones, sorted
    by name, values as received (not URL-encoded), UTF-8."""
    return "&".join(f"{k}={params[k]}" for k in sorted(params)
                    if k not in exclude and params[k] != "").encode()
