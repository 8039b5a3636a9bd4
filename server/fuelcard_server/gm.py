"""National cryptography (国密): SM3, SM4 and SM2, backed by C.

One small module so that the rest of the server never names a crypto
library. Backends, chosen by measurement (loadtest/fuelcard_loadtest/crypto_bench.py):

- SM3 and HMAC-SM3: OpenSSL through `hashlib`/`hmac` (as the card blind
  index in cards.py), about 1-3 µs per call.
- SM4 (ECB, CBC, GCM): OpenSSL through `cryptography`, a few µs per call.
- SM2: GmSSL 3 (C) through `gmssl_pyx`, about 0.5 ms per sign or verify,
  against 25 ms for the pure-Python `gmssl`. The user-id hash Z and
  e = SM3(Z || M) (GB/T 32918.2) are computed here, so the same code path is
  checked against the standard's example.

Formats follow the pure-Python `gmssl` package, so adapters that use it
interoperate: keys as hex (private: 64 hex digits; public: X || Y, 128 hex
digits), signatures as raw r || s (64 bytes; `gmssl` hex-encodes them).
`sig_to_der`/`sig_from_der` convert for peers that use ASN.1 DER (OpenSSL,
Bouncy Castle, GmSSL).

Every function takes and returns bytes; nothing here logs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

import gmssl_pyx
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding as _padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SM3_DIGEST_SIZE = 32
SM4_KEY_SIZE = 16
SM4_BLOCK_SIZE = 16
GCM_NONCE_SIZE = 12
GCM_TAG_SIZE = 16
# The default signer id of GM/T 0009 (what `gmssl`, GmSSL and OpenSSL use).
DEFAULT_UID = b"1234567812345678"

__all__ = [
    "DEFAULT_UID",
    "SM3_DIGEST_SIZE",
    "SM4_BLOCK_SIZE",
    "SM4_KEY_SIZE",
    "AuthenticationError",
    "Sm2PrivateKey",
    "Sm2PublicKey",
    "hmac_sm3",
    "seal",
    "sig_from_der",
    "sig_to_der",
    "sm2_sign",
    "sm2_verify",
    "sm3",
    "sm3_kdf",
    "sm4_cbc_decrypt",
    "sm4_cbc_encrypt",
    "sm4_ecb_decrypt",
    "sm4_ecb_encrypt",
    "unseal",
]


class AuthenticationError(ValueError):
    """Sealed data is not authentic: wrong key, wrong associated data, or
    tampered with. Deliberately says nothing more."""


# --- SM3 (GB/T 32905) -------------------------------------------------------


def sm3(data: bytes) -> bytes:
    """The SM3 digest of `data` (32 bytes)."""
    return hashlib.new("sm3", data).digest()


def hmac_sm3(key: bytes, data: bytes) -> bytes:
    """HMAC (RFC 2104) with SM3: 32 bytes."""
    return hmac.digest(key, data, "sm3")


def sm3_kdf(key_material: bytes, info: bytes, length: int) -> bytes:
    """The SM3 key derivation function of GB/T 32918.3/.4 (counter mode):
    SM3(Z || ct=1) || SM3(Z || ct=2) || ..., ct a 32-bit big-endian counter,
    with Z = key_material || info, truncated to `length` bytes.

    With info=b"" this is exactly the standard's KDF(Z, klen). Z is a plain
    concatenation: give each use fixed-length key material, or an `info`
    that delimits itself (keys.py encodes it with length prefixes)."""
    if not 0 < length <= 0xFFFFFFFF * SM3_DIGEST_SIZE:
        raise ValueError("sm3_kdf: length out of range")
    z = key_material + info
    blocks = []
    for ct in range(1, -(-length // SM3_DIGEST_SIZE) + 1):
        blocks.append(hashlib.new("sm3", z + ct.to_bytes(4, "big")).digest())
    return b"".join(blocks)[:length]


# --- SM4 (GB/T 32907) -------------------------------------------------------


def _sm4(key: bytes) -> algorithms.SM4:
    if len(key) != SM4_KEY_SIZE:
        raise ValueError("an SM4 key is 16 bytes")
    return algorithms.SM4(key)


def _pad(data: bytes) -> bytes:
    padder = _padding.PKCS7(128).padder()
    return padder.update(data) + padder.finalize()


def _unpad(data: bytes) -> bytes:
    unpadder = _padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(data) + unpadder.finalize()
    except ValueError:
        raise ValueError("bad SM4 padding") from None


def _check_blocks(data: bytes) -> None:
    if len(data) % SM4_BLOCK_SIZE:
        raise ValueError("SM4 data must be a whole number of 16-byte blocks")


def sm4_ecb_encrypt(key: bytes, data: bytes, *, pad: bool = True) -> bytes:
    """SM4-ECB. pad=True: PKCS#7 (as `gmssl`'s CryptSM4.crypt_ecb); pad=False:
    `data` must be whole blocks (single-block uses: PIN blocks, key checks).
    ECB leaks equal blocks: use it for single random-looking blocks only."""
    if pad:
        data = _pad(data)
    _check_blocks(data)
    enc = Cipher(_sm4(key), modes.ECB()).encryptor()
    return enc.update(data) + enc.finalize()


def sm4_ecb_decrypt(key: bytes, data: bytes, *, pad: bool = True) -> bytes:
    _check_blocks(data)
    dec = Cipher(_sm4(key), modes.ECB()).decryptor()
    out = dec.update(data) + dec.finalize()
    return _unpad(out) if pad else out


def sm4_cbc_encrypt(key: bytes, iv: bytes, data: bytes, *, pad: bool = True) -> bytes:
    """SM4-CBC with a 16-byte IV (not prepended). pad=True: PKCS#7, as `gmssl`'s
    CryptSM4.crypt_cbc and GmSSL. Not authenticated: to store secrets use seal()."""
    if len(iv) != SM4_BLOCK_SIZE:
        raise ValueError("an SM4-CBC IV is 16 bytes")
    if pad:
        data = _pad(data)
    _check_blocks(data)
    enc = Cipher(_sm4(key), modes.CBC(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def sm4_cbc_decrypt(key: bytes, iv: bytes, data: bytes, *, pad: bool = True) -> bytes:
    if len(iv) != SM4_BLOCK_SIZE:
        raise ValueError("an SM4-CBC IV is 16 bytes")
    _check_blocks(data)
    dec = Cipher(_sm4(key), modes.CBC(iv)).decryptor()
    out = dec.update(data) + dec.finalize()
    return _unpad(out) if pad else out


# Sealed format, version 1: 0x01 || nonce (12) || SM4-GCM ciphertext || tag (16).
# The version byte is authenticated too (it is prepended to the associated data).
_SEAL_V1 = b"\x01"
_SEAL_OVERHEAD = 1 + GCM_NONCE_SIZE + GCM_TAG_SIZE


def seal(key: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """Authenticated encryption for stored secrets: SM4-GCM with a random
    96-bit nonce. `aad` (associated data) is authenticated, not stored: bind
    the context (owner, purpose, version) so a sealed value cannot be moved."""
    nonce = secrets.token_bytes(GCM_NONCE_SIZE)
    enc = Cipher(_sm4(key), modes.GCM(nonce)).encryptor()
    enc.authenticate_additional_data(_SEAL_V1 + aad)
    ct = enc.update(plaintext) + enc.finalize()
    return _SEAL_V1 + nonce + ct + enc.tag


def unseal(key: bytes, sealed: bytes, aad: bytes = b"") -> bytes:
    """The plaintext of seal(key, plaintext, aad); AuthenticationError if the
    key, the associated data or any byte of `sealed` differs."""
    if len(sealed) < _SEAL_OVERHEAD or sealed[:1] != _SEAL_V1:
        raise AuthenticationError("not a sealed value")
    nonce = sealed[1 : 1 + GCM_NONCE_SIZE]
    ct, tag = sealed[1 + GCM_NONCE_SIZE : -GCM_TAG_SIZE], sealed[-GCM_TAG_SIZE:]
    dec = Cipher(_sm4(key), modes.GCM(nonce, tag)).decryptor()
    dec.authenticate_additional_data(_SEAL_V1 + aad)
    try:
        return dec.update(ct) + dec.finalize()
    except InvalidTag:
        raise AuthenticationError("sealed value failed authentication") from None


# --- SM2 (GB/T 32918) -------------------------------------------------------

# The recommended curve of GB/T 32918.5.
_P = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF
_A = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC
_B = 0x28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93
_N = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123
_GX = 0x32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7
_GY = 0xBC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0


def _z_prefix(a: int, b: int, gx: int, gy: int) -> bytes:
    """a || b || xG || yG: the curve's part of Z."""
    return b"".join(v.to_bytes(32, "big") for v in (a, b, gx, gy))


_SM2_Z_PREFIX = _z_prefix(_A, _B, _GX, _GY)


def _z(point: bytes, uid: bytes, curve_prefix: bytes = _SM2_Z_PREFIX) -> bytes:
    """Z = SM3(ENTL || ID || a || b || xG || yG || xA || yA), GB/T 32918.2 §5.5."""
    if len(uid) >= 0x2000:
        raise ValueError("an SM2 user id is at most 8191 bytes")
    h = hashlib.new("sm3", (len(uid) * 8).to_bytes(2, "big"))
    h.update(uid)
    h.update(curve_prefix)
    h.update(point)
    return h.digest()


def _e(point: bytes, data: bytes, uid: bytes) -> bytes:
    """e = SM3(Z || M), the value the signature is computed over."""
    return hashlib.new("sm3", _z(point, uid) + data).digest()


def _on_curve(x: int, y: int) -> bool:
    return x < _P and y < _P and (y * y - (x * x * x + _A * x + _B)) % _P == 0


def _mul_g(d: int) -> bytes:
    """d·G as X || Y, in plain Python (Jacobian coordinates, a = -3). Used only
    to recover a public key when a private key is loaded (~1 ms, not
    constant-time: never on an attacker-driven path)."""
    p = _P

    def double(x: int, y: int, z: int) -> tuple[int, int, int]:
        if y == 0:
            return 0, 1, 0
        zz = z * z % p
        m = 3 * (x - zz) * (x + zz) % p
        yy = y * y % p
        s = 4 * x * yy % p
        x3 = (m * m - 2 * s) % p
        return x3, (m * (s - x3) - 8 * yy * yy) % p, 2 * y * z % p

    def add_affine(x1: int, y1: int, z1: int, x2: int, y2: int) -> tuple[int, int, int]:
        if z1 == 0:
            return x2, y2, 1
        zz = z1 * z1 % p
        u2 = x2 * zz % p
        s2 = y2 * zz * z1 % p
        h, r = (u2 - x1) % p, (s2 - y1) % p
        if h == 0:
            return double(x1, y1, z1) if r == 0 else (0, 1, 0)
        hh = h * h % p
        hhh = h * hh % p
        v = x1 * hh % p
        x3 = (r * r - hhh - 2 * v) % p
        return x3, (r * (v - x3) - y1 * hhh) % p, z1 * h % p

    x, y, z = 0, 1, 0
    for bit in bin(d)[2:]:
        x, y, z = double(x, y, z)
        if bit == "1":
            x, y, z = add_affine(x, y, z, _GX, _GY)
    zi = pow(z, -1, p)
    zi2 = zi * zi % p
    return (x * zi2 % p).to_bytes(32, "big") + (y * zi2 * zi % p).to_bytes(32, "big")


def _unhex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError("not hexadecimal") from None


# SubjectPublicKeyInfo of an SM2 key, up to the point: SEQUENCE { SEQUENCE {
# id-ecPublicKey, sm2p256v1 (1.2.156.10197.1.301) }, BIT STRING 04 || X || Y }.
_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a811ccf5501822d03420004")


@dataclass(frozen=True, slots=True)
class Sm2PublicKey:
    """A point on the SM2 curve, validated when made."""

    point: bytes  # X || Y, 64 bytes

    def __post_init__(self) -> None:
        if len(self.point) != 64:
            raise ValueError("an SM2 public key is 64 bytes (X || Y)")
        x, y = int.from_bytes(self.point[:32], "big"), int.from_bytes(self.point[32:], "big")
        if not _on_curve(x, y):
            raise ValueError("not a point on the SM2 curve")

    @classmethod
    def from_hex(cls, text: str) -> Sm2PublicKey:
        """128 hex digits (X || Y, `gmssl`'s form) or 130 (04 || X || Y)."""
        raw = _unhex(text)
        if len(raw) == 65 and raw[0] == 4:
            raw = raw[1:]
        return cls(raw)

    def to_hex(self) -> str:
        """X || Y, 128 lowercase hex digits: the form `gmssl.sm2.CryptSM2` takes."""
        return self.point.hex()

    @classmethod
    def from_pem(cls, pem: str) -> Sm2PublicKey:
        """A `-----BEGIN PUBLIC KEY-----` SM2 key (as `openssl pkey -pubout` writes)."""
        lines = [ln.strip() for ln in pem.strip().splitlines()]
        if (
            len(lines) < 3
            or lines[0] != "-----BEGIN PUBLIC KEY-----"
            or lines[-1] != "-----END PUBLIC KEY-----"
        ):
            raise ValueError("not a PEM public key")
        try:
            der = base64.b64decode("".join(lines[1:-1]), validate=True)
        except binascii.Error:
            raise ValueError("bad base64 in PEM public key") from None
        if len(der) != len(_SPKI_PREFIX) + 64 or not der.startswith(_SPKI_PREFIX):
            raise ValueError("not an uncompressed SM2 public key")
        return cls(der[len(_SPKI_PREFIX) :])

    def to_pem(self) -> str:
        b64 = base64.b64encode(_SPKI_PREFIX + self.point).decode()
        body = "\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
        return f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n"


@dataclass(frozen=True, slots=True)
class Sm2PrivateKey:
    """An SM2 private key d (1 <= d <= n-2) with its public key."""

    secret: bytes = field(repr=False)  # d, 32 bytes big-endian
    public_key: Sm2PublicKey

    def __post_init__(self) -> None:
        if len(self.secret) != 32 or not 1 <= int.from_bytes(self.secret, "big") <= _N - 2:
            raise ValueError("an SM2 private key is an integer in [1, n-2], 32 bytes")

    @classmethod
    def generate(cls) -> Sm2PrivateKey:
        public, secret = gmssl_pyx.sm2_key_generate()
        return cls(secret, Sm2PublicKey(public))

    @classmethod
    def from_hex(cls, text: str) -> Sm2PrivateKey:
        """64 hex digits (`gmssl`'s form); the public key is recomputed."""
        secret = _unhex(text)
        if len(secret) != 32 or not 1 <= int.from_bytes(secret, "big") <= _N - 2:
            raise ValueError("an SM2 private key is an integer in [1, n-2], 64 hex digits")
        return cls(secret, Sm2PublicKey(_mul_g(int.from_bytes(secret, "big"))))

    def to_hex(self) -> str:
        return self.secret.hex()


def _der_int(v: int) -> bytes:
    body = v.to_bytes(v.bit_length() // 8 + 1, "big")  # a leading 0 keeps it positive
    return b"\x02" + bytes([len(body)]) + body


def sig_to_der(sig: bytes) -> bytes:
    """Raw r || s (64 bytes) to ASN.1 DER SEQUENCE { INTEGER r, INTEGER s }."""
    if len(sig) != 64:
        raise ValueError("a raw SM2 signature is 64 bytes")
    body = _der_int(int.from_bytes(sig[:32], "big")) + _der_int(int.from_bytes(sig[32:], "big"))
    return b"\x30" + bytes([len(body)]) + body


def sig_from_der(der: bytes) -> bytes:
    """Strict DER SEQUENCE { INTEGER r, INTEGER s } to raw r || s (64 bytes);
    ValueError on anything else (non-minimal, negative, trailing bytes)."""

    def integer(buf: bytes) -> tuple[int, bytes]:
        if len(buf) < 3 or buf[0] != 0x02 or not 1 <= buf[1] <= 33 or len(buf) < 2 + buf[1]:
            raise ValueError("bad DER signature")
        body, rest = buf[2 : 2 + buf[1]], buf[2 + buf[1] :]
        if body[0] & 0x80 or (len(body) > 1 and body[0] == 0 and not body[1] & 0x80):
            raise ValueError("bad DER signature")
        v = int.from_bytes(body, "big")
        if v.bit_length() > 256:
            raise ValueError("bad DER signature")
        return v, rest

    if len(der) < 2 or der[0] != 0x30 or der[1] != len(der) - 2:
        raise ValueError("bad DER signature")
    r, rest = integer(der[2:])
    s, rest = integer(rest)
    if rest:
        raise ValueError("bad DER signature")
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _sign_e(key: Sm2PrivateKey, e: bytes) -> bytes:
    return sig_from_der(gmssl_pyx.sm2_sign_sm3_digest(key.secret, e))


def _verify_e(key: Sm2PublicKey, e: bytes, sig: bytes) -> bool:
    if len(sig) != 64:
        return False
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    if not (0 < r < _N and 0 < s < _N):
        return False
    try:
        return bool(gmssl_pyx.sm2_verify_sm3_digest(key.point, e, sig_to_der(sig)))
    except gmssl_pyx.GmsslInnerError:
        return False


def sm2_sign(key: Sm2PrivateKey, data: bytes, uid: bytes = DEFAULT_UID) -> bytes:
    """SM2 signature of `data` with signer id `uid` (over e = SM3(Z || data)),
    as raw r || s (64 bytes). Randomised: two calls give different values."""
    return _sign_e(key, _e(key.public_key.point, data, uid))


def sm2_verify(key: Sm2PublicKey, data: bytes, sig: bytes, uid: bytes = DEFAULT_UID) -> bool:
    """Whether `sig` (raw r || s) is a valid SM2 signature of `data` by `key`
    with signer id `uid`. Never raises for a malformed signature."""
    return _verify_e(key, _e(key.point, data, uid), sig)
