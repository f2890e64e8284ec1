#!/usr/bin/env node
// Watch an operator's number assignments from Node.js (@grpc/grpc-js), list-then-watch with
// resume: what opconnect_client's `watch_assignments` does in Python, in one file.
//
//   node examples/node/watch_assignments.js --address localhost:50051 --ca var/pki/ca.pem \
//     --cert var/pki/clients/operator-contoso-telecom.pem \
//     --key var/pki/clients/operator-contoso-telecom.key --checkpoint assignments.cursor
//
// Prints one JSON line per number listed ({"listing": true, ...}) and per event, in order.
// - First run (no cursor in the checkpoint file): ListNumbers page by page, then watch from the
//   listing's `watch_cursor`.
// - Every response's cursor is saved (atomically: a temporary file renamed over the checkpoint)
//   after its events are printed, so a restart resumes right after what was processed.
// - A broken stream is opened again from the saved cursor after a wait: the server's RetryInfo
//   when it sent one, else exponential backoff with jitter (0.5 s doubling to 30 s).
// - FAILED_PRECONDITION with reason CURSOR_EXPIRED (the cursor is older than the server keeps
//   changes): list again, then watch from the new cursor.
// - Any other error (bad certificate, bad request) is printed and the program exits with 1.
// The schema comes from protos/ (and google/rpc's error details from third_party/googleapis).

'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const ROOT = path.join(__dirname, '..', '..');
const RETRYABLE = new Set([
  grpc.status.UNAVAILABLE,
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.ABORTED,
  grpc.status.RESOURCE_EXHAUSTED, // only with a RetryInfo (see retryDelay)
]);

function options(argv) {
  const names = ['address', 'ca', 'cert', 'key', 'checkpoint'];
  const found = {};
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, '');
    if (!names.includes(name) || i + 1 >= argv.length) {
      throw new Error(`unknown or incomplete option ${argv[i]}`);
    }
    found[name] = argv[i + 1];
  }
  for (const name of names) {
    if (!found[name]) throw new Error(`missing --${name}`);
  }
  return found;
}

function load() {
  const definition = protoLoader.loadSync(
    'opconnect/numbers/v1/numbers.proto',
    {
      keepCase: true,
      longs: String,
      enums: String,
      defaults: false,
      oneofs: true,
      includeDirs: [path.join(ROOT, 'protos'), path.join(ROOT, 'third_party', 'googleapis')],
    },
  );
  return grpc.loadPackageDefinition(definition);
}

// --- the checkpoint: the last processed cursor, replaced atomically ------------------------------

function loadCursor(file) {
  try {
    return fs.readFileSync(file, 'utf8').trim();
  } catch (error) {
    if (error.code === 'ENOENT') return '';
    throw error;
  }
}

function saveCursor(file, cursor) {
  const temporary = `${file}.${process.pid}.tmp`;
  const fd = fs.openSync(temporary, 'w', 0o600);
  fs.writeSync(fd, `${cursor}\n`);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  fs.renameSync(temporary, file);
}

// --- the server's error details ------------------------------------------------------------------

function errorTypes() {
  // google.rpc.Status and its details, decoded with protobufjs (google/protobuf/*.proto come
  // with it).
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) => {
    const vendored = path.join(ROOT, 'third_party', 'googleapis', target);
    return fs.existsSync(vendored) ? vendored : protobuf.util.path.resolve(origin, target);
  };
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  return {
    Status: root.lookupType('google.rpc.Status'),
    ErrorInfo: root.lookupType('google.rpc.ErrorInfo'),
    RetryInfo: root.lookupType('google.rpc.RetryInfo'),
  };
}

function errorDetails(error, types) {
  // The reason (google.rpc.ErrorInfo) and retry delay (google.rpc.RetryInfo) the server sent in
  // the `grpc-status-details-bin` trailer.
  const found = { reason: '', retryMs: null };
  const raw = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (!raw.length) return found;
  for (const any of types.Status.decode(raw[0]).details || []) {
    const name = any.type_url.split('/').pop();
    if (name === 'google.rpc.ErrorInfo') found.reason = types.ErrorInfo.decode(any.value).reason;
    if (name === 'google.rpc.RetryInfo') {
      const delay = types.RetryInfo.decode(any.value).retry_delay || {};
      found.retryMs = Number(delay.seconds || 0) * 1000 + Number(delay.nanos || 0) / 1e6;
    }
  }
  return found;
}

// --- list-then-watch -----------------------------------------------------------------------------

function print(object) {
  process.stdout.write(`${JSON.stringify(object)}\n`);
}

function listAll(client) {
  // Every page of ListNumbers; resolves to the listing's watch cursor.
  return new Promise((resolve, reject) => {
    const page = (token) => {
      client.ListNumbers({ page_size: 1000, page_token: token }, { deadline: Date.now() + 30000 }, (error, response) => {
        if (error) return reject(error);
        for (const number of response.numbers || []) print({ listing: true, ...number });
        if (response.next_page_token) return page(response.next_page_token);
        return resolve(response.watch_cursor);
      });
    };
    page('');
  });
}

function watchOnce(client, cursor, file) {
  // One WatchAssignments call; resolves when it ends, rejects with its error.
  return new Promise((resolve, reject) => {
    const call = client.WatchAssignments({ cursor });
    call.on('data', (response) => {
      for (const event of response.events || []) print(event);
      if (response.cursor) saveCursor(file, response.cursor); // after the events are processed
    });
    call.on('error', reject);
    call.on('end', resolve);
  });
}

async function main() {
  const opts = options(process.argv.slice(2));
  const root = load();
  const types = errorTypes();
  const credentials = grpc.credentials.createSsl(
    fs.readFileSync(opts.ca),
    fs.readFileSync(opts.key),
    fs.readFileSync(opts.cert),
  );
  const client = new root.opconnect.numbers.v1.NumberService(opts.address, credentials);
  let attempt = 0;
  for (;;) {
    try {
      if (!loadCursor(opts.checkpoint)) saveCursor(opts.checkpoint, await listAll(client));
      await watchOnce(client, loadCursor(opts.checkpoint), opts.checkpoint);
      attempt = 0;
    } catch (error) {
      const found = errorDetails(error, types);
      if (error.code === grpc.status.FAILED_PRECONDITION && found.reason === 'CURSOR_EXPIRED') {
        saveCursor(opts.checkpoint, ''); // list again
        continue;
      }
      const retryable =
        RETRYABLE.has(error.code) && (error.code !== grpc.status.RESOURCE_EXHAUSTED || found.retryMs !== null);
      if (!retryable) {
        process.stderr.write(`watch_assignments: ${grpc.status[error.code]}: ${error.details}${found.reason ? ` (${found.reason})` : ''}\n`);
        process.exit(1);
      }
      const capMs = Math.min(30000, 500 * 2 ** attempt);
      attempt += 1;
      const waitMs = found.retryMs !== null ? found.retryMs * (1 + 0.2 * Math.random()) : capMs / 2 + (Math.random() * capMs) / 2;
      process.stderr.write(`watch_assignments: ${grpc.status[error.code]}; again in ${(waitMs / 1000).toFixed(1)} s\n`);
      await new Promise((resolve) => setTimeout(resolve, waitMs));
    }
  }
}

for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => process.exit(0));
main().catch((error) => {
  process.stderr.write(`watch_assignments: ${error.message}\n`);
  process.exit(1);
});
