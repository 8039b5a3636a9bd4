'use strict';
// A POS terminal over gRPC with mutual TLS: sign-on, MAC'd Authorize /
// Confirm / Cancel, PIN blocks, and errors decoded from the
// grpc-status-details-bin trailer (google.rpc.Status with one ErrorInfo).
//
// Protos are loaded at run time from the repository's proto/ directory (the
// public contract) and, for google.rpc.Status / ErrorInfo, from the copies
// vendored under ./proto.
//
// The counter here lives in memory, which is enough for a test run. A real
// terminal must reserve each counter value in non-volatile storage before
// the request that carries it is sent (docs/TERMINAL_PROTOCOL.md, section 8).

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const p = require('./protocol');

const REPO_PROTO = path.join(__dirname, '..', '..', 'proto');
const VENDORED_PROTO = path.join(__dirname, 'proto');
const ERROR_INFO_URL = 'type.googleapis.com/google.rpc.ErrorInfo';
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));

function loadServices(protoDir) {
  const definition = protoLoader.loadSync(
    ['fuelcard/v1/transaction.proto', 'fuelcard/v1/security.proto'],
    // Field names as in the .proto, int64 as decimal strings (fen amounts
    // exceed 2^53 in principle), enums by name, defaults filled in.
    { includeDirs: [protoDir], keepCase: true, longs: String, enums: String, defaults: true },
  );
  return grpc.loadPackageDefinition(definition).fuelcard.v1;
}

function loadStatusTypes() {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => (path.isAbsolute(target) ? target : path.join(VENDORED_PROTO, target));
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
  return { Status: root.lookupType('google.rpc.Status'), ErrorInfo: root.lookupType('google.rpc.ErrorInfo') };
}

const statusTypes = loadStatusTypes();

// What a terminal decides on: the gRPC code and the ErrorInfo's reason.
function decodeError(err) {
  const out = { code: CODE_NAMES[err.code] || String(err.code), message: err.details, error_infos: 0 };
  const raw = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (raw.length === 0) return out;
  const status = statusTypes.Status.decode(Buffer.from(raw[0]));
  out.status_code = status.code;
  for (const any of status.details) {
    if (any.type_url === ERROR_INFO_URL || any.typeUrl === ERROR_INFO_URL) {
      const info = statusTypes.ErrorInfo.decode(any.value);
      out.error_infos += 1;
      out.reason = info.reason;
      out.domain = info.domain;
    }
  }
  return out;
}

class Terminal {
  constructor({ target, ca, cert, key, terminalId, stationId, protoDir = REPO_PROTO }) {
    const services = loadServices(protoDir);
    const credentials = grpc.credentials.createSsl(
      fs.readFileSync(ca), fs.readFileSync(key), fs.readFileSync(cert));
    this.transactions = new services.TransactionService(target, credentials);
    this.security = new services.SecurityService(target, credentials);
    this.terminalId = terminalId;
    this.stationId = stationId;
    this.counter = 0n;
    this.workingKey = null;
    this.keyVersion = null;
  }

  close() {
    this.transactions.close();
    this.security.close();
  }

  // Resolves {ok: true, response} or {ok: false, error: decodeError(...)}.
  call(client, method, request) {
    return new Promise((resolve) => {
      const deadline = new Date(Date.now() + 10_000);
      client[method](request, { deadline }, (err, response) => {
        resolve(err ? { ok: false, error: decodeError(err) } : { ok: true, response });
      });
    });
  }

  async signOn() {
    const answer = await this.call(this.security, 'SignOn', { terminal_id: this.terminalId });
    if (!answer.ok) return answer;
    const r = answer.response;
    this.workingKey = Buffer.from(r.working_key);
    this.keyVersion = r.key_version;
    const last = BigInt(r.last_counter);
    if (last > this.counter) this.counter = last;
    return answer;
  }

  nextCounter() {
    this.counter += 1n;
    return this.counter;
  }

  pinBlock(pin, cardNumber) {
    return p.encryptPinBlock(p.pinKey(this.workingKey, this.terminalId, this.keyVersion), pin, cardNumber);
  }

  // A copy of `request` carrying key_version, a counter (the next one unless
  // given) and its MAC.
  sign(rpc, request, counter = this.nextCounter()) {
    const signed = { ...request, key_version: this.keyVersion, terminal_counter: counter.toString() };
    delete signed.mac;
    const session = p.sessionKey(this.workingKey, this.terminalId, this.keyVersion, counter);
    signed.mac = p.mac(session, p.macInput(rpc, signed));
    return signed;
  }

  authorize(signed) {
    return this.call(this.transactions, 'Authorize', signed);
  }

  confirm(signed) {
    return this.call(this.transactions, 'Confirm', signed);
  }

  cancel(signed) {
    return this.call(this.transactions, 'Cancel', signed);
  }

  getHold(holdId) {
    return this.call(this.transactions, 'GetHold', { hold_id: holdId });
  }

  getCardBalance(cardNumber) {
    return this.call(this.transactions, 'GetCardBalance', { card_number: cardNumber });
  }

  setCardPin(cardNumber, newPin, oldPin) {
    const request = {
      card_number: cardNumber,
      key_version: this.keyVersion,
      new_pin_block: this.pinBlock(newPin, cardNumber),
    };
    if (oldPin) request.old_pin_block = this.pinBlock(oldPin, cardNumber);
    return this.call(this.security, 'SetCardPin', request);
  }
}

module.exports = { Terminal, decodeError };
