// Every limit of the gateway, each on a gateway of its own with the limit
// set low: the answer the client gets, the metric that counts it, and that
// the other clients go on as if nothing happened.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startGateway } from './lib/gateway.mjs';
import {
  T, seedDirectory, studentToken, connectDashboard, expectRefusal, assertRefusal, ack, close,
  sleep, postEvents, cellEvent, scrape, metricValue, eventually, assertNoSecretsInLogs,
} from './lib/helpers.mjs';
import { openPolling, rawDashboard } from './lib/raw.mjs';

const metric = async (gw, name, labels) => (metricValue(await scrape(gw), name, labels) ?? 0);

/** Resolves with the reason of the socket's next disconnect. */
const disconnected = (socket, timeout = 10_000) => new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error(`still connected after ${timeout} ms`)), timeout);
  socket.once('disconnect', (reason) => { clearTimeout(timer); resolve(reason); });
});

/** Posts one cell_executed (of seat 42 unless told) and waits until `dashboard` has it. */
async function eventReaches(gw, token, dashboard, over = {}) {
  const ev = cellEvent(over);
  const res = await postEvents(gw, token, ev);
  assert.equal(res.status, 202, res.text);
  await dashboard.rec.waitFor('cell_executed', (p) => p?.id === ev.id);
}

describe('handshakes per client address', { concurrency: false }, () => {
  let gw;
  let tokens;

  before(async () => {
    gw = await startGateway({
      env: {
        // A budget of 3 at once, one more every 3 s; the harness's
        // 127.0.0.1 is the load balancer, so X-Forwarded-For names clients.
        CELLGATE_HANDSHAKES_PER_MINUTE: '20',
        CELLGATE_HANDSHAKE_BURST: '3',
        CELLGATE_TRUSTED_PROXIES: '127.0.0.1',
      },
    });
    tokens = await seedDirectory(gw);
  });
  after(async () => { await gw?.stop(); });

  const from = (ip, token = tokens.alice) => ({ token, extraHeaders: { 'x-forwarded-for': ip } });

  test('the fourth handshake from one address in a burst is refused rate_limited, another address is not, and it is counted', T, async () => {
    const refusedBefore = await metric(gw, 'cellgate_auth_failures_total', { reason: 'rate_limited' });
    const watcher = await connectDashboard(gw, from('198.51.100.1', tokens.bob));
    for (let i = 0; i < 3; i++) {
      const d = await connectDashboard(gw, from('203.0.113.7'));
      close(gw, d.socket);
    }
    const err = await expectRefusal(gw, from('203.0.113.7'));
    assertRefusal(err, 'rate_limited');
    // Over polling too: the same budget, the same answer.
    const polled = await expectRefusal(gw, { ...from('203.0.113.7'), transports: ['polling'] });
    assertRefusal(polled, 'rate_limited');

    const other = await connectDashboard(gw, from('203.0.113.8'));
    assert.ok(other.accepted.sid, 'another address has its own budget');
    assert.equal(watcher.socket.connected, true, 'connected dashboards are not touched');
    assert.equal(await metric(gw, 'cellgate_auth_failures_total', { reason: 'rate_limited' }), refusedBefore + 2);
    assert.ok(await metric(gw, 'cellgate_rate_limit_keys', { limit: 'handshake' }) >= 0);
    close(gw, other.socket);
    close(gw, watcher.socket);
  });

  test('the budget refills: retrying after a pause is accepted', T, async () => {
    await sleep(3200);
    const again = await connectDashboard(gw, from('203.0.113.7'));
    assert.ok(again.accepted.sid);
    close(gw, again.socket);
  });

  test('IPv6 clients share the budget of their /64', T, async () => {
    for (let i = 1; i <= 3; i++) {
      const d = await connectDashboard(gw, from(`2001:db8:7:7::${i}`));
      close(gw, d.socket);
    }
    assertRefusal(await expectRefusal(gw, from('2001:db8:7:7:ffff::9')), 'rate_limited');
    const elsewhere = await connectDashboard(gw, from('2001:db8:7:8::1'));
    close(gw, elsewhere.socket);
  });

  test('the gateway logs contain none of the tokens used', T, () => assertNoSecretsInLogs(gw));
});

describe('X-Forwarded-For is not believed by default', { concurrency: false }, () => {
  let gw;
  let tokens;

  before(async () => {
    gw = await startGateway({
      env: { CELLGATE_HANDSHAKES_PER_MINUTE: '20', CELLGATE_HANDSHAKE_BURST: '2' },
    });
    tokens = await seedDirectory(gw);
  });
  after(async () => { await gw?.stop(); });

  test('a client that writes a new address into the header each time still runs out', T, async () => {
    for (const ip of ['203.0.113.1', '203.0.113.2']) {
      const d = await connectDashboard(gw, { token: tokens.alice, extraHeaders: { 'x-forwarded-for': ip } });
      close(gw, d.socket);
    }
    const err = await expectRefusal(gw, { token: tokens.alice, extraHeaders: { 'x-forwarded-for': '203.0.113.3' } });
    assertRefusal(err, 'rate_limited');
  });
});

describe('ingest requests per student token', { concurrency: false }, () => {
  let gw;
  let tokens;
  let dashboard;
  let s42;
  let s43;

  before(async () => {
    gw = await startGateway({
      env: { CELLGATE_INGEST_PER_MINUTE: '20', CELLGATE_INGEST_BURST: '2' },
    });
    tokens = await seedDirectory(gw);
    dashboard = await connectDashboard(gw, { token: tokens.alice });
    assert.equal((await ack(dashboard.socket, 'join_classroom', { classroom: 'cls-101' })).ok, true);
    s42 = await studentToken(gw, 's-0042', 'cls-101', 42);
    s43 = await studentToken(gw, 's-0043', 'cls-101', 43);
  });
  after(async () => { await gw?.stop(); });

  test('past the burst a token is answered 429 with Retry-After and nothing applied; another token is not', T, async () => {
    const rejectedBefore = await metric(gw, 'cellgate_events_rejected_total', { reason: 'rate_limited' });
    for (let i = 0; i < 2; i++) {
      const res = await postEvents(gw, s42, cellEvent());
      assert.equal(res.status, 202, res.text);
    }
    const refused = cellEvent();
    const res = await postEvents(gw, s42, refused);
    assert.equal(res.status, 429, res.text);
    assert.equal(res.body.error, 'rate_limited');
    const retryAfter = Number(res.headers.get('retry-after'));
    assert.ok(Number.isInteger(retryAfter) && retryAfter >= 1 && retryAfter <= 3,
      `Retry-After ${res.headers.get('retry-after')}`);
    assert.equal(await metric(gw, 'cellgate_events_rejected_total', { reason: 'rate_limited' }), rejectedBefore + 1);

    // Another student, same classroom, same moment: served and delivered.
    await eventReaches(gw, s43, dashboard, { seat: 43, student: 's-0043' });
    assert.equal(dashboard.rec.all('cell_executed', (p) => p?.id === refused.id).length, 0,
      'the refused event was not broadcast');

    // After the wait the client was told, the retry goes through.
    await sleep(retryAfter * 1000 + 200);
    const retried = await postEvents(gw, s42, refused);
    assert.equal(retried.status, 202, retried.text);
    assert.equal(retried.body.accepted, 1, 'applied once, not a duplicate');
    await dashboard.rec.waitFor('cell_executed', (p) => p?.id === refused.id);
  });

  test('the gateway logs contain none of the tokens used', T, () => assertNoSecretsInLogs(gw));
});

describe('Socket.IO payload limit, the same over polling and WebSocket', { concurrency: false }, () => {
  const LIMIT = 8192;
  let gw;
  let tokens;
  let watcher;
  let student;

  before(async () => {
    gw = await startGateway({ env: { CELLGATE_MAX_SOCKET_PAYLOAD_BYTES: String(LIMIT) } });
    tokens = await seedDirectory(gw);
    watcher = await connectDashboard(gw, { token: tokens.bob });
    assert.equal((await ack(watcher.socket, 'join_classroom', { classroom: 'cls-101' })).ok, true);
    student = await studentToken(gw, 's-0042', 'cls-101', 42);
  });
  after(async () => { await gw?.stop(); });

  test('the Engine.IO handshake announces the limit to clients', T, async () => {
    const { open } = await openPolling(gw);
    assert.equal(open.maxPayload, LIMIT);
  });

  for (const transport of ['websocket', 'polling']) {
    test(`over ${transport}: a packet under the limit is answered, one over it closes that connection only and is counted`, T, async () => {
      const before = await metric(gw, 'cellgate_socket_payloads_too_large_total', { transport });
      const d = await connectDashboard(gw, { token: tokens.alice, transports: [transport] });

      const under = await ack(d.socket, 'join_classroom', { classroom: 'x'.repeat(LIMIT - 200) });
      assert.equal(under.ok, false, 'answered (no such classroom)');
      assert.equal(d.socket.connected, true);

      const gone = disconnected(d.socket);
      d.socket.emit('join_classroom', { classroom: 'x'.repeat(LIMIT + 100) });
      assert.match(await gone, /^transport (close|error)$/);
      await eventually(async () => (await metric(gw, 'cellgate_socket_payloads_too_large_total', { transport })) === before + 1,
        { message: `cellgate_socket_payloads_too_large_total{transport="${transport}"} counted` });

      assert.equal(watcher.socket.connected, true, 'the other dashboard stays');
      await eventReaches(gw, student, watcher);
      close(gw, d.socket);
    });
  }
});

describe('dashboards per instructor and per pod', { concurrency: false }, () => {
  let gw;
  let tokens;
  let student;
  const open = [];

  before(async () => {
    gw = await startGateway({
      env: { CELLGATE_MAX_SOCKETS_PER_INSTRUCTOR: '2', CELLGATE_MAX_SOCKETS: '3' },
    });
    tokens = await seedDirectory(gw);
    student = await studentToken(gw, 's-0042', 'cls-101', 42);
  });
  after(async () => { await gw?.stop(); });

  test('an instructor past the limit is refused too_many_connections; another instructor is not', T, async () => {
    const before = await metric(gw, 'cellgate_auth_failures_total', { reason: 'too_many_connections' });
    open.push(await connectDashboard(gw, { token: tokens.alice }));
    open.push(await connectDashboard(gw, { token: tokens.alice, transports: ['polling'] }));
    assertRefusal(await expectRefusal(gw, { token: tokens.alice }), 'too_many_connections');
    assert.equal(await metric(gw, 'cellgate_auth_failures_total', { reason: 'too_many_connections' }), before + 1);

    const bob = await connectDashboard(gw, { token: tokens.bob });
    assert.equal((await ack(bob.socket, 'join_classroom', { classroom: 'cls-101' })).ok, true);
    open.push(bob);
    assert.ok(open.every((d) => d.socket.connected));
  });

  test('a full pod refuses server_full, and its dashboards go on receiving', T, async () => {
    const text = await scrape(gw);
    assert.equal(metricValue(text, 'cellgate_socket_limit_sockets', { scope: 'pod' }), 3);
    assert.equal(metricValue(text, 'cellgate_socket_limit_sockets', { scope: 'instructor' }), 2);
    const before = metricValue(text, 'cellgate_auth_failures_total', { reason: 'server_full' });

    assertRefusal(await expectRefusal(gw, { token: tokens.carol }), 'server_full');
    assertRefusal(await expectRefusal(gw, { token: tokens.carol, transports: ['polling'] }), 'server_full');
    assert.equal(await metric(gw, 'cellgate_auth_failures_total', { reason: 'server_full' }), before + 2);
    assert.equal(await metric(gw, 'cellgate_connected_sockets', { namespace: '/' }), 3);
    await eventReaches(gw, student, open[2]);
  });

  test('a dashboard that leaves gives its place back', T, async () => {
    close(gw, open[0].socket);
    const again = await eventually(async () => {
      try {
        return await connectDashboard(gw, { token: tokens.alice });
      } catch (e) {
        assert.match(e.message, /too_many_connections|server_full/);
        return null;
      }
    }, { message: 'alice gets back in' });
    assert.ok(again.accepted.sid);
  });
});

describe('outgoing queue per dashboard', { concurrency: false }, () => {
  const QUEUE = 256;
  let gw;
  let tokens;
  let student;

  before(async () => {
    gw = await startGateway({ env: { CELLGATE_SOCKET_QUEUE_PACKETS: String(QUEUE) } });
    tokens = await seedDirectory(gw);
    student = await studentToken(gw, 's-0042', 'cls-101', 42);
  });
  after(async () => { await gw?.stop(); });

  test('a dashboard that stops reading is disconnected and counted; one that reads gets every event', { timeout: 120_000 }, async () => {
    const normal = await connectDashboard(gw, { token: tokens.bob });
    assert.equal((await ack(normal.socket, 'join_classroom', { classroom: 'cls-101' })).ok, true);
    const slow = await rawDashboard(gw, tokens.alice, 'cls-101');
    assert.equal(await metric(gw, 'cellgate_connected_sockets', { namespace: '/' }), 2);
    const closedBefore = await metric(gw, 'cellgate_connections_closed_total', { namespace: '/' });
    slow.pause();

    // Batches of 100 events of about 3 KB (101 packets with the seat),
    // each posted once the reading dashboard has the one before: it is
    // never more than a batch behind, well within its queue, while the
    // dashboard that does not read fills its TCP buffers, then its queue.
    const posted = new Set();
    const evalue = 'e'.repeat(3000);
    let counted = 0;
    for (let batch = 0; batch < 150 && counted === 0; batch++) {
      const events = Array.from({ length: 100 }, () => cellEvent({ error: { ename: 'ValueError', evalue } }));
      const res = await postEvents(gw, student, events);
      assert.equal(res.status, 202, `batch ${batch}: ${res.text.slice(0, 300)}`);
      for (const e of events) posted.add(e.id);
      const last = events.at(-1).id;
      await normal.rec.waitFor('cell_executed', (p) => p?.id === last, 10_000);
      counted = await metric(gw, 'cellgate_slow_consumer_disconnects_total');
    }
    if (counted !== 1) {
      // Which dashboards the gateway found too slow, and when they left.
      const lines = gw.logs().split('\n').filter((l) => /queue is full|disconnected|accepted/.test(l));
      console.log(`gateway log:\n${lines.join('\n')}`);
    }
    assert.equal(counted, 1, `the paused dashboard was counted after ${posted.size} events`);

    // The gateway let it go…
    await eventually(async () => (await metric(gw, 'cellgate_connected_sockets', { namespace: '/' })) === 1,
      { message: 'the slow dashboard is disconnected', timeout: 10_000 });
    assert.equal(await metric(gw, 'cellgate_connections_closed_total', { namespace: '/' }), closedBefore + 1);
    // …and the client sees its connection end once it reads again.
    slow.resume();
    const code = await Promise.race([slow.closed, sleep(15_000).then(() => 'still open')]);
    assert.notEqual(code, 'still open', 'the slow dashboard\'s connection was closed');

    // The reading dashboard got everything, in full, and is still there.
    await eventually(() => normal.rec.all('cell_executed').length >= posted.size,
      { message: `the reading dashboard gets all ${posted.size} events`, timeout: 30_000 });
    const got = new Set(normal.rec.all('cell_executed').map((p) => p.id));
    assert.equal(got.size, posted.size);
    for (const id of posted) assert.ok(got.has(id), `missing ${id}`);
    assert.equal(normal.socket.connected, true);
    assert.equal(await metric(gw, 'cellgate_slow_consumer_disconnects_total'), 1, 'counted once');
    await eventReaches(gw, student, normal);
  });
});
