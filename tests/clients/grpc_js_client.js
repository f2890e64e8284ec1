#!/usr/bin/env node
// A second-language operator client for the integration tests: @grpc/grpc-js over mutual TLS,
// the schema loaded at run time from protos/ with @grpc/proto-loader (which bundles the
// google.protobuf well-known types).
//
// Uploads one number, gets it back, then asks for an invalid number, and prints one JSON object:
//   {"upload": UploadNumbersResponse, "get": GetNumberResponse,
//    "invalid": {"code", "codeName", "details", "statusDetailsBin" (base64 or null)}}
//
// Usage: node grpc_js_client.js --address HOST:PORT --ca CA.pem --cert CLIENT.pem --key CLIENT.key
//          --number +14255550100 --tenant GUID [--protos DIR]
// Every option can also come from the environment: OPCONNECT_ADDRESS, OPCONNECT_CA, ...

'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function options(argv) {
  const names = ['address', 'ca', 'cert', 'key', 'number', 'tenant', 'protos'];
  const found = {};
  for (const name of names) {
    found[name] = process.env[`OPCONNECT_${name.toUpperCase()}`];
  }
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, '');
    if (!names.includes(name) || i + 1 >= argv.length) {
      throw new Error(`unknown or incomplete option ${argv[i]}`);
    }
    found[name] = argv[i + 1];
  }
  found.protos = found.protos || path.join(__dirname, '..', '..', 'protos');
  for (const name of names) {
    if (!found[name]) {
      throw new Error(`missing --${name}`);
    }
  }
  return found;
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 10000 }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

function describeError(error) {
  const details = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  return {
    code: error.code,
    codeName: Object.keys(grpc.status).find((name) => grpc.status[name] === error.code),
    details: error.details,
    statusDetailsBin: details.length ? Buffer.from(details[0]).toString('base64') : null,
  };
}

async function main() {
  const opts = options(process.argv.slice(2));
  const definition = protoLoader.loadSync('opconnect/numbers/v1/numbers.proto', {
    includeDirs: [opts.protos],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const numbersV1 = grpc.loadPackageDefinition(definition).opconnect.numbers.v1;
  const credentials = grpc.credentials.createSsl(
    fs.readFileSync(opts.ca),
    fs.readFileSync(opts.key),
    fs.readFileSync(opts.cert),
  );
  const client = new numbersV1.NumberService(opts.address, credentials);
  try {
    const upload = await unary(client, 'UploadNumbers', {
      tenant_id: opts.tenant,
      numbers: [
        {
          phone_number: opts.number,
          usage: 'NUMBER_USAGE_USER',
          capabilities: { inbound: true, outbound: true },
        },
      ],
    });
    const get = await unary(client, 'GetNumber', { phone_number: opts.number });
    let invalid = null;
    try {
      await unary(client, 'GetNumber', { phone_number: 'not-a-number' });
    } catch (error) {
      invalid = describeError(error);
    }
    process.stdout.write(`${JSON.stringify({ upload, get, invalid })}\n`);
  } finally {
    client.close();
  }
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
