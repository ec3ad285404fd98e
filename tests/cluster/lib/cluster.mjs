// Harness for the cluster suite: several `cellgate serve` pods on one
// PostgreSQL database and one Redis, dashboards over this suite's own
// socket.io-client, a private redis-server for fault tests, and Redis
// inspection through redis-cli.
//
//   const c = await startCluster({ pods: 2 });      // shared Redis 127.0.0.1:6379
//   const { classroom, tokens } = await c.seed({ instructors: 3 });
//   const d = await dashboard(c.pods[0].url, tokens[0], { classroom });
//   ... c.pods[1].url, c.student(...), c.kill(i) ...
//   await c.stop();
//
// Pod processes come from tests/e2e/lib/gateway.mjs (free ports, logs,
// stop); the database is created here, one per cluster, and dropped by stop().

import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { io } from 'socket.io-client';

import { PG, freePort, psql, randomString, sleep, startGateway } from '../../e2e/lib/gateway.mjs';
import { Recorder, instructorClaims, signJwt, studentClaims } from '../../e2e/lib/helpers.mjs';

export { sleep, freePort };

/** The machine's shared Redis: never stopped, flushed or reconfigured here. */
export const SHARED_REDIS = 'redis://127.0.0.1:6379';

/** Short session TTL so that a crashed pod's sessions go quickly. */
export const SESSION_TTL_SECS = 6;

/** A short random suffix for database, classroom and node names. */
export const suffix = () => randomBytes(4).toString('hex');

function run(file, args, { timeout = 15_000, env = process.env } = {}) {
  return new Promise((resolve) => {
    execFile(file, args, { timeout, env, maxBuffer: 16 * 1024 * 1024 }, (error, stdout, stderr) => {
      resolve({
        code: error ? (typeof error.code === 'number' ? error.code : -1) : 0,
        stdout: String(stdout),
        stderr: String(stderr),
      });
    });
  });
}

// ------------------------------------------------------------- Redis ----

/** Runs one redis-cli command against `url`; resolves to trimmed stdout lines. */
export async function redisCli(url, ...args) {
  const { hostname, port } = new URL(url);
  const r = await run('redis-cli', ['-h', hostname, '-p', port || '6379', ...args.map(String)]);
  if (r.code !== 0) throw new Error(`redis-cli ${args.join(' ')}: ${r.stderr || r.stdout}`);
  return r.stdout.split('\n').map((l) => l.trim()).filter((l) => l.length > 0);
}

/**
 * A redis-server of this test's own, on a free port, without persistence:
 * the one a fault test may kill and start again (same port). `users` are
 * ACL rules (`name on >password ~* &* +@all`) it starts with every time.
 */
export async function startPrivateRedis({ users = [] } = {}) {
  const port = await freePort();
  const dir = await mkdtemp(path.join(os.tmpdir(), 'cellgate-redis-'));
  const url = `redis://127.0.0.1:${port}`;
  const r = { port, url, proc: null, log: [] };

  r.start = async () => {
    const proc = spawn('redis-server', [
      '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
      '--dir', dir, '--daemonize', 'no',
      ...users.flatMap((rule) => ['--user', ...rule.split(' ')]),
    ], { stdio: ['ignore', 'pipe', 'pipe'] });
    r.proc = proc;
    proc.stdout.on('data', (b) => r.log.push(b));
    proc.stderr.on('data', (b) => r.log.push(b));
    const deadline = Date.now() + 10_000;
    for (;;) {
      const pong = await run('redis-cli', ['-p', String(port), 'ping'], { timeout: 2000 });
      if (pong.stdout.trim() === 'PONG') return;
      if (proc.exitCode !== null || Date.now() > deadline) {
        throw new Error(`redis-server on ${port} did not start:\n${Buffer.concat(r.log)}`);
      }
      await sleep(50);
    }
  };
  /** Stops it abruptly (SIGKILL), as a crash or a lost node would. */
  r.kill = async () => {
    const p = r.proc;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    const exited = new Promise((res) => p.once('exit', res));
    p.kill('SIGKILL');
    await exited;
  };
  r.stop = async () => {
    await r.kill();
    await rm(dir, { recursive: true, force: true });
  };

  await r.start();
  return r;
}

// -------------------------------------------------------------- pods ----

/**
 * Starts `pods` gateways sharing one new PostgreSQL database, one JWT
 * secret and the Redis at `redisUrl`, under a Redis prefix of their own.
 * Pod i is named `pod-<letter>-<suffix>`; `perPod(i)` adds settings of pod
 * i's own.
 */
export async function startCluster({ pods = 2, redisUrl = SHARED_REDIS, env = {}, perPod = () => ({}) } = {}) {
  const id = suffix();
  const dbName = `cellgate_cluster_${id}`;
  await psql(`CREATE DATABASE ${dbName}`);
  const c = {
    id,
    dbName,
    redisUrl,
    databaseUrl: `postgres://${PG.user}@${PG.host}:${PG.port}/${dbName}`,
    secret: randomString(48),
    /** Redis keys and channels of this cluster's own: other clusters on
     * the shared Redis (other tests, other people's runs) never meet it. */
    prefix: `cg-test-${id}`,
    pods: [],
    sockets: new Set(),
  };
  /** The Redis key of `kind` (session, presence, seat, …) and `name`. */
  c.key = (kind, name) => `${c.prefix}:${kind}:${name}`;

  c.podEnv = (i) => ({
    CELLGATE_JWT_SECRET: c.secret,
    CELLGATE_REDIS_URL: redisUrl,
    CELLGATE_NODE_ID: podName(c, i),
    CELLGATE_DRAIN_SECS: '1',
    CELLGATE_SESSION_TTL_SECS: String(SESSION_TTL_SECS),
    CELLGATE_REDIS_PREFIX: c.prefix,
    // Every dashboard of these tests comes from 127.0.0.1 (through nginx
    // too), and 200 of them share 10 instructors: the per-address handshake
    // budget (a burst of 60) and the 20 dashboards an instructor may have on
    // a pod would refuse some. tests/e2e/limits.test.mjs covers both.
    CELLGATE_HANDSHAKES_PER_MINUTE: '0',
    CELLGATE_MAX_SOCKETS_PER_INSTRUCTOR: '1000',
    ...env,
    ...perPod(i),
  });
  /** Starts pod i (again, after a kill: the dead one's files are cleaned up first). */
  c.startPod = async (i, extraEnv = {}) => {
    await c.pods[i]?.stop();
    const gw = await startGateway({
      databaseUrl: c.databaseUrl,
      migrate: i === 0 && c.pods.length === 0,
      env: { ...c.podEnv(i), ...extraEnv },
    });
    gw.node = podName(c, i);
    c.pods[i] = gw;
    return gw;
  };

  c.stop = async () => {
    for (const s of c.sockets) s.disconnect();
    c.sockets.clear();
    await Promise.all(c.pods.filter(Boolean).map((gw) => gw.stop().catch(() => {})));
    await psql(`DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`).catch(() => {});
  };

  /** kill -9 of pod i: no drain, no goodbye to Redis. */
  c.kill = async (i) => {
    const gw = c.pods[i];
    const exited = new Promise((res) => gw.proc.once('exit', res));
    gw.proc.kill('SIGKILL');
    await exited;
  };

  /**
   * Creates a classroom of its own (unique id, so that tests on the shared
   * Redis never meet) staffed by `instructors` new instructors; returns
   * their tokens (signed with the cluster's secret) and ids.
   */
  c.seed = async ({ instructors = 2, seats = 200, name = 'room' } = {}) => {
    const classroom = `cls-${name}-${suffix()}`;
    const cli = c.pods[0].cli;
    await cli('classrooms', 'add', classroom, '--seats', String(seats));
    const people = [];
    for (let n = 0; n < instructors; n++) {
      const email = `i${n}-${classroom}@example.edu`;
      const nameOf = `Instructor ${String(n).padStart(2, '0')} ${classroom}`;
      await cli('instructors', 'add', email, '--name', nameOf);
      await cli('classrooms', 'staff', classroom, email);
      people.push({ email, name: nameOf, token: signJwt(instructorClaims(email), c.secret) });
    }
    return { classroom, people, tokens: people.map((p) => p.token) };
  };

  /** A student token for `classroom`, signed with the cluster's secret. */
  c.student = (student, classroom, seat) =>
    signJwt(studentClaims(student, classroom, seat === undefined ? {} : { seat }), c.secret);

  try {
    await c.startPod(0);
    await Promise.all(Array.from({ length: pods - 1 }, (_, k) => c.startPod(k + 1)));
  } catch (e) {
    await c.stop();
    throw e;
  }
  return c;
}

function podName(c, i) {
  return `pod-${String.fromCharCode(97 + i)}-${c.id}`;
}

// ---------------------------------------------------------- dashboards ----

/**
 * A dashboard on `url` (a pod or a load balancer), with this suite's
 * socket.io-client. Resolves once `connection_accepted` arrived and, with
 * `classroom`, once `join_classroom` answered ok.
 *
 * With `rejoin`, the dashboard joins `classroom` again after every
 * (re)connection, as a real dashboard does; `d.joins` records each join:
 * `{ at, node, snapshot }`.
 *
 * Options go to io() (transports, reconnection, withCredentials, …); the
 * default is the client's own (polling first, then upgrade), no reconnection.
 */
export function dashboard(url, token, { classroom, rejoin = false, tracker, ...opts } = {}) {
  const socket = io(url, {
    auth: { token },
    forceNew: true,
    reconnection: false,
    timeout: 20_000,
    ...opts,
  });
  tracker?.add(socket);
  const rec = new Recorder(socket);
  const d = { socket, rec, joins: [], accepted: [], errors: [], disconnects: [] };
  socket.on('connect_error', (err) => d.errors.push({ at: Date.now(), message: err.message }));
  socket.on('disconnect', (reason) => d.disconnects.push({ at: Date.now(), reason }));
  // Failed reconnection attempts are told to the manager, not the socket.
  d.reconnectErrors = [];
  socket.io.on('reconnect_error', (err) => d.reconnectErrors.push({ at: Date.now(), message: err.message,
    description: err.description?.message ?? err.description }));
  socket.on('connection_accepted', async (accepted) => {
    d.accepted.push({ at: Date.now(), ...accepted });
    if (!classroom) return;
    if (d.joins.length > 0 && !rejoin) return;
    try {
      const answer = await socket.timeout(20_000).emitWithAck('join_classroom', { classroom });
      if (answer?.ok) d.joins.push({ at: Date.now(), node: accepted.node, snapshot: answer.snapshot });
      else d.errors.push({ at: Date.now(), message: `join: ${JSON.stringify(answer)}` });
    } catch (e) {
      d.errors.push({ at: Date.now(), message: `join: ${e.message}` });
    }
  });
  d.ready = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(
      `dashboard on ${url} not ready within 30 s; errors: ${JSON.stringify(d.errors)}`)), 30_000);
    const check = () => {
      if (classroom ? d.joins.length > 0 : d.accepted.length > 0) {
        clearTimeout(timer);
        resolve(d);
      } else if (d.errors.length > 0 && !opts.reconnection) {
        clearTimeout(timer);
        reject(new Error(`dashboard on ${url}: ${JSON.stringify(d.errors)}`));
      } else {
        setTimeout(check, 20);
      }
    };
    check();
  });
  return d;
}

/** Connects `n` dashboards `n` at a time in batches of `batch`. */
export async function dashboards(n, make, { batch = 25 } = {}) {
  const out = [];
  for (let i = 0; i < n; i += batch) {
    const group = [];
    for (let k = i; k < Math.min(n, i + batch); k++) group.push(make(k));
    out.push(...(await Promise.all(group.map((d) => d.ready))));
  }
  return out;
}

// --------------------------------------------------------------- HTTP ----

/** POST /api/v1/events to `url`; resolves to { status, body, headers }. */
export async function post(url, token, body) {
  const res = await fetch(`${url}/api/v1/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(15_000),
  });
  const text = await res.text();
  let json;
  try { json = JSON.parse(text); } catch { json = undefined; }
  return { status: res.status, body: json, headers: res.headers };
}

/** GET `path` on `url`; resolves to { status, body, text }. */
export async function get(url, pathname, headers = {}) {
  const res = await fetch(`${url}${pathname}`, { headers, signal: AbortSignal.timeout(10_000) });
  const text = await res.text();
  let body;
  try { body = JSON.parse(text); } catch { body = undefined; }
  return { status: res.status, body, text };
}

/** The HTTP snapshot of `classroom` as `token` sees it on `url`. */
export async function snapshot(url, classroom, token) {
  const r = await get(url, `/api/v1/classrooms/${encodeURIComponent(classroom)}/snapshot`,
    { authorization: `Bearer ${token}` });
  if (r.status !== 200) throw new Error(`snapshot on ${url}: ${r.status} ${r.text}`);
  return r.body;
}
