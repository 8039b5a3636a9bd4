'use strict';
// The POS flow against a real server, as a terminal vendor would run it:
// sign-on, authorize, replays, confirm, cancel, a decline, a PIN set and
// used at the pump, and refused requests with their ErrorInfo decoded.
// Prints one JSON object, a key per step, and exits 0 (the caller judges
// the answers); exits 2 on a bad environment.
//
// Environment:
//   FUELCARD_TARGET         host:port of the server
//   FUELCARD_CA             the network CA (PEM)
//   FUELCARD_CERT, FUELCARD_KEY   this terminal's certificate and key (PEM)
//   FUELCARD_TERMINAL_ID, FUELCARD_STATION_ID   the certificate's CN and O
//   FUELCARD_CARD_NUMBER    a funded card without a PIN
//   FUELCARD_PIN_CARD_NUMBER  a funded card without a PIN yet; this script sets it
//   FUELCARD_PIN            the PIN to set on it (4-12 digits)
//   FUELCARD_REQUEST_PREFIX prefix of the request ids (default "node")

const crypto = require('node:crypto');
const { Terminal } = require('./terminal');

const NEEDED = ['FUELCARD_TARGET', 'FUELCARD_CA', 'FUELCARD_CERT', 'FUELCARD_KEY',
  'FUELCARD_TERMINAL_ID', 'FUELCARD_STATION_ID', 'FUELCARD_CARD_NUMBER',
  'FUELCARD_PIN_CARD_NUMBER', 'FUELCARD_PIN'];

const env = process.env;
const prefix = env.FUELCARD_REQUEST_PREFIX || 'node';
let seq = 0;
function requestId() {
  seq += 1;
  return `${prefix}-${crypto.randomBytes(6).toString('hex')}-${seq}`;
}

// A number with a valid Luhn check digit, so that it is well formed.
function withCheckDigit(digits) {
  let sum = 0;
  for (let i = 0; i < digits.length; i += 1) {
    let d = Number(digits[digits.length - 1 - i]);
    if (i % 2 === 0) d = d * 2 > 9 ? d * 2 - 9 : d * 2;
    sum += d;
  }
  return digits + String((10 - (sum % 10)) % 10);
}

// The parts of an answer a test asserts on.
function outcome(answer) {
  if (!answer.ok) return { ok: false, ...answer.error };
  const r = answer.response;
  const out = { ok: true };
  for (const k of ['decision', 'decline_reason', 'available_fen', 'balance_fen', 'points_earned']) {
    if (r[k] !== undefined) out[k] = r[k];
  }
  if (r.hold) {
    out.hold_id = r.hold.hold_id;
    out.state = r.hold.state;
    out.amount_fen = r.hold.amount_fen;
    out.settled_fen = r.hold.settled_fen;
  }
  if (r.balance) out.balance = { balance_fen: r.balance.balance_fen, available_fen: r.balance.available_fen };
  return out;
}

async function main() {
  const missing = NEEDED.filter((k) => !env[k]);
  if (missing.length) {
    process.stderr.write(`missing environment: ${missing.join(', ')}\n`);
    process.exitCode = 2;
    return;
  }
  const t = new Terminal({
    target: env.FUELCARD_TARGET, ca: env.FUELCARD_CA, cert: env.FUELCARD_CERT, key: env.FUELCARD_KEY,
    terminalId: env.FUELCARD_TERMINAL_ID, stationId: env.FUELCARD_STATION_ID,
  });
  const card = env.FUELCARD_CARD_NUMBER;
  const pinCard = env.FUELCARD_PIN_CARD_NUMBER;
  const pin = env.FUELCARD_PIN;
  const out = {};
  const authorizeRequest = (cardNumber, amount, extra = {}) => ({
    request_id: requestId(), card_number: cardNumber, amount_fen: String(amount),
    station_id: t.stationId, terminal_id: t.terminalId, nozzle: 2,
    product: 2, // PRODUCT_GASOLINE_95, by number as in the MAC
    ...extra,
  });
  try {
    const signOn = await t.signOn();
    out.sign_on = signOn.ok
      ? { ok: true, key_version: signOn.response.key_version, last_counter: signOn.response.last_counter,
        working_key_bytes: signOn.response.working_key.length }
      : outcome(signOn);
    if (!signOn.ok) return;

    // Authorize, then two resends: a new counter and MAC (the retry rule),
    // and the very same bytes (old counter): both get the first answer.
    const auth = authorizeRequest(card, 30000);
    const first = t.sign('Authorize', auth);
    out.authorize = { ...outcome(await t.authorize(first)), request_id: auth.request_id };
    out.replay_new_counter = outcome(await t.authorize(t.sign('Authorize', auth)));
    out.replay_same_bytes = outcome(await t.authorize(first));

    const holdId = out.authorize.hold_id;
    const confirm = { request_id: requestId(), hold_id: holdId, final_amount_fen: '28850',
      volume_ml: '35012', unit_price_fen: '824' };
    out.confirm = outcome(await t.confirm(t.sign('Confirm', confirm)));
    out.confirm_replay = outcome(await t.confirm(t.sign('Confirm', confirm)));
    out.confirm_again = outcome(await t.confirm(t.sign('Confirm', { ...confirm, request_id: requestId() })));
    out.get_hold = outcome(await t.getHold(holdId));

    // Authorize and cancel.
    const second = outcome(await t.authorize(t.sign('Authorize', authorizeRequest(card, 5000))));
    out.authorize_to_cancel = second;
    out.cancel = outcome(await t.cancel(t.sign('Cancel', { request_id: requestId(), hold_id: second.hold_id })));

    // A decline is an answer, not an error.
    out.decline = outcome(await t.authorize(t.sign('Authorize', authorizeRequest(card, 900000))));

    // PIN: set it at the terminal, then the pump asks for it.
    out.set_pin = outcome(await t.setCardPin(pinCard, pin));
    out.pin_missing = outcome(await t.authorize(t.sign('Authorize', authorizeRequest(pinCard, 1000))));
    const wrong = pin === '0000' ? '1111' : '0000';
    out.pin_wrong = outcome(await t.authorize(t.sign('Authorize', authorizeRequest(pinCard, 1000, {
      pin_block: t.pinBlock(wrong, pinCard) }))));
    out.pin_right = outcome(await t.authorize(t.sign('Authorize', authorizeRequest(pinCard, 1000, {
      pin_block: t.pinBlock(pin, pinCard) }))));
    if (out.pin_right.hold_id) {
      out.pin_cancel = outcome(await t.cancel(t.sign('Cancel', { request_id: requestId(),
        hold_id: out.pin_right.hold_id })));
    }

    // Refusals, decoded from grpc-status-details-bin.
    const used = t.counter; // accepted by the server (the last request above)
    const tampered = t.sign('Authorize', authorizeRequest(card, 1000));
    tampered.amount_fen = '1001'; // after the MAC was made
    out.mac_invalid = outcome(await t.authorize(tampered));
    out.counter_replayed = outcome(await t.authorize(t.sign('Authorize', authorizeRequest(card, 1000), used)));
    const unsigned = authorizeRequest(card, 1000);
    out.mac_missing = outcome(await t.authorize(unsigned));
    out.terminal_mismatch = outcome(await t.authorize(t.sign('Authorize',
      { ...authorizeRequest(card, 1000), station_id: `${t.stationId}-X` })));
    out.card_not_found = outcome(await t.getCardBalance(withCheckDigit('622202000000000000')));
    out.balance = outcome(await t.getCardBalance(card));
  } finally {
    t.close();
    process.stdout.write(`${JSON.stringify(out)}\n`);
  }
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exitCode = 1;
});
