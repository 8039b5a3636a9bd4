'use strict';
// The terminal side of the fuelcard protocol, written from
// docs/TERMINAL_PROTOCOL.md alone: canonical encoding E, the SM3 KDF of
// GB/T 32918.4, session and PIN keys, HMAC-SM3 MACs and the format-0 PIN
// block widened to 16 bytes. SM3 and SM4 come from the npm package
// sm-crypto, not from the server's crypto stack, so agreeing with the
// document's vectors shows that an independent implementation interoperates.

const { sm3, sm4 } = require('sm-crypto');

const TAG_TEXT = 0x73; // "s"
const TAG_INT = 0x69; // "i"
const TAG_BYTES = 0x62; // "b"
const COUNTER_MAX = (1n << 63n) - 1n;

// Typed fields for E: a JS string is text, a bigint or a safe integer is an
// integer, a Buffer/Uint8Array is bytes. A protobuf enum is given as its
// number, never its name.
function text(value) {
  return { tag: TAG_TEXT, raw: Buffer.from(value, 'utf8') };
}

function bitLength(v) {
  let n = 0;
  while (v > 0n) {
    v >>= 1n;
    n += 1;
  }
  return n;
}

// Two's-complement big-endian, floor(bits(|v|) / 8) + 1 bytes (section 3):
// 0 -> 00, 127 -> 7f, 128 -> 00 80, -1 -> ff.
function integerBytes(value) {
  const v = BigInt(value);
  const magnitude = v < 0n ? -v : v;
  const n = Math.floor(bitLength(magnitude) / 8) + 1;
  let u = v < 0n ? (1n << BigInt(8 * n)) + v : v;
  const out = Buffer.alloc(n);
  for (let i = n - 1; i >= 0; i -= 1) {
    out[i] = Number(u & 0xffn);
    u >>= 8n;
  }
  return out;
}

function integer(value) {
  return { tag: TAG_INT, raw: integerBytes(value) };
}

function bytes(value) {
  return { tag: TAG_BYTES, raw: Buffer.from(value || []) };
}

function field(part) {
  if (typeof part === 'string') return text(part);
  if (typeof part === 'bigint' || typeof part === 'number') {
    if (typeof part === 'number' && !Number.isSafeInteger(part)) {
      throw new TypeError('an integer field must be a safe integer or a bigint');
    }
    return integer(part);
  }
  if (part instanceof Uint8Array) return bytes(part);
  throw new TypeError(`E: unsupported field ${typeof part}`);
}

// E(part, part, ...): tag || 4-byte BE length || bytes, per field, concatenated.
function canonical(...parts) {
  const chunks = [];
  for (const part of parts) {
    const { tag, raw } = field(part);
    const head = Buffer.alloc(5);
    head[0] = tag;
    head.writeUInt32BE(raw.length, 1);
    chunks.push(head, raw);
  }
  return Buffer.concat(chunks);
}

function sm3Digest(data) {
  return Buffer.from(sm3(Array.from(data)), 'hex');
}

// The SM3 KDF of GB/T 32918.4 §5.4.3: SM3(Z || ct) for ct = 1, 2, ...
// (32-bit BE), concatenated and cut to klen bytes.
function kdf(z, klen) {
  const blocks = [];
  for (let ct = 1; ct <= Math.ceil(klen / 32); ct += 1) {
    const counter = Buffer.alloc(4);
    counter.writeUInt32BE(ct);
    blocks.push(sm3Digest(Buffer.concat([z, counter])));
  }
  return Buffer.concat(blocks).subarray(0, klen);
}

function checkCounter(counter) {
  const c = BigInt(counter);
  if (c < 1n || c > COUNTER_MAX) throw new RangeError('the counter is 1 .. 2^63-1');
  return c;
}

// KDF(working_key || E("fuelcard", "session/v1", terminal, version, counter), 16)
function sessionKey(workingKey, terminalId, keyVersion, counter) {
  const info = canonical('fuelcard', 'session/v1', terminalId, keyVersion, checkCounter(counter));
  return kdf(Buffer.concat([Buffer.from(workingKey), info]), 16);
}

// KDF(working_key || E("fuelcard", "pin/v1", terminal, version), 16)
function pinKey(workingKey, terminalId, keyVersion) {
  const info = canonical('fuelcard', 'pin/v1', terminalId, keyVersion);
  return kdf(Buffer.concat([Buffer.from(workingKey), info]), 16);
}

function hmacSm3(key, data) {
  return Buffer.from(sm3(Array.from(data), { key: Array.from(key) }), 'hex');
}

// The MAC input of each terminal request, in the document's field order.
function macInput(rpc, r) {
  switch (rpc) {
    case 'Authorize':
      return canonical('Authorize', r.request_id, r.card_number, BigInt(r.amount_fen), r.station_id,
        r.terminal_id, r.nozzle || 0, r.product || 0, r.key_version, BigInt(r.terminal_counter),
        Buffer.from(r.pin_block || []));
    case 'Confirm':
      return canonical('Confirm', r.request_id, r.hold_id, BigInt(r.final_amount_fen || 0),
        BigInt(r.volume_ml || 0), BigInt(r.unit_price_fen || 0), r.key_version,
        BigInt(r.terminal_counter));
    case 'Cancel':
      return canonical('Cancel', r.request_id, r.hold_id, r.key_version, BigInt(r.terminal_counter));
    case 'ReverseAuthorization':
      return canonical('ReverseAuthorization', r.request_id, r.original_request_id, r.key_version,
        BigInt(r.terminal_counter));
    default:
      throw new Error(`${rpc} carries no MAC`);
  }
}

function mac(sessionKeyBytes, input) {
  return hmacSm3(sessionKeyBytes, input);
}

function nibblesToBytes(nibbles) {
  const out = Buffer.alloc(nibbles.length / 2);
  for (let i = 0; i < out.length; i += 1) out[i] = (nibbles[2 * i] << 4) | nibbles[2 * i + 1];
  return out;
}

// ISO 9564-1 format 0 widened to 32 nibbles: (0, N, digits, F...) XOR
// (twenty 0s, the 12 rightmost card digits before the check digit).
function clearPinBlock(pin, cardNumber) {
  if (!/^[0-9]{4,12}$/.test(pin)) throw new Error('a PIN is 4 to 12 digits');
  if (!/^[0-9]{13,}$/.test(cardNumber)) throw new Error('the card number must be at least 13 digits');
  const pinField = [0, pin.length, ...Array.from(pin, (c) => c.charCodeAt(0) - 48)];
  while (pinField.length < 32) pinField.push(0xf);
  const pan = cardNumber.slice(-13, -1);
  const panField = [...new Array(20).fill(0), ...Array.from(pan, (c) => c.charCodeAt(0) - 48)];
  return nibblesToBytes(pinField.map((n, i) => n ^ panField[i]));
}

// SM4-ECB, one block, no padding.
function encryptPinBlock(pinKeyBytes, pin, cardNumber) {
  const clear = clearPinBlock(pin, cardNumber);
  const out = sm4.encrypt(Array.from(clear), Array.from(pinKeyBytes),
    { mode: 'ecb', padding: 'none', output: 'array' });
  return Buffer.from(out);
}

module.exports = {
  COUNTER_MAX,
  canonical,
  clearPinBlock,
  encryptPinBlock,
  hmacSm3,
  kdf,
  mac,
  macInput,
  pinKey,
  sessionKey,
  sm3Digest,
};
