"""Micro-benchmark of the national cryptography on the server's paths:
fuelcard_server.gm (OpenSSL SM3/SM4, GmSSL SM2) against the pure-Python
`gmssl` package, in µs per operation (best of several timed runs, one
thread, the GIL held as on the server's loop).

    .venv/bin/python -m fuelcard_loadtest.crypto_bench [--seconds 0.3]

Not a test: it asserts nothing beyond both sides computing the same values.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import secrets
import ssl
import sys
import time
from collections.abc import Callable, Sequence

import gmssl_pyx
from cryptography.hazmat.backends.openssl import backend
from fuelcard_server import gm, keys
from gmssl import sm2 as gmssl_sm2
from gmssl import sm3 as gmssl_sm3
from gmssl import sm4 as gmssl_sm4


def per_op_us(fn: Callable[[], object], seconds: float, repeats: int = 5) -> float:
    """Best-of-`repeats` µs per call, each run lasting about seconds/repeats."""
    n, t = 1, 0.0
    while True:  # calibrate: how many calls fill one run
        start = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - start
        if t >= seconds / repeats / 4:
            break
        n *= 4
    n = max(1, int(n * (seconds / repeats) / t))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def _gmssl_sm3(data: bytes) -> bytes:
    return bytes.fromhex(gmssl_sm3.sm3_hash(list(data)))


def _gmssl_hmac_sm3(key: bytes, data: bytes) -> bytes:
    """gmssl has no HMAC: RFC 2104 over its SM3, as an adapter would write it."""
    if len(key) > 64:
        key = _gmssl_sm3(key)
    key = key.ljust(64, b"\0")
    inner = _gmssl_sm3(bytes(k ^ 0x36 for k in key) + data)
    return _gmssl_sm3(bytes(k ^ 0x5C for k in key) + inner)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crypto_bench", description=__doc__)
    p.add_argument("--seconds", type=float, default=0.3, help="time per measurement (default 0.3)")
    args = p.parse_args(argv)
    s = args.seconds

    key16, data64, info = os.urandom(16), os.urandom(64), keys.canonical("fuelcard", "session/v1", "T1", 1, 7)
    block = os.urandom(16)
    msg = b'{"channel":"WECHAT","channel_txn_id":"4200001234","account":"A1","amount_fen":10000}'

    # Both sides agree before anything is timed.
    assert gm.hmac_sm3(key16, data64) == _gmssl_hmac_sm3(key16, data64)
    assert gm.sm3_kdf(key16, info, 16) == bytes.fromhex(gmssl_sm3.sm3_kdf((key16 + info).hex().encode(), 16))
    sm4_enc = gmssl_sm4.CryptSM4(padding_mode=-1)  # -1: no padding
    sm4_enc.set_key(key16, gmssl_sm4.SM4_ENCRYPT)
    assert gm.sm4_ecb_encrypt(key16, block, pad=False) == sm4_enc.crypt_ecb(block)
    while True:  # a key gmssl can use (see tests/test_gm.py: gmssl mangles keys starting "04")
        priv = gm.Sm2PrivateKey.generate()
        if not priv.public_key.to_hex().startswith("04"):
            break
    pub = priv.public_key
    ref = gmssl_sm2.CryptSM2(private_key=priv.to_hex(), public_key=pub.to_hex())
    sig = gm.sm2_sign(priv, msg)
    ref_sig = ref.sign_with_sm3(msg, secrets.token_hex(32))
    assert gm.sm2_verify(pub, msg, bytes.fromhex(ref_sig)) and ref.verify_with_sm3(sig.hex(), msg)

    rows: list[tuple[str, Callable[[], object], Callable[[], object] | None]] = [
        ("sm3, 64 B", lambda: gm.sm3(data64), lambda: _gmssl_sm3(data64)),
        ("hmac_sm3, 64 B", lambda: gm.hmac_sm3(key16, data64), lambda: _gmssl_hmac_sm3(key16, data64)),
        (
            "sm3_kdf, 16 B out",
            lambda: gm.sm3_kdf(key16, info, 16),
            lambda: gmssl_sm3.sm3_kdf((key16 + info).hex().encode(), 16),
        ),
        (
            "sm4 block encrypt (ECB)",
            lambda: gm.sm4_ecb_encrypt(key16, block, pad=False),
            lambda: sm4_enc.crypt_ecb(block),
        ),
        ("sm2 sign", lambda: gm.sm2_sign(priv, msg), lambda: ref.sign_with_sm3(msg, secrets.token_hex(32))),
        ("sm2 verify", lambda: gm.sm2_verify(pub, msg, sig), lambda: ref.verify_with_sm3(ref_sig, msg)),
    ]

    # The key hierarchy on the authorize path (ours only).
    class _Store:
        def __init__(self) -> None:
            self.rows: dict[tuple[str, int], keys.WrappedWorkingKey] = {}

        def get(self, terminal_id: str, version: int) -> keys.WrappedWorkingKey | None:
            return self.rows.get((terminal_id, version))

        def add(self, key: keys.WrappedWorkingKey) -> keys.WrappedWorkingKey:
            return self.rows.setdefault((key.terminal_id, key.version), key)

    now = dt.datetime.now(dt.UTC)
    wk = keys.WorkingKeys(keys.EnvKeyProvider({keys.ROOT_KEY_ENV: secrets.token_hex(32)}), _Store())
    working = wk.current("T1", now)
    request = keys.canonical("Authorize", "T1", working.version, 7, "9860****2345", 30_000, os.urandom(16))
    tag = keys.mac(keys.session_key(working, 7), request)
    pan = "9860123456789012345"
    pin_block = keys.encrypt_pin_block(keys.pin_key(working), b"123456", pan)
    sealed = gm.seal(key16, os.urandom(32))
    pepper = os.urandom(32)
    pin_hash = keys.hash_pin(b"123456", pepper=pepper)
    rows += [
        ("seal / unseal 32 B (SM4-GCM)", lambda: gm.unseal(key16, sealed), None),
        ("unwrap working key (store hit)", lambda: wk.accepted("T1", working.version, now), None),
        (
            "session key + MAC verify",
            lambda: keys.verify_mac(keys.session_key(working, 7), request, tag),
            None,
        ),
        ("PIN block decrypt", lambda: keys.decrypt_pin_block(keys.pin_key(working), pin_block, pan), None),
        ("PIN hash verify (scrypt 2^14)", lambda: keys.verify_pin(b"123456", pin_hash, pepper=pepper), None),
    ]

    print(
        f"# {platform.python_implementation()} {platform.python_version()}, {ssl.OPENSSL_VERSION} (hashlib),"
    )
    print(
        f"# cryptography's {backend.openssl_version_text()} (SM4), gmssl_pyx {gmssl_pyx.__version__} (SM2),"
    )
    print(f"# {os.cpu_count()} CPUs, µs per operation, best of 5 runs")
    print(f"{'operation':34} {'gm (C) µs':>11} {'gmssl (py) µs':>14} {'speed-up':>9}")
    for name, ours, theirs in rows:
        a = per_op_us(ours, s)
        if theirs is None:
            print(f"{name:34} {a:11.1f} {'-':>14} {'-':>9}")
            continue
        b = per_op_us(theirs, s if "sm2" not in name else max(s, 1.0), repeats=5 if "sm2" not in name else 3)
        print(f"{name:34} {a:11.1f} {b:14.1f} {b / a:8.0f}x")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
