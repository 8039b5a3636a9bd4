'use strict';
// Checks every known-answer vector of docs/TERMINAL_PROTOCOL.md with
// protocol.js (sm-crypto underneath). Prints one JSON object:
//   {"ok": bool, "checked": [names...], "failures": [{"name", "key", "expected", "actual"}]}
// and exits 1 if any vector fails or none was found.
// Usage: node vectors.js [path/to/TERMINAL_PROTOCOL.md]

const fs = require('node:fs');
const path = require('node:path');
const p = require('./protocol');

function parseValue(key, raw) {
  if (key.endsWith('_hex')) return Buffer.from(raw, 'hex');
  if (raw.startsWith('"')) return JSON.parse(raw);
  if (!/^-?[0-9]+$/.test(raw)) throw new Error(`${key}: not an integer: ${raw}`);
  return BigInt(raw);
}

function parseVectors(doc) {
  const vectors = new Map();
  const re = /^```vector\n([\s\S]*?)^```$/gm;
  for (const m of doc.matchAll(re)) {
    const v = {};
    for (const line of m[1].split('\n')) {
      if (!line) continue;
      const at = line.indexOf('=');
      if (at < 0) throw new Error(`not a key = value line: ${line}`);
      const key = line.slice(0, at).trim();
      v[key] = parseValue(key, line.slice(at + 1).trim());
    }
    const { name } = v;
    delete v.name;
    vectors.set(name, v);
  }
  return vectors;
}

// Integers arrive as bigint; the protocol module takes bigint or number.
function check(name, v, expect) {
  const int = (k) => v[k];
  if (name.startsWith('canonical/')) {
    const value = v.type === 'bytes' ? v.value_hex : v.value;
    expect('encoded_hex', p.canonical(value));
  } else if (name.startsWith('kdf/')) {
    expect('output_hex', p.kdf(v.z_hex, Number(v.length)));
  } else if (name.startsWith('session-key/')) {
    expect('info_hex', p.canonical('fuelcard', 'session/v1', v.terminal_id, int('key_version'),
      int('terminal_counter')));
    expect('session_key_hex', p.sessionKey(v.working_key_hex, v.terminal_id, int('key_version'),
      int('terminal_counter')));
  } else if (name === 'pin-key') {
    expect('info_hex', p.canonical('fuelcard', 'pin/v1', v.terminal_id, int('key_version')));
    expect('pin_key_hex', p.pinKey(v.working_key_hex, v.terminal_id, int('key_version')));
  } else if (name === 'pin-block') {
    expect('clear_block_hex', p.clearPinBlock(v.pin, v.card_number));
    expect('pin_block_hex', p.encryptPinBlock(v.pin_key_hex, v.pin, v.card_number));
  } else if (name.startsWith('mac/')) {
    const request = {};
    for (const [k, value] of Object.entries(v)) request[k.replace(/_hex$/, '')] = value;
    const input = p.macInput(v.rpc, request);
    expect('mac_input_hex', input);
    const session = p.sessionKey(v.working_key_hex, v.terminal_id || 'KM-001-T1', int('key_version'),
      int('terminal_counter'));
    expect('session_key_hex', session);
    expect('mac_hex', p.mac(session, input));
  } else {
    throw new Error(`unknown vector kind: ${name}`);
  }
}

function main() {
  const docPath = process.argv[2] || path.join(__dirname, '..', '..', 'docs', 'TERMINAL_PROTOCOL.md');
  const vectors = parseVectors(fs.readFileSync(docPath, 'utf8'));
  const checked = [];
  const failures = [];
  for (const [name, v] of vectors) {
    check(name, v, (key, actual) => {
      const expected = v[key];
      if (!Buffer.isBuffer(expected)) throw new Error(`${name}: ${key} is not bytes`);
      if (!expected.equals(actual)) {
        failures.push({ name, key, expected: expected.toString('hex'), actual: actual.toString('hex') });
      }
    });
    checked.push(name);
  }
  const ok = checked.length > 0 && failures.length === 0;
  process.stdout.write(`${JSON.stringify({ ok, checked, failures })}\n`);
  process.exitCode = ok ? 0 : 1;
}

if (require.main === module) main();

module.exports = { parseVectors };
