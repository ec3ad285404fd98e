// TLS to the directory and to Redis, as managed services require it: a
// private certificate authority made with openssl, a private PostgreSQL
// that refuses clients without TLS, and a redis-server that listens on a
// TLS port only. A dashboard connects, joins and receives an event through
// both.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { BIN, freePort, startGateway, sleep } from './lib/gateway.mjs';
import { startPrivatePostgres } from './lib/private-postgres.mjs';
import {
  T, PEOPLE, seedDirectory, connectDashboard, close, ack, postEvents, studentToken, cellEvent,
  assertNoSecretsInLogs,
} from './lib/helpers.mjs';

const run = (file, args, opts = {}) => new Promise((resolve, reject) => {
  execFile(file, args, { timeout: 30_000, ...opts }, (error, stdout, stderr) => {
    if (error) reject(new Error(`${file} ${args.join(' ')}: ${stderr || error.message}`));
    else resolve({ stdout: String(stdout), stderr: String(stderr) });
  });
});

/** A CA and a server certificate for localhost / 127.0.0.1, signed by it. */
async function makeCertificates(dir) {
  const f = (name) => path.join(dir, name);
  await run('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1',
    '-keyout', f('ca.key'), '-out', f('ca.pem'), '-subj', '/CN=cellgate test CA']);
  await run('openssl', ['req', '-newkey', 'rsa:2048', '-nodes',
    '-keyout', f('server.key'), '-out', f('server.csr'), '-subj', '/CN=localhost']);
  await writeFile(f('san.ext'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\n');
  await run('openssl', ['x509', '-req', '-in', f('server.csr'), '-CA', f('ca.pem'), '-CAkey', f('ca.key'),
    '-CAcreateserial', '-days', '1', '-out', f('server.pem'), '-extfile', f('san.ext')]);
  return { ca: f('ca.pem'), cert: f('server.pem'), key: f('server.key') };
}

/** redis-server with TLS only (no plain-text port). */
async function startTlsRedis(certs) {
  const port = await freePort();
  const proc = spawn('redis-server', ['--port', '0', '--tls-port', String(port),
    '--tls-cert-file', certs.cert, '--tls-key-file', certs.key, '--tls-ca-cert-file', certs.ca,
    '--tls-auth-clients', 'no', '--save', '', '--appendonly', 'no',
    // 127.0.0.2 is not in the certificate: a URL naming it must be refused.
    '--bind', '127.0.0.1', '127.0.0.2'],
  { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  proc.stdout.on('data', (b) => { out += b; });
  for (let i = 0; i < 100 && !out.includes('Ready to accept connections'); i++) await sleep(50);
  if (!out.includes('Ready to accept connections')) throw new Error(`redis-server (TLS) did not start:\n${out}`);
  return { port, stop: () => proc.kill('SIGKILL') };
}

describe('TLS to PostgreSQL and Redis', { concurrency: false }, () => {
  let dir;
  let certs;
  let pg;
  let redis;

  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'cellgate-tls-'));
    certs = await makeCertificates(dir);
    pg = await startPrivatePostgres({ tls: certs });
    redis = await startTlsRedis(certs);
  });
  after(async () => {
    redis?.stop();
    await pg?.destroy();
    await rm(dir, { recursive: true, force: true });
  });

  const databaseUrl = (mode) =>
    `postgres://postgres@localhost:${pg.port}/cellgate?sslmode=${mode}&sslrootcert=${certs.ca}`;

  /** `cellgate serve` with verified TLS to the directory and
   * the Redis settings given; resolves to { code, stderr } when it exits. */
  const serveOnce = async (redisEnv) => run(BIN, ['serve'], {
    env: {
      PATH: process.env.PATH,
      CELLGATE_DATA_DIR: dir,
      CELLGATE_LISTEN_ADDR: `127.0.0.1:${await freePort()}`,
      CELLGATE_METRICS_ADDR: `127.0.0.1:${await freePort()}`,
      CELLGATE_DATABASE_URL: databaseUrl('verify-full'),
      CELLGATE_JWT_SECRET: 'a-secret-for-this-test-that-is-long-enough',
      NO_COLOR: '1',
      ...redisEnv,
    },
  }).then(() => ({ code: 0, stderr: '' }), (e) => ({ code: 1, stderr: e.message }));

  test('a dashboard gets in and receives events over verified TLS to both', { timeout: 60_000 }, async () => {
    const gw = await startGateway({
      databaseUrl: databaseUrl('verify-full'),
      env: {
        CELLGATE_REDIS_URL: `rediss://localhost:${redis.port}`,
        CELLGATE_REDIS_CA_FILE: certs.ca,
      },
    });
    try {
      const tokens = await seedDirectory(gw);
      const ready = await fetch(`${gw.url}/readyz`);
      assert.equal(ready.status, 200, await ready.text());
      const { socket, rec } = await connectDashboard(gw, { token: tokens.alice });
      const joined = await ack(socket, 'join_classroom', { classroom: 'cls-101' });
      assert.equal(joined.ok, true);
      const student = await studentToken(gw, 's-0009', 'cls-101', 9);
      const event = cellEvent({ classroom: 'cls-101', student: 's-0009', seat: 9 });
      const posted = await postEvents(gw, student, event);
      assert.equal(posted.status, 202, JSON.stringify(posted.body));
      await rec.waitFor('cell_executed', (e) => e.id === event.id);
      close(gw, socket);
      gw.tokens.add(student);
      for (const t of Object.values(tokens)) gw.tokens.add(t);
      assertNoSecretsInLogs(gw);
    } finally {
      await gw.stop();
    }
  });

  test('without the private CA, the gateway refuses to start and says why', T, async () => {
    const r = await serveOnce({ CELLGATE_REDIS_URL: `rediss://localhost:${redis.port}` });
    assert.notEqual(r.code, 0, 'serve must not start');
    assert.match(r.stderr, /Redis/);
    assert.match(r.stderr, /certificate is not trusted.*CELLGATE_REDIS_CA_FILE/);
  });

  test('a certificate issued for another host is refused, and trusting a CA is not the advice', T, async () => {
    const r = await serveOnce({
      CELLGATE_REDIS_URL: `rediss://127.0.0.2:${redis.port}`,
      CELLGATE_REDIS_CA_FILE: certs.ca,
    });
    assert.notEqual(r.code, 0, 'serve must not start');
    assert.match(r.stderr, /not issued for the host in CELLGATE_REDIS_URL/);
    assert.doesNotMatch(r.stderr, /CELLGATE_REDIS_CA_FILE/);
  });

  test('a plain-text database connection is refused by the server, so TLS was in use', T, async () => {
    const r = await run(BIN, ['migrate'], {
      env: {
        PATH: process.env.PATH,
        CELLGATE_DATA_DIR: dir,
        CELLGATE_DATABASE_URL: databaseUrl('disable'),
        CELLGATE_JWT_SECRET: 'a-secret-for-this-test-that-is-long-enough',
        NO_COLOR: '1',
      },
    }).then(() => ({ code: 0, stderr: '' }), (e) => ({ code: 1, stderr: e.message }));
    assert.notEqual(r.code, 0, 'a connection without TLS must fail');
    assert.match(r.stderr, /no encryption|hostnossl|pg_hba/);
  });
});
