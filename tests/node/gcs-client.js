#!/usr/bin/env node
// Drives the official Node client (@google-cloud/storage) against the sidecar, for
// tests/test_clients.py. Configured the way the README tells an app to configure it:
// `apiEndpoint` = the sidecar, `useAuthWithCustomEndpoint: true`, and an auth client that
// carries the caller's ID token (an IdTokenClient, as `GoogleAuth#getIdTokenClient()` returns).
//
//   GCS_ID_TOKEN=... node gcs-client.js save     ENDPOINT BUCKET OBJECT SRC_FILE MODE
//     MODE: default (no `resumable` option), simple (`resumable: false`), resumable
//     (`resumable: true`) or resumable-interceptor (same, plus the workaround below)
//   GCS_ID_TOKEN=... node gcs-client.js download ENDPOINT BUCKET OBJECT DEST_FILE
//
// Prints one JSON line: {"ok": true, ...} or {"ok": false, "code": HTTP_STATUS, "message": ...};
// exits 0 on success and 1 on a failure reported that way.
'use strict';

const fs = require('node:fs');
const {Storage} = require('@google-cloud/storage');
const {IdTokenClient} = require('google-auth-library');

function storageFor(endpoint, authClient) {
  return new Storage({
    projectId: 'node-client-test',
    apiEndpoint: endpoint,
    useAuthWithCustomEndpoint: true,
    authClient,
    retryOptions: {autoRetry: false},
  });
}

// @google-cloud/storage 7.x drops `useAuthWithCustomEndpoint` on the way to the resumable
// upload of `file.save()` / `createWriteStream()` (`File#startResumableUpload_`), which then
// sends no Authorization header at all. Request interceptors do reach those requests; this
// is the README's work-around, verbatim.
async function addAuthorizationInterceptor(storage, authClient) {
  const {Authorization: authorization} = await authClient.getRequestHeaders();
  storage.interceptors.push({
    request: reqOpts => ({...reqOpts, headers: {...reqOpts.headers, Authorization: authorization}}),
  });
}

async function main(argv) {
  const [op, endpoint, bucketName, objectName, localPath, mode] = argv;
  const idToken = process.env.GCS_ID_TOKEN;
  if (!idToken || !objectName || !localPath) {
    throw new Error('usage: GCS_ID_TOKEN=... gcs-client.js save|download ENDPOINT BUCKET OBJECT FILE [MODE]');
  }
  // What `new GoogleAuth().getIdTokenClient(audience)` returns on Cloud Run, fed the test's token.
  const authClient = new IdTokenClient({
    targetAudience: 'unused-the-provider-returns-a-minted-token',
    idTokenProvider: {fetchIdToken: async () => idToken},
  });
  const storage = storageFor(endpoint, authClient);
  if (mode === 'resumable-interceptor') await addAuthorizationInterceptor(storage, authClient);
  const file = storage.bucket(bucketName).file(objectName);
  if (op === 'save') {
    const options = {contentType: 'application/octet-stream'};
    if (mode === 'simple') options.resumable = false;
    else if (mode !== 'default') options.resumable = true;
    await file.save(fs.readFileSync(localPath), options);
    return {ok: true, op, name: objectName};
  }
  if (op === 'download') {
    await file.download({destination: localPath});
    return {ok: true, op, name: objectName, size: fs.statSync(localPath).size};
  }
  throw new Error(`unknown operation ${op}`);
}

main(process.argv.slice(2)).then(
  result => {
    process.stdout.write(JSON.stringify(result) + '\n');
  },
  error => {
    const candidates = [error.code, error.status, error.response && error.response.status];
    const code = candidates.find(value => typeof value === 'number') ?? null;
    process.stdout.write(JSON.stringify({ok: false, code, message: String(error.message)}) + '\n');
    process.exitCode = 1;
  }
);
