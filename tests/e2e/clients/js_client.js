// Real @azure/identity releases asking for a token, run inside a sandbox pod by test_real_sdks.py.
//
//   node js_client.js CASES_JSON [TIMEOUT_SECONDS]
//
// CASES_JSON is a list of {id, sdk: "identity3" | "identity4", kind: "mi" | "dac" | "chain", by, value};
// the packages come from .sdk/node (scripts/setup-sdks: npm aliases of @azure/identity 3.4.x and 4.13.x).
// All cases run at once, each with fresh credential objects; every case prints one JSON line:
// {id, ok: true, appid, oid, mirid, elapsed} (the access token's claims, decoded without verification)
// or {id, ok: false, error_type, message, status, elapsed}. A case still unanswered after TIMEOUT_SECONDS
// (default 6) is reported as a Timeout, and the process exits without waiting for it.
//
// What each release puts on the wire to 169.254.169.254 (read from the pinned releases' source):
// - identity3 (3.4.2, its own IMDS code, dist/index.js imdsMsi): {clientId} -> client_id=, {resourceId}
//   -> msi_res_id=; no objectId option (it would be ignored). A ping first (no query, no Metadata
//   header, 1 s timeout, no retry); then the token request, retried on 404 only, 3 tries with waits of
//   0.8 s and 1.6 s, and 3.2 s more before it throws an AuthenticationError (which stops a chain):
//   5.7 s in all. A 400 is CredentialUnavailableError at once.
// - identity4 (4.13.1, through @azure/msal-node 5's Imds source): {clientId} -> client_id=,
//   {resourceId} -> msi_res_id=, {objectId} -> object_id=. No ping when used alone (only inside
//   DefaultAzureCredential); imdsRetryPolicy retries 404 and 410 5 times from 800 ms, doubling with
//   jitter (15 s measured); other statuses get core-rest-pipeline's default policy (429/503 with
//   Retry-After, 3 tries). A 400 fails at once (CredentialUnavailableError "Authentication failed").
// Keys are sent in lower case as above; values unchanged.
// kind "dac": identity4's DefaultAzureCredential with AZURE_TOKEN_CREDENTIALS=prod (environment, workload
// identity, managed identity: the first two unconfigured here, no AZURE_* variables).
// kind "chain": ChainedTokenCredential(ManagedIdentityCredential(...), <returns "sentinel">): the token is
// "sentinel" only if the managed identity credential let the chain move on.
"use strict";

const path = require("node:path");

// No SDK in a pod may find another way to authenticate, nor another endpoint, than IMDS's address.
for (const name of Object.keys(process.env)) {
  if (/^(AZURE_|IDENTITY_|MSI_|IMDS_)/.test(name)) delete process.env[name];
}

const SDK_DIR = process.env.NMI_SDK_NODE_DIR || path.resolve(__dirname, "..", "..", "..", ".sdk", "node");
const RESOURCE = "https://vault.azure.net";
const SCOPE = `${RESOURCE}/.default`;
const loaded = {};

function sdk(name) {
  if (!loaded[name]) loaded[name] = require(require.resolve(name, { paths: [SDK_DIR] }));
  return loaded[name];
}

function claims(token) {
  return JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString("utf8"));
}

function managedIdentity(identity, c) {
  return c.by ? new identity.ManagedIdentityCredential({ [c.by]: c.value }) : new identity.ManagedIdentityCredential();
}

async function tokenFor(c) {
  const identity = sdk(c.sdk);
  if (c.kind === "mi") return (await managedIdentity(identity, c).getToken(SCOPE)).token;
  if (c.kind === "chain") {
    const sentinel = { getToken: async () => ({ token: "sentinel", expiresOnTimestamp: Date.now() + 3600e3 }) };
    return (await new identity.ChainedTokenCredential(managedIdentity(identity, c), sentinel).getToken(SCOPE)).token;
  }
  if (c.kind === "dac") {
    process.env.AZURE_TOKEN_CREDENTIALS = "prod"; // read by the constructor only
    let credential;
    try {
      credential = new identity.DefaultAzureCredential();
    } finally {
      delete process.env.AZURE_TOKEN_CREDENTIALS;
    }
    return (await credential.getToken(SCOPE)).token;
  }
  throw new Error(`unknown kind ${c.kind}`);
}

function statusOf(err) {
  for (const source of [err, err && err.cause, err && err.cause && err.cause.cause]) {
    if (source && typeof source.statusCode === "number") return source.statusCode;
    if (source && typeof source.status === "number") return source.status;
  }
  return null;
}

async function runCase(c, timeoutMs) {
  const started = performance.now();
  const elapsed = () => Math.round(performance.now() - started) / 1000;
  let timer;
  const timeout = new Promise((resolve) => {
    timer = setTimeout(() => resolve("timeout"), timeoutMs);
  });
  let line;
  try {
    const token = await Promise.race([tokenFor(c), timeout]);
    if (token === "timeout") {
      line = { id: c.id, ok: false, error_type: "Timeout", message: `no answer within ${timeoutMs / 1000}s (still retrying?)`, status: null, elapsed: elapsed() };
    } else if (token === "sentinel") {
      line = { id: c.id, ok: true, sentinel: true, elapsed: elapsed() };
    } else {
      const payload = claims(token);
      line = { id: c.id, ok: true, appid: payload.appid, oid: payload.oid, mirid: payload.xms_mirid, elapsed: elapsed() };
    }
  } catch (err) {
    line = {
      id: c.id,
      ok: false,
      error_type: (err && err.name) || typeof err,
      message: String((err && err.message) || err).slice(0, 600),
      status: statusOf(err),
      elapsed: elapsed(),
    };
  } finally {
    clearTimeout(timer);
  }
  process.stdout.write(JSON.stringify(line) + "\n");
}

async function main() {
  const cases = JSON.parse(process.argv[2]);
  const timeoutMs = 1000 * Number(process.argv[3] || 6);
  for (const name of new Set(cases.map((c) => c.sdk))) sdk(name); // loading is not part of a case's time
  await Promise.all(cases.map((c) => runCase(c, timeoutMs)));
  // Cases that timed out may still be retrying: stop them with the process.
  process.stdout.write("", () => process.exit(0));
}

main().catch((err) => {
  process.stderr.write(`js_client: ${err && err.stack ? err.stack : err}\n`);
  process.exit(2);
});
