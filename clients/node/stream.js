#!/usr/bin/env node
// rnnserve from Node.js: open a `Stream` session on a token model, send a text in chunks and print, after each
// chunk, the model's most likely next character.
//
//   npm ci && node stream.js --address localhost:8001 --model default --text 'X:1\nT:' --chunk 4
//
// Loads protos/rnnserve.proto at run time (@grpc/proto-loader); nothing is generated. Every call that belongs
// to the session carries the gRPC metadata `x-rnnserve-affinity: <key>`, a random key drawn once per session,
// exactly as the Python client does (service/client/sync.py), so a consistent-hash proxy in front of several
// replicas (deploy/components/haproxy or envoy) keeps the whole session on one replica. Output: one JSON line per chunk,
// {"seq", "steps", "top_id", "top", "logits"} (the last step's logits), then {"session_id", "steps"}.
"use strict";

const crypto = require("node:crypto");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.resolve(__dirname, "..", "..", "protos", "rnnserve.proto");
const AFFINITY_HEADER = "x-rnnserve-affinity";

function parseArgs(argv) {
  const args = { address: "localhost:8001", model: "default", version: 0, text: "X:1\nT:", chunk: 4, proto: PROTO };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "");
    if (!(key in args) || i + 1 >= argv.length) {
      throw new Error(`usage: node stream.js [--address H:P] [--model M] [--version N] [--text T] [--chunk N]`);
    }
    args[key] = typeof args[key] === "number" ? Number(argv[i + 1]) : argv[i + 1];
  }
  // Shell-friendly escapes in --text: \n and \t.
  args.text = args.text.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
  if (!Number.isInteger(args.chunk) || args.chunk < 1) throw new Error("--chunk must be a positive integer");
  return args;
}

function loadService(protoPath) {
  const definition = protoLoader.loadSync(protoPath, {
    keepCase: true,
    longs: String, // uint64/int64 fields as decimal strings: exact
    enums: String,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).rnnserve.v1.RecurrentService;
}

// A fresh routing key per session: 96 random bits, URL-safe base64 (a valid metadata value).
function affinityMetadata() {
  const md = new grpc.Metadata();
  md.set(AFFINITY_HEADER, crypto.randomBytes(12).toString("base64url"));
  return md;
}

function int64Tensor(name, ids) {
  const data = Buffer.alloc(8 * ids.length);
  ids.forEach((id, i) => data.writeBigInt64LE(BigInt(id), 8 * i));
  return { name, dtype: "DATA_TYPE_INT64", shape: [String(ids.length)], data };
}

function float32Rows(tensor) {
  if (tensor.dtype !== "DATA_TYPE_FLOAT32") throw new Error(`expected FLOAT32 output, got ${tensor.dtype}`);
  const shape = tensor.shape.map(Number);
  const width = shape[shape.length - 1];
  const values = [];
  for (let i = 0; i < tensor.data.length; i += 4) values.push(tensor.data.readFloatLE(i));
  const rows = [];
  for (let i = 0; i < values.length; i += width) rows.push(values.slice(i, i + width));
  return rows;
}

function argmax(xs) {
  let best = 0;
  for (let i = 1; i < xs.length; i++) if (xs[i] > xs[best]) best = i;
  return best;
}

function getModel(client, name, version) {
  return new Promise((resolve, reject) =>
    client.GetModel({ name, version: String(version) }, (err, info) => (err ? reject(err) : resolve(info))),
  );
}

// One bidi stream, lock-step: the opening message, then one chunk per request, one answer per request in order.
function streamSession(client, model, version, chunks, metadata) {
  return new Promise((resolve, reject) => {
    const call = client.Stream(metadata);
    const answers = [];
    let session = null;
    let next = 0;
    const sendNext = () => {
      if (next === chunks.length) {
        call.end(); // half-close: the session (keep=false) is closed with the stream
        return;
      }
      next += 1;
      call.write({ seq: String(next), inputs: [int64Tensor("tokens", chunks[next - 1])], last_only: true });
    };
    call.on("data", (response) => {
      if (session === null) {
        session = response.session;
      } else {
        answers.push(response);
      }
      sendNext();
    });
    call.on("error", reject);
    call.on("end", () => resolve({ session, answers }));
    call.write({ open: { model, version: String(version) } });
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const Service = loadService(args.proto);
  const client = new Service(args.address, grpc.credentials.createInsecure());
  try {
    const info = await getModel(client, args.model, args.version);
    const vocab = info.vocabulary;
    if (!vocab.length) throw new Error(`model ${args.model} has no vocabulary: this client streams text`);
    const ids = [...args.text].map((ch) => {
      const id = vocab.indexOf(ch);
      if (id < 0) throw new Error(`character ${JSON.stringify(ch)} is not in the vocabulary of ${args.model}`);
      return id;
    });
    const chunks = [];
    for (let i = 0; i < ids.length; i += args.chunk) chunks.push(ids.slice(i, i + args.chunk));
    const { session, answers } = await streamSession(client, args.model, Number(info.version), chunks, affinityMetadata());
    let steps = 0;
    answers.forEach((answer, i) => {
      const logits = answer.outputs.find((t) => t.name === "logits");
      const last = float32Rows(logits).pop();
      const top = argmax(last);
      steps += chunks[i].length;
      console.log(JSON.stringify({ seq: Number(answer.seq), steps, top_id: top, top: vocab[top], logits: last }));
    });
    console.log(JSON.stringify({ session_id: session.session_id, steps }));
  } finally {
    // Not client.close() (nor grpc.closeClient, which calls it): grpc-js also names the service's `Close` RPC
    // `close` on the client object.
    client.getChannel().close();
  }
}

main().catch((err) => {
  if (process.env.RNNSERVE_DEBUG) console.error(err.stack);
  console.error(`error: ${err.code !== undefined ? grpc.status[err.code] + ": " : ""}${err.details || err.message}`);
  process.exit(1);
});
