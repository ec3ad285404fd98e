// Debian's nginx in front of two pods, configured with the README's
// cookie-affinity snippet: socket.io-client with its default transports
// (HTTP long-polling first, then the upgrade to WebSocket) must keep every
// request of a session on one pod. A request for a session a pod does not
// know gets the standard Engine.IO 400, never a 500 or a hang.
//
//   tests/cluster/run.sh     (or: node --test tests/cluster/sticky-nginx.test.mjs)
//
// Node's socket.io-client keeps cookies only with `withCredentials: true`
// (its cookie jar then behaves as a browser's would): the dashboards here
// set it, as a browser dashboard on another origin must too.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';

import { cellEvent, helpEvent } from '../e2e/lib/helpers.mjs';
import { dashboard, dashboards, post, sleep, startCluster } from './lib/cluster.mjs';
import { startNginx } from './lib/nginx.mjs';

const T = { timeout: 240_000 };
const DASHBOARDS = 200;

let c;
let ngx;
let room;

before(async () => {
  c = await startCluster({ pods: 2 });
  ngx = await startNginx(c.pods.map((p) => `127.0.0.1:${p.port}`));
  room = await c.seed({ instructors: 10, name: 'sticky' });
});

after(async () => {
  await c?.stop();
  await ngx?.stop();
});

const UNKNOWN_SID = { code: 1, message: 'Session ID unknown' };

/** Every event in `ids` reached every dashboard in `ds` within `timeout`. */
async function allReceived(ds, name, ids, key = (p) => p.id, timeout = 15_000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const missing = ds.map((d) => ids.filter((id) => !d.rec.all(name).some((p) => key(p) === id)).length);
    const total = missing.reduce((a, b) => a + b, 0);
    if (total === 0) return;
    if (Date.now() > deadline) {
      throw new Error(`${total} ${name} deliveries missing over ${missing.filter((m) => m > 0).length} dashboards`);
    }
    await sleep(100);
  }
}

test(`${DASHBOARDS} socket.io-clients with default transports through nginx cookie affinity: no "Session ID unknown"`, T, async () => {
  const { classroom, tokens } = room;
  const started = Date.now();
  const ds = await dashboards(DASHBOARDS, (k) => dashboard(ngx.url, tokens[k % tokens.length], {
    classroom, withCredentials: true, tracker: c.sockets,
  }), { batch: 20 });
  const connectedMs = Date.now() - started;

  // Both pods hold dashboards, and each dashboard ends on WebSocket.
  const perPod = {};
  for (const d of ds) (perPod[d.accepted[0].node] ??= []).push(d);
  assert.deepEqual(Object.keys(perPod).sort(), c.pods.map((p) => p.node).sort(), 'dashboards on both pods');
  const upgraded = async () => ds.filter((d) => d.socket.io.engine?.transport?.name === 'websocket').length;
  const deadline = Date.now() + 20_000;
  while ((await upgraded()) < DASHBOARDS && Date.now() < deadline) await sleep(100);
  assert.equal(await upgraded(), DASHBOARDS, 'every dashboard upgraded to WebSocket');

  // Events posted through nginx (no cookie: either pod) reach all of them.
  const cells = [];
  for (let n = 0; n < 10; n++) {
    const seat = 1 + n;
    const ev = cellEvent({ classroom, seat, student: `s-${String(seat).padStart(4, '0')}`, status: 'ok' });
    const r = await post(ngx.url, c.student(ev.student, classroom, seat), ev);
    assert.equal(r.status, 202, JSON.stringify(r.body));
    cells.push(ev.id);
  }
  const help = helpEvent({ classroom, seat: 50, student: 's-0050' });
  assert.equal((await post(ngx.url, c.student('s-0050', classroom, 50), help)).status, 202);
  await allReceived(ds, 'cell_executed', cells);
  await allReceived(ds, 'help_requested', [help.id], (p) => p.request_id);

  // Nothing went wrong on the way: no refusals, no drops, and in nginx's
  // log no 400 (the "Session ID unknown" answer) or 5xx, and every request
  // of a session went to the pod that holds it.
  assert.deepEqual(ds.flatMap((d) => d.errors), [], 'no connect or join errors');
  assert.deepEqual(ds.flatMap((d) => d.disconnects), [], 'no disconnects');
  await sleep(500);
  const log = await ngx.accessLog();
  const sio = log.filter((l) => l.uri?.startsWith('/socket.io/'));
  assert.ok(sio.length >= DASHBOARDS * 3, `nginx saw the sessions (${sio.length} requests)`);
  const bad = sio.filter((l) => l.status === 400 || l.status >= 500);
  assert.deepEqual(bad.map((l) => l.raw), [], 'no Session ID unknown (400) and no 5xx through nginx');
  const podsOfSid = new Map();
  for (const l of sio.filter((x) => x.sid)) {
    if (!podsOfSid.has(l.sid)) podsOfSid.set(l.sid, new Set());
    podsOfSid.get(l.sid).add(l.upstream);
  }
  assert.equal(podsOfSid.size, DASHBOARDS, 'one Engine.IO session per dashboard');
  const split = [...podsOfSid].filter(([, ups]) => ups.size !== 1);
  assert.deepEqual(split.map(([sid, ups]) => [sid, [...ups]]), [], 'each session stayed on one pod');
  console.log(`# ${DASHBOARDS} dashboards connected and joined in ${connectedMs} ms ` +
    `(${Object.entries(perPod).map(([n, l]) => `${n}: ${l.length}`).join(', ')}); ${sio.length} socket.io requests`);

  for (const d of ds) d.socket.disconnect();
});

test('a polling request with a made-up sid gets the standard Engine.IO 400, through nginx and on a pod', T, async () => {
  const sids = ['AAAAAAAAAAAAAAAA', 'made-up', 'x'.repeat(40)];
  for (const base of [ngx.url, ...c.pods.map((p) => p.url)]) {
    for (const sid of sids) {
      for (const method of ['GET', 'POST']) {
        const res = await fetch(`${base}/socket.io/?EIO=4&transport=polling&sid=${encodeURIComponent(sid)}`, {
          method,
          body: method === 'POST' ? '4hello' : undefined,
          headers: method === 'POST' ? { 'content-type': 'text/plain;charset=UTF-8' } : {},
          signal: AbortSignal.timeout(5000),
        });
        const text = await res.text();
        assert.equal(res.status, 400, `${method} ${base} sid=${sid}: ${res.status} ${text}`);
        assert.deepEqual(JSON.parse(text), UNKNOWN_SID, `${method} ${base} sid=${sid}`);
        assert.match(res.headers.get('content-type') ?? '', /application\/json/);
      }
    }
  }
});

test('websocket-only dashboards work through nginx without affinity', T, async () => {
  const { classroom, tokens } = room;
  const ds = await dashboards(20, (k) => dashboard(ngx.rrUrl, tokens[k % tokens.length], {
    classroom, transports: ['websocket'], tracker: c.sockets,
  }), { batch: 20 });
  const nodes = new Set(ds.map((d) => d.accepted[0].node));
  assert.equal(nodes.size, 2, 'round robin spread them over both pods');
  const ev = cellEvent({ classroom, seat: 9, student: 's-0009', status: 'error' });
  assert.equal((await post(ngx.rrUrl, c.student('s-0009', classroom, 9), ev)).status, 202);
  await allReceived(ds, 'cell_executed', [ev.id]);
  assert.deepEqual(ds.flatMap((d) => d.errors), []);
  for (const d of ds) d.socket.disconnect();
});
