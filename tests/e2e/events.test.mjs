// The live flow: students POST events, two dashboards in the classroom see
// them; help requests are claimed (exactly one winner), resolved, cancelled;
// duplicates are applied once.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startGateway, DBS } from './lib/gateway.mjs';
import {
  T, PEOPLE, seedDirectory, studentToken, connectDashboard, ack, close, sleep, postEvents,
  getSnapshotHttp, cellEvent, helpEvent, cancelEvent, scrape, metricValue, eventually,
  isRfc3339, assertNoSecretsInLogs,
} from './lib/helpers.mjs';

/** The broadcast cell_executed must be the posted event plus received_at. */
function assertBroadcastOf(posted, got) {
  const { received_at: receivedAt, ...rest } = got;
  assert.ok(isRfc3339(receivedAt), `received_at is RFC 3339: ${receivedAt}`);
  assert.deepEqual(rest, posted, 'cell_executed carries the event as posted');
}

function seatOf(snapshot, n) {
  return snapshot.seats.find((s) => s.seat === n);
}

for (const db of DBS) {
  describe(`events and help requests (${db})`, { concurrency: false }, () => {
    let gw;
    let tokens;
    let alice;
    let bob;
    const students = {};

    before(async () => {
      gw = await startGateway({ db });
      tokens = await seedDirectory(gw);
      alice = await connectDashboard(gw, { token: tokens.alice });
      bob = await connectDashboard(gw, { token: tokens.bob, transports: ['polling', 'websocket'] });
      for (const d of [alice, bob]) {
        const r = await ack(d.socket, 'join_classroom', { classroom: 'cls-101' });
        assert.equal(r.ok, true, `join: ${JSON.stringify(r)}`);
      }
      for (const n of [7, 8, 9, 42, 43, 44, 45]) {
        const id = `s-${String(n).padStart(4, '0')}`;
        students[n] = { id, seat: n, token: await studentToken(gw, id, 'cls-101', n) };
      }
    });
    after(async () => { await gw?.stop(); });

    const snapshot = async () => {
      const r = await getSnapshotHttp(gw, 'cls-101', tokens.alice);
      assert.equal(r.status, 200, r.text);
      return r.body;
    };

    test('a POSTed cell_executed (error) reaches both dashboards as cell_executed and seat_updated', T, async () => {
      const ingestedBefore = metricValue(await scrape(gw), 'cellgate_events_ingested_total') ?? 0;
      const ev = cellEvent({ seat: 42, student: 's-0042' });
      const res = await postEvents(gw, students[42].token, ev);
      assert.equal(res.status, 202, res.text);
      assert.equal(res.body.accepted, 1);
      assert.equal(res.body.duplicates, 0);

      for (const d of [alice, bob]) {
        const got = await d.rec.waitFor('cell_executed', (p) => p?.id === ev.id);
        assertBroadcastOf(ev, got);
        const seat = await d.rec.waitFor('seat_updated', (p) => p?.seat === 42);
        assert.equal(seat.student, 's-0042');
        assert.equal(seat.status, 'error');
        assert.equal(seat.errors, 1);
        assert.ok(isRfc3339(seat.last_event_at), `last_event_at: ${seat.last_event_at}`);
      }

      const s42 = seatOf(await snapshot(), 42);
      assert.equal(s42.student, 's-0042');
      assert.equal(s42.status, 'error');
      assert.equal(s42.errors, 1);
      assert.ok(isRfc3339(s42.last_event_at));
      // and a fresh join sees the same
      const rejoin = await ack(bob.socket, 'join_classroom', { classroom: 'cls-101' });
      assert.deepEqual(seatOf(rejoin.snapshot, 42), s42);

      await eventually(async () =>
        (metricValue(await scrape(gw), 'cellgate_events_ingested_total') ?? 0) >= ingestedBefore + 1,
      { message: 'cellgate_events_ingested_total +1' });
    });

    test('a later ok execution makes the seat active', T, async () => {
      const ev = cellEvent({ seat: 42, student: 's-0042', status: 'ok', execution_count: 8 });
      const res = await postEvents(gw, students[42].token, ev);
      assert.equal(res.status, 202, res.text);
      for (const d of [alice, bob]) {
        const got = await d.rec.waitFor('cell_executed', (p) => p?.id === ev.id);
        assertBroadcastOf(ev, got);
        await d.rec.waitFor('seat_updated', (p) => p?.seat === 42 && p.status === 'active');
      }
      assert.equal(seatOf(await snapshot(), 42).status, 'active');
    });

    test('a duplicate POST is applied once: second answer says duplicate, dashboards see it once', T, async () => {
      const ev = cellEvent({ seat: 43, student: 's-0043' });
      const first = await postEvents(gw, students[43].token, ev);
      assert.equal(first.status, 202, first.text);
      assert.equal(first.body.accepted, 1);
      assert.equal(first.body.duplicates, 0);

      const second = await postEvents(gw, students[43].token, ev);
      assert.equal(second.status, 202, second.text);
      assert.equal(second.body.accepted, 0);
      assert.equal(second.body.duplicates, 1);
      assert.deepEqual(second.body.duplicate_ids, [ev.id]);

      await alice.rec.waitFor('cell_executed', (p) => p?.id === ev.id);
      await bob.rec.waitFor('cell_executed', (p) => p?.id === ev.id);
      await sleep(1000);
      assert.equal(alice.rec.all('cell_executed', (p) => p?.id === ev.id).length, 1, 'alice saw it once');
      assert.equal(bob.rec.all('cell_executed', (p) => p?.id === ev.id).length, 1, 'bob saw it once');
      assert.equal(seatOf(await snapshot(), 43).errors, 1, 'the error was counted once');
    });

    test('a batch mixing a seen and a new event: accepted 1, duplicates 1', T, async () => {
      const seen = cellEvent({ seat: 44, student: 's-0044' });
      assert.equal((await postEvents(gw, students[44].token, seen)).status, 202);
      const fresh = cellEvent({ seat: 44, student: 's-0044', cell_id: 'zz9', status: 'ok' });
      const res = await postEvents(gw, students[44].token, [seen, fresh]);
      assert.equal(res.status, 202, res.text);
      assert.equal(res.body.accepted, 1);
      assert.equal(res.body.duplicates, 1);
      assert.deepEqual(res.body.duplicate_ids, [seen.id]);
      await alice.rec.waitFor('cell_executed', (p) => p?.id === fresh.id);
      await sleep(500);
      assert.equal(alice.rec.all('cell_executed', (p) => p?.id === seen.id).length, 1);
    });

    test('help: requested -> both see it; simultaneous claims -> one winner; claimed; resolved', T, async () => {
      const ev = helpEvent({ seat: 7, student: 's-0007', message: 'My plot is empty' });
      const res = await postEvents(gw, students[7].token, ev);
      assert.equal(res.status, 202, res.text);
      assert.equal(res.body.accepted, 1);

      for (const d of [alice, bob]) {
        const hr = await d.rec.waitFor('help_requested', (p) => p?.request_id === ev.id);
        assert.equal(hr.request_id, ev.id, 'the request id is the event id');
        assert.equal(hr.classroom, 'cls-101');
        assert.equal(hr.seat, 7);
        assert.equal(hr.student, 's-0007');
        assert.equal(hr.message, 'My plot is empty');
        assert.equal(hr.status, 'open');
        assert.ok(isRfc3339(hr.created_at), `created_at: ${hr.created_at}`);
      }
      const queued = (await snapshot()).help_queue.find((h) => h.request_id === ev.id);
      assert.ok(queued, 'the request is in the snapshot help_queue');
      assert.equal(queued.status, 'open');

      const [ra, rb] = await Promise.all([
        ack(alice.socket, 'claim_help', { request_id: ev.id }),
        ack(bob.socket, 'claim_help', { request_id: ev.id }),
      ]);
      const oks = [ra, rb].filter((r) => r.ok === true);
      assert.equal(oks.length, 1, `exactly one claim wins: ${JSON.stringify([ra, rb])}`);
      const [winner, loser, loserAck] = ra.ok ? [alice, bob, rb] : [bob, alice, ra];
      const winnerPerson = winner === alice ? PEOPLE.alice : PEOPLE.bob;
      assert.deepEqual(ra.ok ? ra : rb, { ok: true });
      assert.deepEqual(loserAck, {
        ok: false,
        error: 'already_claimed',
        by: { id: winner.accepted.instructor.id, name: winnerPerson.name },
      });

      for (const d of [alice, bob]) {
        const c = await d.rec.waitFor('help_claimed', (p) => p?.request_id === ev.id);
        assert.deepEqual(c.by, { id: winner.accepted.instructor.id, name: winnerPerson.name });
        assert.ok(isRfc3339(c.claimed_at), `claimed_at: ${c.claimed_at}`);
      }
      await sleep(300);
      for (const d of [alice, bob]) {
        assert.equal(d.rec.all('help_claimed', (p) => p?.request_id === ev.id).length, 1, 'one help_claimed each');
      }

      const again = await ack(loser.socket, 'claim_help', { request_id: ev.id });
      assert.equal(again.ok, false);
      assert.equal(again.error, 'already_claimed');

      const resolved = await ack(winner.socket, 'resolve_help', { request_id: ev.id });
      assert.deepEqual(resolved, { ok: true });
      for (const d of [alice, bob]) {
        const r = await d.rec.waitFor('help_resolved', (p) => p?.request_id === ev.id);
        assert.deepEqual(r.by, { id: winner.accepted.instructor.id, name: winnerPerson.name });
        assert.ok(isRfc3339(r.resolved_at), `resolved_at: ${r.resolved_at}`);
      }
      const after = (await snapshot()).help_queue.find((h) => h.request_id === ev.id);
      assert.ok(!after || after.status !== 'open', `resolved request no longer open: ${JSON.stringify(after)}`);
    });

    test('a help request puts the seat in status "help"', T, async () => {
      const ev = helpEvent({ seat: 9, student: 's-0009', message: undefined });
      const res = await postEvents(gw, students[9].token, ev);
      assert.equal(res.status, 202, res.text);
      const hr = await alice.rec.waitFor('help_requested', (p) => p?.request_id === ev.id);
      assert.ok(hr.message === null || hr.message === undefined || hr.message === '',
        `no message given: ${JSON.stringify(hr.message)}`);
      await alice.rec.waitFor('seat_updated', (p) => p?.seat === 9 && p.status === 'help');
      const s9 = seatOf(await snapshot(), 9);
      assert.equal(s9.status, 'help');
      assert.equal(s9.student, 's-0009');
    });

    test('help_cancelled: the room sees help_cancelled for the student\'s open request', T, async () => {
      const ev = helpEvent({ seat: 8, student: 's-0008' });
      assert.equal((await postEvents(gw, students[8].token, ev)).status, 202);
      await bob.rec.waitFor('help_requested', (p) => p?.request_id === ev.id);
      const cancel = cancelEvent({ seat: 8, student: 's-0008' });
      const res = await postEvents(gw, students[8].token, cancel);
      assert.equal(res.status, 202, res.text);
      assert.equal(res.body.accepted, 1);
      for (const d of [alice, bob]) {
        const c = await d.rec.waitFor('help_cancelled', (p) => p?.request_id === ev.id);
        assert.deepEqual(c, { request_id: ev.id });
      }
      const q = (await snapshot()).help_queue.find((h) => h.request_id === ev.id);
      assert.ok(!q || q.status !== 'open', `cancelled request no longer open: ${JSON.stringify(q)}`);
    });

    test('claim_help for an unknown request -> not_found; with a bad payload -> bad_request', T, async () => {
      const nf = await ack(alice.socket, 'claim_help', { request_id: '00000000-0000-4000-8000-000000000000' });
      assert.equal(nf.ok, false);
      assert.equal(nf.error, 'not_found');
      const bad = await ack(alice.socket, 'claim_help', {});
      assert.equal(bad.ok, false);
      assert.equal(bad.error, 'bad_request');
      assert.equal(alice.socket.connected, true);
    });

    test('after leave_classroom a dashboard no longer receives the room\'s broadcasts', T, async () => {
      const left = await ack(bob.socket, 'leave_classroom', { classroom: 'cls-101' });
      assert.deepEqual(left, { ok: true });
      const ev = cellEvent({ seat: 45, student: 's-0045' });
      assert.equal((await postEvents(gw, students[45].token, ev)).status, 202);
      await alice.rec.waitFor('cell_executed', (p) => p?.id === ev.id);
      await sleep(800);
      assert.equal(bob.rec.all('cell_executed', (p) => p?.id === ev.id).length, 0, 'bob left: no cell_executed');
      assert.equal(bob.rec.all('seat_updated', (p) => p?.seat === 45).length, 0, 'bob left: no seat_updated');
    });

    test('the gateway logs contain none of the tokens used', T, () => {
      close(gw, alice.socket);
      close(gw, bob.socket);
      assertNoSecretsInLogs(gw);
    });
  });
}
