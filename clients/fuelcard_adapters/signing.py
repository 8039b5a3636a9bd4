"""SM2 (GB/T 32918, SM3, signer id "1234567812345678") for adapters: signing
notifications to the core and checking the core's signed answers; and the
channels' own signatures: RSA (SHA256withRSA, PKCS#1 v1.5: WeChat Pay's
WECHATPAY2-SHA256-RSA2048, Alipay's RSA2, UnionPay's signMethod 01) or SM2
with a channel key, and UnionPay's secure-key digest (signMethod 12, SM3).

Signatures travel as raw r || s (64 bytes), the core's form; GmSSL (C, via
gmssl_pyx) speaks DER, converted here. Keys are hex as `gmssl` writes them:
private 64 hex digits, public X || Y 128 hex digits. The signing inputs use
the core's tagged encoding (funding.proto: a tag byte, a 4-byte length, the
value; "s" text, "i" minimal signed big-endian integers).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import gmssl_pyx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from fuelcard_server import gm

# A channel's public key: SM2 as X || Y (64 bytes), or RSA.
ChannelKey = bytes | rsa.RSAPublicKey


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

    @functools.cached_property
    def _key(self) -> gm.Sm2PrivateKey:
        return gm.Sm2PrivateKey(self.secret, _public_key(self.public))

    def sign(self, data: bytes) -> bytes:
        # The server's SM2 (fuelcard_server.gm): Z of the key computed in
        # Python's SM3 and GmSSL signing the digest, ~4x faster than
        # gmssl_pyx.sm2_sign, which the notification service felt per call.
        return gm.sm2_sign(self._key, data)


@functools.lru_cache(maxsize=64)
def _public_key(public: bytes) -> gm.Sm2PublicKey:
    return gm.Sm2PublicKey(public)


def sm2_verify(public: bytes, data: bytes, sig: bytes) -> bool:
    """Whether `sig` (raw r || s) signs `data` under `public` (X || Y)."""
    if len(sig) != 64 or len(public) != 64:
        return False
    try:
        key = _public_key(public)
    except ValueError:
        return False
    return gm.sm2_verify(key, data, sig)


def sorted_pairs(params: dict[str, str], *, exclude: tuple[str, ...]) -> bytes:
    """The "k1=v1&k2=v2" string most Chinese channels sign (Alipay, UnionPay,
    e-CNY acquirers): every non-empty parameter but the excluded ones, sorted
    by name, values as received (not URL-encoded), UTF-8."""
    return "&".join(f"{k}={params[k]}" for k in sorted(params)
                    if k not in exclude and params[k] != "").encode()


def rsa_verify(key: rsa.RSAPublicKey, data: bytes, sig: bytes) -> bool:
    """SHA256withRSA (PKCS#1 v1.5), what WeChat Pay, Alipay (RSA2) and
    UnionPay (signMethod 01) sign with."""
    try:
        key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        return False
    return True


def channel_verify(key: ChannelKey, data: bytes, sig: bytes) -> bool:
    """`sig` over `data` under a channel key of either kind."""
    if isinstance(key, rsa.RSAPublicKey):
        return rsa_verify(key, data, sig)
    return sm2_verify(key, data, sig)


def load_channel_key(text: bytes) -> ChannelKey:
    """A channel's public key as operators receive it: a PEM certificate or
    public key (RSA), or SM2 X || Y in hex (128 digits, an optional 04 prefix).
    ValueError otherwise."""
    stripped = text.strip()
    key: object
    if stripped.startswith(b"-----BEGIN CERTIFICATE"):
        key = x509.load_pem_x509_certificate(stripped).public_key()
    elif stripped.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(stripped)
    else:
        raw = bytes.fromhex(stripped.decode("ascii"))
        if len(raw) == 65 and raw[0] == 4:
            raw = raw[1:]
        if len(raw) != 64:
            raise ValueError("an SM2 public key is 64 bytes (X || Y) in hex")
        return raw
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("a PEM channel key must be RSA (SM2 keys are given in hex)")
    return key


def sm3_hex(data: bytes) -> str:
    return bytes(gmssl_pyx.sm3_hash(data)).hex()


def secure_key_digest(data: bytes, secure_key: str) -> str:
    """UnionPay's signMethod 12: SM3(data + "&" + SM3(secure key)), lower-case
    hex (the secure key is shared with UnionPay, configured on both sides)."""
    return sm3_hex(data + b"&" + sm3_hex(secure_key.encode()).encode())
