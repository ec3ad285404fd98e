// Client-side helpers: JWT crafting, dashboards over the real socket.io-client,
// HTTP ingest, Prometheus scraping, and the shared directory fixture.

import { createHmac, randomUUID } from 'node:crypto';
import http from 'node:http';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import { sleep } from './gateway.mjs';

export { sleep };

// ---------------------------------------------------------------- JWT ----

const b64url = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
const HMAC = { HS256: 'sha256', HS384: 'sha384', HS512: 'sha512' };

/**
 * Sign a JWT by hand. `alg: 'none'` yields an unsigned token ("h.p.").
 * `header` is merged into the JOSE header.
 */
export function signJwt(payload, secret, { alg = 'HS256', header = {} } = {}) {
  const data = `${b64url({ alg, typ: 'JWT', ...header })}.${b64url(payload)}`;
  if (alg === 'none') return `${data}.`;
  const h = HMAC[alg];
  if (!h) throw new Error(`signJwt: unsupported alg ${alg}`);
  return `${data}.${createHmac(h, secret).update(data).digest('base64url')}`;
}

export const now = () => Math.floor(Date.now() / 1000);

/** Instructor claims, valid for an hour unless overridden (undefined deletes a claim). */
export function instructorClaims(email, overrides = {}) {
  return clean({ sub: email, role: 'instructor', iat: now(), exp: now() + 3600, ...overrides });
}

/** Student claims, valid for an hour unless overridden (undefined deletes a claim). */
export function studentClaims(student, classroom, overrides = {}) {
  return clean({ sub: student, role: 'student', classroom, iat: now(), exp: now() + 3600, ...overrides });
}

function clean(o) {
  for (const k of Object.keys(o)) if (o[k] === undefined) delete o[k];
  return o;
}

/** Sign with the gateway's secret and remember the token for the log scan. */
export function craft(gw, payload, opts) {
  const t = signJwt(payload, gw.secret, opts);
  gw.tokens.add(t);
  return t;
}

// ---------------------------------------------------------- dashboards ----

/**
 * Records every event a socket receives (in order) and lets a test wait for
 * one, whether it arrived before or after the call.
 */
export class Recorder {
  constructor(socket) {
    this.events = [];
    this.waiters = [];
    socket.onAny((name, ...args) => {
      const ev = { name, payload: args[0], args, at: Date.now() };
      this.events.push(ev);
      for (const w of [...this.waiters]) {
        if (w.name === name && w.pred(ev.payload)) w.done(ev.payload);
      }
    });
  }

  all(name, pred = () => true) {
    return this.events.filter((e) => e.name === name && pred(e.payload)).map((e) => e.payload);
  }

  names() {
    return this.events.map((e) => e.name);
  }

  waitFor(name, pred = () => true, timeout = 5000) {
    const hit = this.events.find((e) => e.name === name && pred(e.payload));
    if (hit) return Promise.resolve(hit.payload);
    return new Promise((resolve, reject) => {
      const w = {
        name,
        pred,
        done: (p) => {
          clearTimeout(w.timer);
          this.waiters.splice(this.waiters.indexOf(w), 1);
          resolve(p);
        },
      };
      w.timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        reject(new Error(`no matching "${name}" event within ${timeout} ms; received: ` +
          JSON.stringify(this.events.map((e) => [e.name, e.payload])).slice(0, 2000)));
      }, timeout);
      this.waiters.push(w);
    });
  }
}

/** Build (but do not connect) a client socket; tracked by the gateway for cleanup. */
export function makeSocket(gw, { token, auth, transports = ['websocket'], extraHeaders, query } = {}) {
  const opts = {
    autoConnect: false,
    reconnection: false,
    forceNew: true,
    timeout: 10_000,
    transports,
  };
  if (auth !== undefined) opts.auth = auth;
  else if (token !== undefined) opts.auth = { token };
  if (extraHeaders) opts.extraHeaders = extraHeaders;
  if (query) opts.query = query;
  const socket = io(gw.url, opts);
  gw.sockets.add(socket);
  socket.on('disconnect', () => {});
  return socket;
}

/**
 * Connect a dashboard. Resolves to { socket, rec, accepted } once
 * `connection_accepted` arrives; rejects with the connect_error otherwise.
 */
export function connectDashboard(gw, opts = {}) {
  const socket = makeSocket(gw, opts);
  const rec = new Recorder(socket);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      close(gw, socket);
      reject(new Error('dashboard: neither connection_accepted nor connect_error within 15 s; ' +
        `events: ${JSON.stringify(rec.names())}`));
    }, 15_000);
    socket.once('connect_error', (err) => {
      clearTimeout(timer);
      close(gw, socket);
      const e = new Error(`dashboard refused: ${err.message} ${JSON.stringify(err.data ?? null)}`);
      e.connectError = err;
      reject(e);
    });
    socket.once('connection_accepted', (accepted) => {
      clearTimeout(timer);
      resolve({ socket, rec, accepted });
    });
    socket.connect();
  });
}

/**
 * Try to connect and expect a refusal. Resolves to the connect_error Error
 * (err.message is the code); throws if the connection was accepted.
 */
export function expectRefusal(gw, opts = {}, timeout = 15_000) {
  const socket = makeSocket(gw, opts);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      close(gw, socket);
      reject(new Error(`expected connect_error, got nothing within ${timeout} ms`));
    }, timeout);
    socket.once('connect_error', (err) => {
      clearTimeout(timer);
      close(gw, socket);
      resolve(err);
    });
    socket.once('connection_accepted', (p) => {
      clearTimeout(timer);
      close(gw, socket);
      reject(new Error(`expected a refusal but the connection was accepted: ${JSON.stringify(p)}`));
    });
    socket.once('disconnect', (reason) => {
      clearTimeout(timer);
      close(gw, socket);
      reject(new Error(`expected connect_error, but the namespace connected and was then disconnected (${reason})`));
    });
    socket.once('connect', () => {
      // Some servers accept the namespace connect and only then disconnect:
      // that is not a refusal in the contract's sense; give connection_accepted
      // a moment, then report.
      setTimeout(() => {
        if (!socket.connected) return;
        clearTimeout(timer);
        close(gw, socket);
        reject(new Error('expected a refusal but the socket connected'));
      }, 1000);
    });
    socket.connect();
  });
}

/** Assert a refusal carries the expected code (and err.data.code when data is present). */
export function assertRefusal(err, code) {
  assert.equal(err.message, code, `connect_error message; data=${JSON.stringify(err.data ?? null)}`);
  if (err.data !== undefined && err.data !== null && typeof err.data === 'object' && 'code' in err.data) {
    assert.equal(err.data.code, code, 'err.data.code');
  }
}

export function close(gw, socket) {
  try { socket.disconnect(); } catch { /* ignore */ }
  gw.sockets.delete(socket);
}

/** emitWithAck with a 5 s timeout. */
export function ack(socket, event, ...args) {
  return socket.timeout(5000).emitWithAck(event, ...args);
}

/** Poll `fn` until it returns a truthy value (or does not throw). */
export async function eventually(fn, { timeout = 5000, interval = 100, message = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
      last = v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`${message} not met within ${timeout} ms (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    }
    await sleep(interval);
  }
}

// ------------------------------------------------------------- HTTP ----

/** POST /api/v1/events; resolves to { status, body, headers }. */
export async function postEvents(gw, token, body, { raw = false, headers = {} } = {}) {
  const h = { 'content-type': 'application/json', ...headers };
  if (token !== undefined && token !== null) h.authorization = `Bearer ${token}`;
  const res = await fetch(`${gw.url}/api/v1/events`, {
    method: 'POST',
    headers: h,
    body: raw ? body : JSON.stringify(body),
    signal: AbortSignal.timeout(15_000),
  });
  const text = await res.text();
  let json;
  try { json = text ? JSON.parse(text) : undefined; } catch { json = undefined; }
  return { status: res.status, body: json, text, headers: res.headers };
}

/**
 * POST a (large) body with node:http so that a server answering before it
 * has read the whole body (e.g. 413) is still observed as a response.
 */
export function rawPost(gw, pathname, token, bodyBuf) {
  return new Promise((resolve, reject) => {
    let answered = false;
    const req = http.request(`${gw.url}${pathname}`, {
      method: 'POST',
      headers: {
        'content-type': 'application/json',
        'content-length': bodyBuf.length,
        ...(token ? { authorization: `Bearer ${token}` } : {}),
      },
      timeout: 15_000,
    }, (res) => {
      answered = true;
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, text: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', () => resolve({ status: res.statusCode, text: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('error', (e) => { if (!answered) reject(e); });
    req.on('timeout', () => { req.destroy(new Error('timeout')); });
    req.end(bodyBuf);
  });
}

export async function getSnapshotHttp(gw, classroom, token) {
  const headers = token ? { authorization: `Bearer ${token}` } : {};
  const res = await fetch(`${gw.url}/api/v1/classrooms/${encodeURIComponent(classroom)}/snapshot`, {
    headers, signal: AbortSignal.timeout(10_000),
  });
  const text = await res.text();
  let body;
  try { body = JSON.parse(text); } catch { body = undefined; }
  return { status: res.status, body, text };
}

// ------------------------------------------------------------ events ----

export function cellEvent(overrides = {}) {
  const ev = {
    id: randomUUID(),
    type: 'cell_executed',
    classroom: 'cls-101',
    seat: 42,
    student: 's-0042',
    notebook: 'week1/lab.ipynb',
    cell_id: 'a1b2c3',
    execution_count: 7,
    status: 'error',
    error: { ename: 'NameError', evalue: "name 'x' is not defined" },
    duration_ms: 120,
    occurred_at: new Date().toISOString(),
    ...overrides,
  };
  if (ev.status === 'ok' && !('error' in overrides)) delete ev.error;
  return clean(ev);
}

export function helpEvent(overrides = {}) {
  return clean({
    id: randomUUID(),
    type: 'help_requested',
    classroom: 'cls-101',
    seat: 7,
    student: 's-0007',
    message: 'My plot is empty, what am I missing?',
    occurred_at: new Date().toISOString(),
    ...overrides,
  });
}

export function cancelEvent(overrides = {}) {
  return clean({
    id: randomUUID(),
    type: 'help_cancelled',
    classroom: 'cls-101',
    seat: 7,
    student: 's-0007',
    occurred_at: new Date().toISOString(),
    ...overrides,
  });
}

// ----------------------------------------------------------- metrics ----

export async function scrape(gw) {
  const res = await fetch(`${gw.metricsUrl}/metrics`, { signal: AbortSignal.timeout(5000) });
  const text = await res.text();
  if (res.status !== 200) throw new Error(`/metrics answered ${res.status}: ${text.slice(0, 500)}`);
  return text;
}

/** Parse Prometheus text into [{ name, labels, value }]. */
export function parseMetrics(text) {
  const out = [];
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[2]) {
      for (const lm of m[2].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[lm[1]] = lm[2];
    }
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

/** Sum of the series `name` whose labels include `labels`; undefined when none. */
export function metricValue(text, name, labels = {}) {
  const series = parseMetrics(text).filter((s) => s.name === name &&
    Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  if (series.length === 0) return undefined;
  return series.reduce((a, s) => a + s.value, 0);
}

// ----------------------------------------------------------- fixture ----

export const PEOPLE = {
  alice: { email: 'alice@example.edu', name: 'Alice Archer' },
  bob: { email: 'bob@example.edu', name: 'Bob Baker' },
  carol: { email: 'carol@example.edu', name: 'Carol Chen' }, // staffs nothing
};

/**
 * Seed the directory: alice and bob staff cls-101 (200 seats) and alice
 * staffs cls-small (30 seats); carol staffs nothing. Returns CLI-issued tokens.
 */
export async function seedDirectory(gw) {
  for (const p of Object.values(PEOPLE)) {
    await gw.cli('instructors', 'add', p.email, '--name', p.name);
  }
  await gw.cli('classrooms', 'add', 'cls-101');
  await gw.cli('classrooms', 'add', 'cls-small', '--seats', '30');
  await gw.cli('classrooms', 'staff', 'cls-101', PEOPLE.alice.email);
  await gw.cli('classrooms', 'staff', 'cls-101', PEOPLE.bob.email);
  await gw.cli('classrooms', 'staff', 'cls-small', PEOPLE.alice.email);
  const tokens = {};
  for (const [k, p] of Object.entries(PEOPLE)) tokens[k] = await gw.cli('token', 'instructor', p.email);
  return tokens;
}

/** CLI-issued student token. */
export function studentToken(gw, student, classroom, seat) {
  const args = ['token', 'student', student, '--classroom', classroom];
  if (seat !== undefined) args.push('--seat', String(seat));
  return gw.cli(...args);
}

/** Assert that none of the gateway's tokens (nor its secret) appear in its logs. */
export function assertNoSecretsInLogs(gw) {
  const logs = gw.logs();
  assert.ok(gw.tokens.size > 0, 'the test registered no tokens to look for');
  const leaks = [];
  for (const t of gw.tokens) {
    if (logs.includes(t)) { leaks.push(`full token ${t.slice(0, 24)}…`); continue; }
    const parts = t.split('.');
    // the signature alone (or header.payload) is enough to be a leak
    if (parts[2] && parts[2].length >= 16 && logs.includes(parts[2])) leaks.push(`signature of ${t.slice(0, 24)}…`);
    else if (parts.length >= 2 && logs.includes(`${parts[0]}.${parts[1]}`)) leaks.push(`header.payload of ${t.slice(0, 24)}…`);
  }
  if (logs.includes(gw.secret)) leaks.push('the JWT secret');
  assert.deepEqual(leaks, [], `secrets found in the gateway's log output (${logs.length} bytes scanned)`);
}

export function isRfc3339(s) {
  return typeof s === 'string' &&
    /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/.test(s) &&
    !Number.isNaN(Date.parse(s));
}

/** Does a 400 body name an error for item `index` on `field`? (field may be a path ending in it) */
export function hasFieldError(body, index, field) {
  return Array.isArray(body?.errors) && body.errors.some((e) => e && e.index === index &&
    typeof e.field === 'string' &&
    (e.field === field || e.field.endsWith(`.${field}`) || e.field.endsWith(`/${field}`) || e.field.endsWith(`]${field}`)) &&
    typeof e.message === 'string' && e.message.length > 0);
}

/** Per-test options: generous timeout so a hung gateway fails the test instead of the run. */
export const T = { timeout: 30_000 };
