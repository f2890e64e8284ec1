#!/usr/bin/env node
// A second-language operator client of consents for the integration tests: @grpc/grpc-js over
// mutual TLS, the schema loaded at run time from protos/ with @grpc/proto-loader.
//
// Without --cursor it lists the operator's consents (ListConsents) and watches from the
// listing's watch_cursor; with --cursor it resumes the watch strictly after it. It reads
// WatchConsents until it has --events consent events (heartbeats skipped), cancels the stream,
// and prints one JSON object (and, on stderr, a line `listed` once the listing is done):
//   {"listed": [Consent, ...] (without --cursor), "events": [ConsentEvent, ...],
//    "cursor": the cursor of the last event}
//
// Usage: node grpc_js_consents.js --address HOST:PORT --ca CA.pem --cert CLIENT.pem
//          --key CLIENT.key --events N [--cursor C] [--protos DIR]

'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function options(argv) {
  const found = { protos: path.join(__dirname, '..', '..', 'protos'), cursor: '' };
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, '');
    if (!['address', 'ca', 'cert', 'key', 'events', 'cursor', 'protos'].includes(name)) {
      throw new Error(`unknown option ${argv[i]}`);
    }
    found[name] = argv[i + 1];
  }
  for (const name of ['address', 'ca', 'cert', 'key', 'events']) {
    if (!found[name]) {
      throw new Error(`missing --${name}`);
    }
  }
  return found;
}

function list(client) {
  return new Promise((resolve, reject) => {
    client.ListConsents({ page_size: 1000 }, { deadline: Date.now() + 10000 }, (error, page) =>
      error ? reject(error) : resolve(page),
    );
  });
}

// Reads the watch until `wanted` events arrived, then cancels it (a watch never ends by itself).
function watch(client, cursor, wanted) {
  return new Promise((resolve, reject) => {
    const events = [];
    const call = client.WatchConsents({ cursor }, { deadline: Date.now() + 20000 });
    call.on('data', (response) => {
      events.push(...response.events);
      if (events.length >= wanted) {
        call.cancel();
        resolve(events.slice(0, wanted));
      }
    });
    call.on('error', (error) => {
      if (error.code !== grpc.status.CANCELLED) {
        reject(error);
      }
    });
  });
}

async function main() {
  const opts = options(process.argv.slice(2));
  const definition = protoLoader.loadSync(['opconnect/numbers/v1/consents.proto'], {
    includeDirs: [opts.protos, path.join(__dirname, '..', '..', 'third_party', 'googleapis')],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
  });
  const v1 = grpc.loadPackageDefinition(definition).opconnect.numbers.v1;
  const credentials = grpc.credentials.createSsl(
    fs.readFileSync(opts.ca),
    fs.readFileSync(opts.key),
    fs.readFileSync(opts.cert),
  );
  const client = new v1.ConsentService(opts.address, credentials);
  try {
    const answer = {};
    let cursor = opts.cursor;
    if (!cursor) {
      const page = await list(client);
      answer.listed = page.consents;
      cursor = page.watch_cursor;
      process.stderr.write('listed\n'); // the test may now make the changes to watch
    }
    answer.events = await watch(client, cursor, Number(opts.events));
    answer.cursor = answer.events.length ? answer.events[answer.events.length - 1].cursor : cursor;
    process.stdout.write(JSON.stringify(answer) + '\n');
  } finally {
    client.close();
  }
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
