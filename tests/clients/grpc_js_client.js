#!/usr/bin/env node
// A second-language operator client for the integration tests: @grpc/grpc-js over mutual TLS,
// the schema loaded at run time from protos/ with @grpc/proto-loader (which bundles the
// google.protobuf well-known types), and google/api/field_behavior.proto from
// third_party/googleapis/.
//
// Uploads one number, gets it back, asks for an invalid number, then reads its call records
// (StreamCallRecords from 2000-01-01, 2 a response, not following), submits its durations of two
// of them and a bad one (SubmitCallDurations, bidirectional), and prints one JSON object:
//   {"upload": UploadNumbersResponse, "get": GetNumberResponse,
//    "invalid": {"code", "codeName", "details", "statusDetailsBin" (base64 or null)},
//    "records": [StreamCallRecordsResponse, ...],
//    "submitted": [SubmitCallDurationsResponse, ...]}
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

function serverStream(client, method, request) {
  return new Promise((resolve, reject) => {
    const responses = [];
    const call = client[method](request, { deadline: Date.now() + 10000 });
    call.on('data', (response) => responses.push(response));
    call.on('error', reject);
    call.on('end', () => resolve(responses));
  });
}

// A bidirectional stream: writes each request, ends its side, and collects every response.
function bidiStream(client, method, requests) {
  return new Promise((resolve, reject) => {
    const responses = [];
    const call = client[method]({ deadline: Date.now() + 10000 });
    call.on('data', (response) => responses.push(response));
    call.on('error', reject);
    call.on('end', () => resolve(responses));
    for (const request of requests) {
      call.write(request);
    }
    call.end();
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
  const definition = protoLoader.loadSync(
    [
      'opconnect/numbers/v1/numbers.proto',
      'opconnect/records/v1/records.proto',
      'opconnect/usage/v1/usage.proto',
    ],
    {
    includeDirs: [opts.protos, path.join(__dirname, '..', '..', 'third_party', 'googleapis')],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
    },
  );
  const opconnect = grpc.loadPackageDefinition(definition).opconnect;
  const credentials = grpc.credentials.createSsl(
    fs.readFileSync(opts.ca),
    fs.readFileSync(opts.key),
    fs.readFileSync(opts.cert),
  );
  const client = new opconnect.numbers.v1.NumberService(opts.address, credentials);
  const recordsClient = new opconnect.records.v1.CallRecordService(opts.address, credentials);
  const usageClient = new opconnect.usage.v1.UsageService(opts.address, credentials);
  try {
    const upload = await unary(client, 'UploadNumbers', {
      tenant_id: opts.tenant,
      numbers: [
        {
          phone_number: opts.number,
          usage: 'NUMBER_USAGE_USER',
          capabilities: { inbound: true, outbound: true },
          allow_tenant_address_update: true,
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
    const records = await serverStream(recordsClient, 'StreamCallRecords', {
      start_time: { seconds: 946684800, nanos: 0 },
      follow: false,
      max_batch_size: 2,
    });
    // As the operator: our durations of the first two calls we were sent, then a batch with a
    // record the platform must reject (its caller is not E.164).
    const calls = records.flatMap((response) => response.records).slice(0, 2);
    const durations = calls.map((call, i) => ({
      record_id: `js-${i}-${call.call_id}`,
      call_id: call.call_id,
      tenant_id: call.tenant_id,
      caller: call.caller,
      callee: call.callee,
      direction: call.direction,
      start_time: call.answer_time,
      end_time: call.end_time,
      duration: call.duration,
    }));
    const rejected = { ...durations[0], record_id: 'js-bad', call_id: 'js-bad', caller: '12' };
    const submitted = await bidiStream(usageClient, 'SubmitCallDurations', [
      { batch_id: 'js-1', records: durations },
      { batch_id: 'js-2', records: [rejected] },
    ]);
    process.stdout.write(`${JSON.stringify({ upload, get, invalid, records, submitted })}\n`);
  } finally {
    client.close();
    recordsClient.close();
    usageClient.close();
  }
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
