// Two pods on a redis-server of this test's own (never the shared one),
// killed and started again while students keep posting: nothing is
// acknowledged that the other pod's dashboards did not get, the pods say
// they are not ready while Redis is away, and delivery resumes by itself.
//
//   tests/cluster/run.sh     (or: node --test tests/cluster/redis-outage.test.mjs)

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';

import { cellEvent, helpEvent, metricValue, scrape } from '../e2e/lib/helpers.mjs';
import { dashboard, get, post, redisCli, sleep, startCluster, startPrivateRedis } from './lib/cluster.mjs';

/** How long Redis stays away each time: longer than the probe needs to notice (2 s). */
const OUTAGE_MS = 5000;
/** The bound: delivery resumes within this long after Redis is back. */
const RESUME_BOUND_MS = 5000;
/**
 * How long pod A alone is cut off from Redis: shorter than the others wait
 * for a silent pod (5 s, src/cluster/peers.rs) before they stop counting it.
 */
const CUT_MS = 2000;
/** A student's retry delay after a 503 (shorter than Retry-After, to time the resume). */
const RETRY_MS = 100;

/** Pod A reaches Redis as its own ACL user, so that it alone can be cut off. */
const POD_A_USER = 'cellgate-pod-a';
const POD_A_PASSWORD = 'pod-a-test-password';

let redis;
let c;
let room;

before(async () => {
  redis = await startPrivateRedis({ users: [`${POD_A_USER} on >${POD_A_PASSWORD} ~* &* +@all`] });
  const podAUrl = `redis://${POD_A_USER}:${POD_A_PASSWORD}@127.0.0.1:${redis.port}`;
  c = await startCluster({
    pods: 2,
    redisUrl: redis.url,
    perPod: (i) => (i === 0 ? { CELLGATE_REDIS_URL: podAUrl } : {}),
  });
  room = await c.seed({ instructors: 2, name: 'outage' });
});

after(async () => {
  await c?.stop();
  await redis?.stop();
});

/**
 * A notebook extension posting to one pod: a new event every `everyMs`,
 * each retried after a 503 until it is accepted. Every attempt is kept.
 */
function student(url, token, seat, classroom, everyMs = 50) {
  const s = { attempts: [], accepted: new Map(), stopped: false };
  s.done = (async () => {
    let seq = 0;
    while (!s.stopped) {
      const ev = cellEvent({ classroom, seat, student: `s-${String(seat).padStart(4, '0')}`,
        status: 'ok', execution_count: ++seq });
      for (;;) {
        const at = Date.now();
        let status;
        let body;
        try {
          ({ status, body } = await post(url, token, ev));
        } catch (e) {
          status = `error ${e.message}`;
        }
        s.attempts.push({ id: ev.id, at, answeredAt: Date.now(), status, body });
        if (status === 202) {
          s.accepted.set(ev.id, { at, answeredAt: Date.now(), duplicates: body?.duplicates });
          break;
        }
        if (s.stopped) break;
        await sleep(RETRY_MS);
      }
      await sleep(everyMs);
    }
  })();
  return s;
}

/** Samples GET /readyz of every pod every 100 ms. */
function readinessWatch(pods) {
  const w = { samples: pods.map(() => []), stopped: false };
  w.done = Promise.all(pods.map(async (gw, i) => {
    while (!w.stopped) {
      const at = Date.now();
      try {
        const r = await get(gw.url, '/readyz');
        w.samples[i].push({ at, status: r.status, cluster: r.body?.cluster });
      } catch (e) {
        w.samples[i].push({ at, status: `error ${e.message}` });
      }
      await sleep(100);
    }
  }));
  return w;
}

/**
 * Accepted events some dashboard did not get: `posters` maps a pod's name
 * to [the student posting to it, the dashboard on it].
 */
function undelivered(posters, when) {
  const out = [];
  for (const [from, [s]] of Object.entries(posters)) {
    for (const [to, [, d]] of Object.entries(posters)) {
      const seen = new Set(d.rec.all('cell_executed').map((p) => p.id));
      for (const [id, a] of s.accepted) {
        if (!seen.has(id)) out.push([`posted to ${from}, not on ${to}`, id, when(a.at)]);
      }
    }
  }
  return out;
}

async function clusterMetrics(gw) {
  const text = await scrape(gw);
  return {
    healthy: metricValue(text, 'cellgate_cluster_healthy'),
    publishErrors: metricValue(text, 'cellgate_cluster_publish_errors_total'),
    dropped: metricValue(text, 'cellgate_cluster_messages_dropped_total'),
    rejectedCluster: metricValue(text, 'cellgate_events_rejected_total', { reason: 'cluster_unavailable' }),
    rejectedShared: metricValue(text, 'cellgate_events_rejected_total', { reason: 'unavailable' }),
  };
}

test('a Redis outage: no 202 that the other pod did not deliver, not ready meanwhile, delivery back within 5 s',
  { timeout: 180_000 }, async () => {
    const { classroom, tokens } = room;
    const [podA, podB] = c.pods;
    // A dashboard on each pod; each pod's students post to it, so every
    // accepted event must cross Redis to reach the other dashboard.
    const onA = await dashboard(podA.url, tokens[0], { classroom, transports: ['websocket'], tracker: c.sockets }).ready;
    const onB = await dashboard(podB.url, tokens[1], { classroom, transports: ['websocket'], tracker: c.sockets }).ready;
    const toB = student(podB.url, c.student('s-0001', classroom, 1), 1, classroom);
    const toA = student(podA.url, c.student('s-0002', classroom, 2), 2, classroom);
    const ready = readinessWatch(c.pods);
    const before0 = await Promise.all(c.pods.map(clusterMetrics));
    assert.deepEqual(before0.map((m) => m.healthy), [1, 1]);

    const outages = [];
    try {
      await sleep(2000);
      for (let n = 0; n < 2; n++) {
        const down = Date.now();
        await redis.kill();
        await sleep(OUTAGE_MS - 1000);
        const during = await Promise.all(c.pods.map(clusterMetrics));
        await sleep(1000);
        await redis.start();
        const back = Date.now();
        outages.push({ down, back, during });
        await sleep(RESUME_BOUND_MS + 2000);
      }
    } finally {
      toA.stopped = true;
      toB.stopped = true;
      await Promise.all([toA.done, toB.done]);
      ready.stopped = true;
      await ready.done;
    }
    const after0 = await Promise.all(c.pods.map(clusterMetrics));

    // 1. Every 202 reached the other pod's dashboard (and this pod's own).
    await sleep(2000);
    const rel = (t) => outages.map((o) => `${t - o.down} ms after outage start, ${t - o.back} ms after return`).join('; ');
    assert.deepEqual(undelivered({ A: [toA, onA], B: [toB, onB] }, rel), [],
      'events acknowledged with 202 but not delivered');
    assert.ok(toA.accepted.size > 50 && toB.accepted.size > 50,
      `events flowed: ${toA.accepted.size} via A, ${toB.accepted.size} via B`);

    for (const [n, o] of outages.entries()) {
      // 2. Answers during the outage: 503 with Retry-After, never 202.
      const attempts = [...toA.attempts, ...toB.attempts];
      const inside = attempts.filter((a) => a.at > o.down + 3000 && a.answeredAt < o.back);
      assert.ok(inside.length > 10, `outage ${n}: students kept posting (${inside.length} attempts)`);
      assert.deepEqual([...new Set(inside.map((a) => a.status))], [503], `outage ${n}: answers while Redis is away`);

      // 3. /readyz: not ready from at most 3 s after Redis went until it came back.
      for (const [i, samples] of ready.samples.entries()) {
        const outageSamples = samples.filter((s) => s.at > o.down + 3000 && s.at < o.back);
        assert.ok(outageSamples.length > 5, `pod ${i}: readiness sampled during outage ${n}`);
        assert.deepEqual([...new Set(outageSamples.map((s) => `${s.status} ${s.cluster}`))], ['503 unavailable'],
          `pod ${i}: /readyz during outage ${n}: ${JSON.stringify(samples.filter((s) => s.at > o.down - 500 && s.at < o.back + 500).map((s) => [s.at - o.down, s.status, s.cluster]))}`);
        const readyAgain = samples.find((s) => s.at > o.back && s.status === 200);
        assert.ok(readyAgain, `pod ${i} ready again after outage ${n}`);
        o[`readyAfter${i}`] = readyAgain.at - o.back;
        assert.ok(readyAgain.at - o.back <= RESUME_BOUND_MS,
          `pod ${i} ready ${readyAgain.at - o.back} ms after Redis returned (outage ${n})`);
      }

      // 4. Delivery resumes by itself: the first accepted post after Redis
      // returned, on each pod, was answered within the bound.
      for (const [name, s] of [['A', toA], ['B', toB]]) {
        const first = [...s.accepted.values()].filter((a) => a.answeredAt > o.back)
          .sort((x, y) => x.answeredAt - y.answeredAt)[0];
        assert.ok(first, `posts to ${name} accepted again after outage ${n}`);
        o[`resume${name}`] = first.answeredAt - o.back;
        assert.ok(first.answeredAt - o.back <= RESUME_BOUND_MS,
          `posts to ${name} accepted ${first.answeredAt - o.back} ms after Redis returned (outage ${n})`);
      }

      // 5. The metrics said so while it lasted.
      assert.deepEqual(o.during.map((m) => m.healthy), [0, 0], `cellgate_cluster_healthy during outage ${n}`);
    }
    console.log(`# outages: ${JSON.stringify(outages.map((o) => ({
      resumeA_ms: o.resumeA, resumeB_ms: o.resumeB, readyA_ms: o.readyAfter0, readyB_ms: o.readyAfter1,
    })))}`);
    console.log(`# metrics before ${JSON.stringify(before0)} after ${JSON.stringify(after0)}`);
    assert.deepEqual(after0.map((m) => m.healthy), [1, 1], 'healthy again');
    // With Redis gone the pods refuse posts before broadcasting (counted as
    // rejections); cellgate_cluster_publish_errors_total counts broadcasts
    // Redis did not take, which the test below provokes.
    for (const [i, m] of after0.entries()) {
      assert.ok(m.rejectedCluster + m.rejectedShared > before0[i].rejectedCluster + before0[i].rejectedShared,
        `pod ${i}: the refused posts are counted`);
      assert.equal(m.dropped, 0, `pod ${i}: no message that reached the pod was dropped`);
    }
  });

test('a pod cut off from Redis alone: the other pod acknowledges nothing the cut-off pod missed',
  { timeout: 120_000 }, async () => {
    const { classroom, tokens } = room;
    const [podA, podB] = c.pods;
    const onA = await dashboard(podA.url, tokens[0], { classroom, transports: ['websocket'], tracker: c.sockets }).ready;
    const onB = await dashboard(podB.url, tokens[1], { classroom, transports: ['websocket'], tracker: c.sockets }).ready;
    const toB = student(podB.url, c.student('s-0003', classroom, 3), 3, classroom, 20);
    const ready = readinessWatch(c.pods);
    const before0 = await Promise.all(c.pods.map(clusterMetrics));
    let cut;
    let back;
    let during0;
    try {
      await sleep(1500);
      // Pod A alone loses Redis: its connections are closed and it may not
      // log in again; pod B still hears Redis.
      cut = Date.now();
      await redisCli(redis.url, 'ACL', 'SETUSER', POD_A_USER, 'off');
      await redisCli(redis.url, 'CLIENT', 'KILL', 'USER', POD_A_USER);
      await sleep(CUT_MS);
      during0 = await Promise.all(c.pods.map(clusterMetrics));
      await redisCli(redis.url, 'ACL', 'SETUSER', POD_A_USER, 'on');
      back = Date.now();
      await sleep(RESUME_BOUND_MS + 1000);
    } finally {
      toB.stopped = true;
      await toB.done;
      ready.stopped = true;
      await ready.done;
    }
    await sleep(1500);
    const when = (t) => `${t - cut} ms after the cut, ${t - back} ms after A was let back in`;
    assert.deepEqual(undelivered({ B: [toB, onB], A: [{ accepted: new Map() }, onA] }, when), [],
      'events acknowledged by B that A did not deliver');
    const during = toB.attempts.filter((a) => a.at > cut + 500 && a.answeredAt < back);
    assert.ok(during.length > 10, `B kept being posted to (${during.length})`);
    assert.deepEqual([...new Set(during.map((a) => a.status))], [503], 'B answers 503 while A cannot hear');
    const samples = (i) => ready.samples[i].filter((x) => x.at > cut && x.at < back + 1000);
    assert.ok(samples(0).some((x) => x.status === 503 && x.cluster === 'unavailable'), 'A says it is not ready');
    assert.deepEqual([...new Set(samples(1).map((x) => x.status))], [200], 'B, which hears Redis, stays ready');
    const first = [...toB.accepted.values()].filter((a) => a.answeredAt > back).sort((x, y) => x.answeredAt - y.answeredAt)[0];
    assert.ok(first && first.answeredAt - back <= RESUME_BOUND_MS,
      `posts to B accepted again ${first && first.answeredAt - back} ms after A was let back in`);
    console.log(`# cut-off pod: B accepted again ${first.answeredAt - back} ms after A was let back in`);

    // The metrics: A said it could not hear; B counted every broadcast A
    // missed as a publish error; nothing that arrived was dropped.
    const after0 = await Promise.all(c.pods.map(clusterMetrics));
    assert.deepEqual(during0.map((m) => m.healthy), [0, 1], 'cellgate_cluster_healthy during the cut (A, B)');
    assert.deepEqual(after0.map((m) => m.healthy), [1, 1], 'cellgate_cluster_healthy after');
    const refusedByB = toB.attempts.filter((a) => a.status === 503).length;
    assert.ok(after0[1].publishErrors - before0[1].publishErrors >= refusedByB,
      `B's cellgate_cluster_publish_errors_total rose by ${after0[1].publishErrors - before0[1].publishErrors} ` +
      `for ${refusedByB} refused posts`);
    assert.deepEqual(after0.map((m) => m.dropped), [0, 0], 'cellgate_cluster_messages_dropped_total');
  });

test('help claims during an outage: refused until every pod can hear of them, then announced everywhere',
  { timeout: 120_000 }, async () => {
    const { classroom, tokens } = room;
    const [podA, podB] = c.pods;
    const onA = await dashboard(podA.url, tokens[0], { classroom, transports: ['websocket'], tracker: c.sockets }).ready;
    const onB = await dashboard(podB.url, tokens[1], { classroom, transports: ['websocket'], tracker: c.sockets }).ready;
    const help = helpEvent({ classroom, seat: 5, student: 's-0005', message: 'stuck' });
    const posted = await post(podB.url, c.student('s-0005', classroom, 5), help);
    assert.equal(posted.status, 202, JSON.stringify(posted.body));
    const { request_id: requestId } = await onA.rec.waitFor('help_requested', (h) => h.student === 's-0005');
    const claim = () => onA.socket.timeout(10_000).emitWithAck('claim_help', { request_id: requestId });

    await redis.kill();
    try {
      // Once pod A knows it cannot reach the others (the probe needs ~2 s),
      // it decides nothing: a claim only pod A's dashboards heard of would
      // leave pod B's instructors helping the same student.
      await waitFor(async () => (await get(podA.url, '/readyz')).status === 503, 10_000);
      const refused = await claim();
      assert.deepEqual(refused, { ok: false, error: 'unavailable' });
    } finally {
      await redis.start();
    }
    await waitFor(async () => (await Promise.all(c.pods.map((p) => get(p.url, '/readyz'))))
      .every((r) => r.status === 200), 15_000);

    assert.deepEqual(onB.rec.all('help_claimed', (h) => h.request_id === requestId), [],
      'the refused claim was announced nowhere');
    const won = await claim();
    assert.deepEqual(won, { ok: true });
    for (const d of [onA, onB]) {
      const heard = await d.rec.waitFor('help_claimed', (h) => h.request_id === requestId, 5000);
      assert.equal(heard.by.name.length > 0, true);
    }
    // Asking again as the holder announces it again: what a dashboard does
    // when an earlier announcement may have been lost.
    assert.deepEqual(await claim(), { ok: true });
    await waitFor(() => onB.rec.all('help_claimed', (h) => h.request_id === requestId).length >= 2, 5000);
  });

async function waitFor(check, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await sleep(100);
  }
}
