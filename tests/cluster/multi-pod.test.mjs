// Three `cellgate serve` pods on loopback sharing the machine's Redis and one
// PostgreSQL database: what one pod hears, every pod's dashboards see, and
// everything that must be decided once is decided once.
//
//   tests/cluster/run.sh     (or: node --test tests/cluster/multi-pod.test.mjs)

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';

import { cellEvent, eventually, helpEvent } from '../e2e/lib/helpers.mjs';
import {
  SESSION_TTL_SECS, dashboard, dashboards, post, redisCli, sleep, snapshot, startCluster,
} from './lib/cluster.mjs';

const T = { timeout: 120_000 };

describe('three pods on one Redis', () => {
  let c;
  before(async () => { c = await startCluster({ pods: 3 }); });
  after(async () => { await c?.stop(); });

  const onPod = (i, token, opts) => dashboard(c.pods[i].url, token, { tracker: c.sockets, ...opts }).ready;

  test('a dashboard on pod A receives an event POSTed to pod B, with the seat it changed', T, async () => {
    const { classroom, tokens } = await c.seed({ instructors: 3, name: 'fanout' });
    const ds = await Promise.all([0, 1, 2].map((i) => onPod(i, tokens[i], { classroom })));
    assert.deepEqual(ds.map((d) => d.joins[0].node), c.pods.map((p) => p.node));

    const ev = cellEvent({ classroom, seat: 12, student: 's-0012', status: 'error' });
    const r = await post(c.pods[1].url, c.student('s-0012', classroom, 12), ev);
    assert.equal(r.status, 202, JSON.stringify(r.body));
    assert.equal(r.body.accepted, 1);

    for (const d of ds) {
      const got = await d.rec.waitFor('cell_executed', (p) => p.id === ev.id, 5000);
      assert.equal(got.cell_id, ev.cell_id);
      const seat = await d.rec.waitFor('seat_updated', (p) => p.seat === 12, 5000);
      assert.deepEqual([seat.status, seat.errors, seat.student], ['error', 1, 's-0012']);
    }
    // The seat map lives in Redis: pod C reports what pod B changed.
    const snap = await snapshot(c.pods[2].url, classroom, tokens[2]);
    const seat = snap.seats.find((s) => s.seat === 12);
    assert.deepEqual([seat.status, seat.errors, seat.student], ['error', 1, 's-0012']);
  });

  test('presence lists the instructors of every pod, and each pod hears the others come and go', T, async () => {
    const { classroom, people, tokens } = await c.seed({ instructors: 3, name: 'presence' });
    const a = await onPod(0, tokens[0], { classroom });
    const b = await onPod(1, tokens[1], { classroom });
    const cc = await onPod(2, tokens[2], { classroom });

    // The last to join sees everyone in its snapshot, whatever pod they are on.
    const names = cc.joins[0].snapshot.instructors.map((i) => i.name).sort();
    assert.deepEqual(names, people.map((p) => p.name).sort());
    for (const i of [0, 1, 2]) {
      const snap = await snapshot(c.pods[i].url, classroom, tokens[i]);
      assert.deepEqual(snap.instructors.map((x) => x.name).sort(), names, `snapshot on pod ${i}`);
    }
    // Pod A's dashboard heard C arrive.
    const cId = cc.accepted[0].instructor.id;
    await a.rec.waitFor('instructor_status', (p) => p.instructor.id === cId && p.status === 'available');

    // A status set on pod B reaches pod A and C; leaving pod C is "offline" on A and B.
    assert.deepEqual(await b.socket.timeout(5000).emitWithAck('set_status', { status: 'helping' }), { ok: true });
    const bId = b.accepted[0].instructor.id;
    for (const d of [a, cc]) {
      await d.rec.waitFor('instructor_status', (p) => p.instructor.id === bId && p.status === 'helping');
    }
    cc.socket.disconnect();
    for (const d of [a, b]) {
      await d.rec.waitFor('instructor_status', (p) => p.instructor.id === cId && p.status === 'offline');
    }
    const left = await snapshot(c.pods[0].url, classroom, tokens[0]);
    assert.deepEqual(left.instructors.map((x) => [x.name, x.status]).sort(),
      [[people[0].name, 'available'], [people[1].name, 'helping']]);
  });

  test('20 instructors on three pods race to claim one help request: exactly one wins', T, async () => {
    const { classroom, tokens } = await c.seed({ instructors: 20, name: 'race' });
    const ds = await dashboards(20, (k) => dashboard(c.pods[k % 3].url, tokens[k], {
      classroom, transports: ['websocket'], tracker: c.sockets,
    }), { batch: 10 });

    const help = helpEvent({ classroom, seat: 7, student: 's-0007' });
    const r = await post(c.pods[1].url, c.student('s-0007', classroom, 7), help);
    assert.equal(r.status, 202, JSON.stringify(r.body));
    await Promise.all(ds.map((d) => d.rec.waitFor('help_requested', (p) => p.request_id === help.id)));

    // Everyone at once, from all three pods.
    const answers = await Promise.all(ds.map((d) =>
      d.socket.timeout(10_000).emitWithAck('claim_help', { request_id: help.id })));
    const winners = answers.map((a, k) => [a, k]).filter(([a]) => a.ok === true);
    assert.equal(winners.length, 1, `exactly one winner: ${JSON.stringify(answers)}`);
    const winner = ds[winners[0][1]].accepted[0].instructor;
    for (const a of answers.filter((x) => x.ok !== true)) {
      assert.equal(a.error, 'already_claimed', JSON.stringify(a));
      assert.deepEqual(a.by, { id: winner.id, name: winner.name });
    }
    // Every dashboard, on every pod, hears of that one claim, once.
    for (const d of ds) {
      const claim = await d.rec.waitFor('help_claimed', (p) => p.request_id === help.id);
      assert.equal(claim.by.id, winner.id);
    }
    await sleep(300);
    for (const d of ds) assert.equal(d.rec.all('help_claimed', (p) => p.request_id === help.id).length, 1);
  });

  test('an event posted again to a different pod is a duplicate, and is delivered once', T, async () => {
    const { classroom, tokens } = await c.seed({ instructors: 1, name: 'dup' });
    const d = await onPod(2, tokens[0], { classroom });
    const student = c.student('s-0003', classroom, 3);
    const cell = cellEvent({ classroom, seat: 3, student: 's-0003', status: 'ok' });
    const help = helpEvent({ classroom, seat: 3, student: 's-0003' });

    const first = await post(c.pods[0].url, student, [cell, help]);
    assert.equal(first.status, 202, JSON.stringify(first.body));
    assert.deepEqual([first.body.accepted, first.body.duplicates], [2, 0]);
    for (const i of [1, 2]) {
      const again = await post(c.pods[i].url, student, [cell, help]);
      assert.equal(again.status, 202, JSON.stringify(again.body));
      assert.deepEqual([again.body.accepted, again.body.duplicates], [0, 2], `retry on pod ${i}`);
      assert.deepEqual(again.body.duplicate_ids.sort(), [cell.id, help.id].sort());
    }
    await d.rec.waitFor('help_requested', (p) => p.request_id === help.id);
    await sleep(500);
    assert.equal(d.rec.all('cell_executed', (p) => p.id === cell.id).length, 1);
    assert.equal(d.rec.all('help_requested', (p) => p.request_id === help.id).length, 1);
    const seat = (await snapshot(c.pods[1].url, classroom, tokens[0])).seats.find((s) => s.seat === 3);
    assert.equal(seat.status, 'help');
  });

  test('seat state is decided once: 30 errors of one seat posted at once through three pods count 30', T, async () => {
    const { classroom, tokens } = await c.seed({ instructors: 1, name: 'seat' });
    const student = c.student('s-0005', classroom, 5);
    const answers = await Promise.all(Array.from({ length: 30 }, (_, k) => post(c.pods[k % 3].url, student,
      cellEvent({ classroom, seat: 5, student: 's-0005', status: 'error' }))));
    assert.deepEqual([...new Set(answers.map((r) => r.status))], [202]);
    for (const i of [0, 1, 2]) {
      const seat = (await snapshot(c.pods[i].url, classroom, tokens[0])).seats.find((x) => x.seat === 5);
      assert.deepEqual([seat.status, seat.errors], ['error', 30], `seat 5 on pod ${i}`);
    }
  });

  test('one session entry per socket in Redis: refreshed while it lives, deleted on disconnect', T, async () => {
    const { classroom, tokens } = await c.seed({ instructors: 2, name: 'sessions' });
    const a = await onPod(0, tokens[0], { classroom });
    const a2 = await onPod(0, tokens[0], { classroom });
    const b = await onPod(1, tokens[1], { classroom });
    const entry = async (d) => {
      const [raw] = await redisCli(c.redisUrl, 'GET', c.key('session', d.accepted[0].sid));
      return raw ? JSON.parse(raw) : null;
    };
    const ttl = async (d) => Number((await redisCli(c.redisUrl, 'PTTL', c.key('session', d.accepted[0].sid)))[0]);

    for (const [d, pod] of [[a, 0], [a2, 0], [b, 1]]) {
      const e = await entry(d);
      assert.ok(e, 'a session entry exists');
      assert.equal(e.pod, c.pods[pod].node);
      assert.equal(e.instructor_id, d.accepted[0].instructor.id);
      assert.equal(JSON.stringify(e).includes(tokens[0]) || JSON.stringify(e).includes(tokens[1]), false,
        'no token is stored');
      const left = await ttl(d);
      assert.ok(left > 0 && left <= SESSION_TTL_SECS * 1000, `TTL ${left} ms`);
    }
    // Outliving the TTL: the pod refreshes what is still connected.
    await sleep(SESSION_TTL_SECS * 1000 + 1500);
    for (const d of [a, a2, b]) assert.ok((await ttl(d)) > 0, 'still there after a full TTL');

    const sid = a2.accepted[0].sid;
    a2.socket.disconnect();
    await eventually(async () => (await redisCli(c.redisUrl, 'EXISTS', c.key('session', sid)))[0] === '0',
      { timeout: 3000, message: 'session entry deleted on disconnect' });
    assert.ok(await entry(a), "the instructor's other socket keeps its entry");
    const snap = await snapshot(c.pods[2].url, classroom, tokens[1]);
    assert.equal(snap.instructors.length, 2, 'the instructor is still present through the other socket');
  });

  test('a live dashboard whose presence entry was swept is listed again, and the classroom hears it is back', T, async () => {
    // What a pod cut off from Redis for longer than the TTL finds on its
    // return: another pod swept its entries and announced its instructors gone.
    const { classroom, people, tokens } = await c.seed({ instructors: 2, name: 'swept' });
    const a = await onPod(0, tokens[0], { classroom });
    const b = await onPod(1, tokens[1], { classroom });
    const { sid, instructor } = a.accepted[0];
    const removed = await redisCli(c.redisUrl, 'ZREM', c.key('presence', classroom), `${instructor.id}|${sid}|${people[0].name}`);
    assert.deepEqual(removed, ['1'], 'the entry was there to remove');
    const without = await snapshot(c.pods[2].url, classroom, tokens[1]);
    assert.deepEqual(without.instructors.map((i) => i.name), [people[1].name]);

    const back = await b.rec.waitFor('instructor_status', (p) => p.instructor.id === instructor.id,
      SESSION_TTL_SECS * 1000 / 3 + 3000);
    assert.equal(back.status, 'available');
    const again = await snapshot(c.pods[2].url, classroom, tokens[1]);
    assert.deepEqual(again.instructors.map((i) => i.name).sort(), [people[0].name, people[1].name].sort());
  });

});

describe('a pod killed with SIGKILL', () => {
  let c;
  let other;
  before(async () => {
    c = await startCluster({ pods: 2 });
    other = await startCluster({ pods: 1 });
  });
  after(async () => { await Promise.all([c?.stop(), other?.stop()]); });

  test('holds its cluster\'s broadcasts back (503) for at most 5 s, and no other cluster\'s on the same Redis', T, async () => {
    const { classroom } = await c.seed({ instructors: 1, name: 'crash-hold' });
    const elsewhere = await other.seed({ instructors: 1, name: 'crash-elsewhere' });
    const postTo = (cluster, url, room) => post(url, cluster.student('s-0001', room, 1),
      cellEvent({ classroom: room, seat: 1, student: 's-0001', status: 'ok' }));
    assert.equal((await postTo(c, c.pods[1].url, classroom)).status, 202);
    await sleep(1500); // the pods have heard each other's probes

    await c.kill(0);
    const killedAt = Date.now();
    assert.equal((await postTo(other, other.pods[0].url, elsewhere.classroom)).status, 202,
      'a cluster with another prefix does not wait for the dead pod');
    const answers = [];
    for (;;) {
      const r = await postTo(c, c.pods[1].url, classroom);
      answers.push([Date.now() - killedAt, r.status]);
      if (r.status === 202 || Date.now() - killedAt > 15_000) break;
      assert.equal(r.status, 503, JSON.stringify(r.body));
      await sleep(200);
    }
    const [acceptedAfter, status] = answers[answers.length - 1];
    console.log(`# the survivor accepted posts again ${acceptedAfter} ms after kill -9 (${answers.length - 1} refused)`);
    assert.equal(status, 202);
    assert.ok(acceptedAfter <= 5000 + 2000, `accepted again ${acceptedAfter} ms after the crash`);
  });

  test(`leaves presence and Redis within the session TTL (${SESSION_TTL_SECS} s), and the others are told`, T, async () => {
    await c.startPod(0);
    const { classroom, people, tokens } = await c.seed({ instructors: 2, name: 'crash' });
    const onA = await dashboard(c.pods[0].url, tokens[0], { classroom, tracker: c.sockets }).ready;
    const onB = await dashboard(c.pods[1].url, tokens[1], { classroom, tracker: c.sockets }).ready;
    const sidA = onA.accepted[0].sid;
    const before = await snapshot(c.pods[1].url, classroom, tokens[1]);
    assert.deepEqual(before.instructors.map((i) => i.name).sort(), [people[0].name, people[1].name].sort());

    const idA = onA.accepted[0].instructor.id;
    await c.kill(0);
    const killedAt = Date.now();
    // The survivor's dashboard hears that pod A's instructor went offline,
    // once: the survivor sweeps the entries its dead peer no longer refreshes.
    const offline = onB.rec.waitFor('instructor_status', (p) => p.instructor.id === idA && p.status === 'offline',
      SESSION_TTL_SECS * 1000 + 5000);
    const gone = await eventually(async () => {
      const snap = await snapshot(c.pods[1].url, classroom, tokens[1]);
      return snap.instructors.every((i) => i.name !== people[0].name) && snap;
    }, { timeout: SESSION_TTL_SECS * 1000 + 3000, interval: 200, message: "pod A's instructor leaves presence" });
    const after = Date.now() - killedAt;
    console.log(`# presence cleared ${after} ms after kill -9 (TTL ${SESSION_TTL_SECS} s)`);
    assert.ok(after <= SESSION_TTL_SECS * 1000 + 1000, `cleared after ${after} ms`);
    assert.deepEqual(gone.instructors.map((i) => i.name), [people[1].name]);
    const told = await offline;
    assert.deepEqual(told.instructor, { id: idA, name: people[0].name });
    const toldAfter = Date.now() - killedAt;
    console.log(`# the survivor's dashboard was told ${toldAfter} ms after kill -9`);
    assert.ok(toldAfter <= SESSION_TTL_SECS * 1000 + SESSION_TTL_SECS * 1000 / 3 + 1500, `told after ${toldAfter} ms`);
    await sleep(SESSION_TTL_SECS * 1000 / 3 + 500); // another sweep: nothing more to say
    assert.equal(onB.rec.all('instructor_status', (p) => p.instructor.id === idA && p.status === 'offline').length, 1,
      'the departure is announced once');
    assert.deepEqual(await redisCli(c.redisUrl, 'EXISTS', c.key('session', sidA)), ['0']);
    // The survivor keeps its own.
    assert.deepEqual(await redisCli(c.redisUrl, 'EXISTS', c.key('session', onB.accepted[0].sid)), ['1']);
  });
});
