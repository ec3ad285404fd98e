// Harness that runs the real cellgate binary for end-to-end tests.
//
//   const gw = await startGateway({ db: 'sqlite' });   // or 'postgres'
//   await gw.cli('instructors', 'add', 'a@x.edu', '--name', 'A');
//   ... gw.url, gw.metricsUrl, gw.logs() ...
//   await gw.stop();
//
// Every gateway gets its own temp dir, its own ports and (for postgres) its
// own freshly created database, so test files may run in parallel.

import { spawn, execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));

/** Path of the binary under test: $CELLGATE_BIN or <repo>/target/debug/cellgate. */
export const BIN = process.env.CELLGATE_BIN
  ? path.resolve(process.env.CELLGATE_BIN)
  : path.resolve(here, '../../../target/debug/cellgate');

/** Where test databases are created (the CELLGATE_E2E_PG* knobs). */
export const PG = {
  host: process.env.CELLGATE_E2E_PGHOST ?? '127.0.0.1',
  port: process.env.CELLGATE_E2E_PGPORT ?? '5432',
  user: process.env.CELLGATE_E2E_PGUSER ?? 'postgres',
  adminDb: process.env.CELLGATE_E2E_PGDATABASE ?? 'test',
};

const HEALTH_TIMEOUT_MS = 20_000;
const CLI_TIMEOUT_MS = 30_000;
const KILL_GRACE_MS = 5_000;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A free TCP port on 127.0.0.1 (bind to 0, read it, release it). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Random alphanumeric string of the given length (for the JWT secret). */
export function randomString(len) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';
  const bytes = randomBytes(len);
  let s = '';
  for (let i = 0; i < len; i++) s += alphabet[bytes[i] % alphabet.length];
  return s;
}

function run(file, args, { env, timeout = CLI_TIMEOUT_MS } = {}) {
  return new Promise((resolve) => {
    execFile(file, args, { env, timeout, maxBuffer: 16 * 1024 * 1024 }, (error, stdout, stderr) => {
      resolve({
        code: error ? (typeof error.code === 'number' ? error.code : -1) : 0,
        error,
        stdout: String(stdout),
        stderr: String(stderr),
      });
    });
  });
}

/** Run one SQL statement on the admin database; resolves to stdout, throws on failure. */
export async function psql(sql) {
  const r = await run('psql', [
    '-h', PG.host, '-p', String(PG.port), '-U', PG.user, '-d', PG.adminDb,
    '-v', 'ON_ERROR_STOP=1', '-X', '-q', '-c', sql,
  ], { env: { ...process.env, PGCONNECT_TIMEOUT: '5' } });
  if (r.code !== 0) {
    throw new Error(`psql failed (${r.code}) for ${sql}: ${r.stderr || r.error?.message}`);
  }
  return r.stdout;
}

/**
 * The process environment without the test knobs (CELLGATE_BIN,
 * CELLGATE_E2E_*, and the Rust tests' CELLGATE_TEST_*): the gateway refuses
 * CELLGATE_* variables it does not know.
 */
function harnessFreeEnv() {
  const env = { ...process.env };
  for (const key of Object.keys(env)) {
    if (key === 'CELLGATE_BIN' || key.startsWith('CELLGATE_E2E_') || key.startsWith('CELLGATE_TEST_')) {
      delete env[key];
    }
  }
  return env;
}

/**
 * Start a gateway.
 *
 * @param {object} opts
 * @param {'sqlite'|'postgres'} [opts.db]   which directory backend
 * @param {object} [opts.env]               extra/overriding env vars
 * @param {string} [opts.databaseUrl]       use this URL instead of creating a db
 *                                          (e.g. an unreachable one); no db is created/dropped
 * @param {boolean} [opts.migrate]          run `cellgate migrate` first (default true)
 * @param {string[]} [opts.serveArgs]       extra args after `serve`
 */
export async function startGateway({ db = 'sqlite', env = {}, databaseUrl, migrate = true, serveArgs = [] } = {}) {
  if (!existsSync(BIN)) {
    throw new Error(`cellgate binary not found at ${BIN} (build it, or set CELLGATE_BIN)`);
  }
  const dir = await mkdtemp(path.join(os.tmpdir(), 'cellgate-e2e-'));
  const port = await freePort();
  let metricsPort = await freePort();
  while (metricsPort === port) metricsPort = await freePort();

  let dbName = null;
  let dbUrl = databaseUrl;
  if (!dbUrl) {
    if (db === 'postgres') {
      dbName = `cellgate_e2e_${randomBytes(6).toString('hex')}`;
      await psql(`CREATE DATABASE ${dbName}`);
      dbUrl = `postgres://${PG.user}@${PG.host}:${PG.port}/${dbName}`;
    } else if (db === 'sqlite') {
      dbUrl = `sqlite://${dir}/dir.db?mode=rwc`;
    } else {
      throw new Error(`unknown db kind ${db}`);
    }
  }

  const secret = randomString(48);
  const gwEnv = {
    ...harnessFreeEnv(),
    CELLGATE_LISTEN_ADDR: `127.0.0.1:${port}`,
    CELLGATE_METRICS_ADDR: `127.0.0.1:${metricsPort}`,
    CELLGATE_DATA_DIR: dir,
    CELLGATE_DATABASE_URL: dbUrl,
    CELLGATE_JWT_SECRET: secret,
    RUST_LOG: 'info',
    NO_COLOR: '1',
    ...env,
  };

  const gw = {
    db,
    dir,
    port,
    metricsPort,
    dbName,
    databaseUrl: dbUrl,
    secret: gwEnv.CELLGATE_JWT_SECRET,
    env: gwEnv,
    url: `http://127.0.0.1:${port}`,
    metricsUrl: `http://127.0.0.1:${metricsPort}`,
    /** every token handed out or crafted in this gateway's tests (for the log scan) */
    tokens: new Set(),
    /** open client sockets, closed by stop() */
    sockets: new Set(),
    proc: null,
    exit: null,
    _out: [],
    _stopped: false,
  };

  const cleanupResources = async () => {
    await rm(dir, { recursive: true, force: true }).catch(() => {});
    if (dbName) await psql(`DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`).catch(() => {});
  };

  /** Run the binary with the gateway's env; resolves to trimmed stdout, throws with stderr. */
  gw.cli = async (...args) => {
    const r = await run(BIN, args, { env: gwEnv });
    if (r.code !== 0) {
      throw new Error(`cellgate ${args.join(' ')} exited ${r.code}${r.error?.killed ? ' (killed: timeout)' : ''}\n` +
        `stderr:\n${r.stderr}\nstdout:\n${r.stdout}`);
    }
    const out = r.stdout.trim();
    if (args[0] === 'token' && out) gw.tokens.add(out);
    return out;
  };
  /** Like cli() but returns { code, stdout, stderr } instead of throwing. */
  gw.cliRaw = (...args) => run(BIN, args, { env: gwEnv });

  /** Everything the `serve` process wrote to stdout and stderr so far. */
  gw.logs = () => gw._out.map((b) => b.toString('utf8')).join('');

  gw.stop = async () => {
    if (gw._stopped) return;
    gw._stopped = true;
    for (const s of gw.sockets) {
      try { s.disconnect(); } catch { /* ignore */ }
    }
    gw.sockets.clear();
    const p = gw.proc;
    if (p && gw.exit === null) {
      const exited = new Promise((r) => p.once('exit', r));
      p.kill('SIGTERM');
      const t = setTimeout(() => { if (gw.exit === null) p.kill('SIGKILL'); }, KILL_GRACE_MS);
      await exited;
      clearTimeout(t);
    }
    await cleanupResources();
  };

  try {
    if (migrate) await gw.cli('migrate');

    const proc = spawn(BIN, ['serve', ...serveArgs], { env: gwEnv, stdio: ['ignore', 'pipe', 'pipe'] });
    gw.proc = proc;
    proc.stdout.on('data', (b) => gw._out.push(b));
    proc.stderr.on('data', (b) => gw._out.push(b));
    proc.on('exit', (code, signal) => { gw.exit = { code, signal }; });
    proc.on('error', (e) => { gw.exit = { code: -1, signal: null, error: e }; });

    const deadline = Date.now() + HEALTH_TIMEOUT_MS;
    let lastErr = 'no answer';
    for (;;) {
      if (gw.exit) {
        throw new Error(`cellgate serve exited early (${JSON.stringify(gw.exit)}) before /healthz answered.\n` +
          `output:\n${gw.logs()}`);
      }
      try {
        const res = await fetch(`${gw.url}/healthz`, { signal: AbortSignal.timeout(1000) });
        await res.arrayBuffer();
        if (res.status === 200) break;
        lastErr = `status ${res.status}`;
      } catch (e) {
        lastErr = e.cause?.code ?? e.message;
      }
      if (Date.now() > deadline) {
        throw new Error(`cellgate serve did not answer 200 on /healthz within ${HEALTH_TIMEOUT_MS} ms ` +
          `(last: ${lastErr}).\noutput:\n${gw.logs()}`);
      }
      await sleep(100);
    }
  } catch (e) {
    await gw.stop().catch(() => {});
    throw e;
  }
  return gw;
}

/** The backends to run directory-dependent tests against ($CELLGATE_E2E_DBS="sqlite,postgres"). */
export const DBS = (process.env.CELLGATE_E2E_DBS ?? 'sqlite,postgres')
  .split(',').map((s) => s.trim()).filter(Boolean);
