// join_classroom / leave_classroom / set_status acknowledgements, and the
// HTTP snapshot endpoint.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startGateway, DBS } from './lib/gateway.mjs';
import {
  T, PEOPLE, seedDirectory, connectDashboard, ack, close, sleep, getSnapshotHttp, craft,
  instructorClaims, signJwt, studentToken, assertNoSecretsInLogs,
} from './lib/helpers.mjs';

function assertEmptySnapshot(snapshot, classroom, seats) {
  assert.equal(typeof snapshot, 'object');
  assert.equal(snapshot.classroom, classroom);
  assert.ok(Array.isArray(snapshot.seats), 'seats is an array');
  assert.equal(snapshot.seats.length, seats, 'one entry per seat');
  snapshot.seats.forEach((s, i) => {
    assert.equal(s.seat, i + 1, `seat #${i} is numbered ${i + 1}`);
    assert.equal(s.student, null, `seat ${i + 1} has no student`);
    assert.equal(s.status, 'idle', `seat ${i + 1} is idle`);
    assert.equal(s.errors, 0, `seat ${i + 1} has 0 errors`);
    assert.ok('last_event_at' in s, `seat ${i + 1} has last_event_at`);
    assert.equal(s.last_event_at, null, `seat ${i + 1} last_event_at is null`);
  });
  assert.ok(Array.isArray(snapshot.help_queue), 'help_queue is an array');
  assert.equal(snapshot.help_queue.length, 0, 'no help requests yet');
  assert.ok(Array.isArray(snapshot.instructors), 'instructors is an array');
  for (const i of snapshot.instructors) {
    assert.ok('id' in i && typeof i.name === 'string' && typeof i.status === 'string',
      `instructor entry ${JSON.stringify(i)}`);
  }
}

for (const db of DBS) {
  describe(`classrooms (${db})`, { concurrency: false }, () => {
    let gw;
    let tokens;
    let alice;
    let bob;
    let carol;

    before(async () => {
      gw = await startGateway({ db });
      tokens = await seedDirectory(gw);
      alice = await connectDashboard(gw, { token: tokens.alice });
      bob = await connectDashboard(gw, { token: tokens.bob });
      carol = await connectDashboard(gw, { token: tokens.carol });
    });
    after(async () => { await gw?.stop(); });

    test('join_classroom returns the snapshot: 200 idle seats of the right classroom', T, async () => {
      const res = await ack(alice.socket, 'join_classroom', { classroom: 'cls-101' });
      assert.equal(res.ok, true, JSON.stringify(res));
      assertEmptySnapshot(res.snapshot, 'cls-101', 200);
    });

    test('join_classroom on a classroom added with --seats 30 has 30 seats', T, async () => {
      const res = await ack(alice.socket, 'join_classroom', { classroom: 'cls-small' });
      assert.equal(res.ok, true, JSON.stringify(res));
      assertEmptySnapshot(res.snapshot, 'cls-small', 30);
    });

    test('join_classroom by an instructor who is not staff -> forbidden', T, async () => {
      const res = await ack(carol.socket, 'join_classroom', { classroom: 'cls-101' });
      assert.equal(res.ok, false);
      assert.equal(res.error, 'forbidden');
      assert.equal(res.snapshot, undefined, 'no snapshot leaks to non-staff');
    });

    test('join_classroom of a classroom that does not exist -> not_found', T, async () => {
      const res = await ack(alice.socket, 'join_classroom', { classroom: 'cls-does-not-exist' });
      assert.equal(res.ok, false);
      assert.equal(res.error, 'not_found');
    });

    for (const [label, payload] of [
      ['{}', {}],
      ['a number', 42],
      ['{ classroom: 42 }', { classroom: 42 }],
      ['{ classroom: null }', { classroom: null }],
    ]) {
      test(`join_classroom with ${label} -> bad_request, and the socket stays connected`, T, async () => {
        let disconnected = null;
        const onDisc = (reason) => { disconnected = reason; };
        bob.socket.on('disconnect', onDisc);
        try {
          const res = await ack(bob.socket, 'join_classroom', payload);
          assert.equal(res.ok, false, JSON.stringify(res));
          assert.equal(res.error, 'bad_request');
          assert.equal(typeof res.detail, 'string', `detail is a string: ${JSON.stringify(res)}`);
          assert.ok(res.detail.length > 0, 'detail is not empty');
          await sleep(300);
          assert.equal(disconnected, null, 'no disconnect');
          assert.equal(bob.socket.connected, true);
          const again = await ack(bob.socket, 'join_classroom', { classroom: 'cls-101' });
          assert.equal(again.ok, true, 'the same socket can still join');
        } finally {
          bob.socket.off('disconnect', onDisc);
        }
      });
    }

    test('leave_classroom -> { ok: true }', T, async () => {
      const join = await ack(bob.socket, 'join_classroom', { classroom: 'cls-101' });
      assert.equal(join.ok, true);
      const res = await ack(bob.socket, 'leave_classroom', { classroom: 'cls-101' });
      assert.deepEqual(res, { ok: true });
      const bad = await ack(bob.socket, 'leave_classroom', 7);
      assert.equal(bad.ok, false);
      assert.equal(bad.error, 'bad_request');
      assert.equal(bob.socket.connected, true);
    });

    test('set_status: ack ok, the room sees instructor_status, the snapshot lists the status', T, async () => {
      assert.equal((await ack(alice.socket, 'join_classroom', { classroom: 'cls-101' })).ok, true);
      assert.equal((await ack(bob.socket, 'join_classroom', { classroom: 'cls-101' })).ok, true);
      const res = await ack(alice.socket, 'set_status', { status: 'helping' });
      assert.deepEqual(res, { ok: true });
      const seen = await bob.rec.waitFor('instructor_status',
        (p) => p?.instructor?.id === alice.accepted.instructor.id && p.status === 'helping');
      assert.deepEqual(seen, {
        instructor: { id: alice.accepted.instructor.id, name: PEOPLE.alice.name },
        status: 'helping',
      });
      const snap = await getSnapshotHttp(gw, 'cls-101', tokens.bob);
      assert.equal(snap.status, 200);
      const me = snap.body.instructors.find((i) => i.id === alice.accepted.instructor.id);
      assert.ok(me, `alice is listed among the online instructors: ${JSON.stringify(snap.body.instructors)}`);
      assert.equal(me.name, PEOPLE.alice.name);
      assert.equal(me.status, 'helping');
      const away = await ack(alice.socket, 'set_status', { status: 'away' });
      assert.deepEqual(away, { ok: true });
      await bob.rec.waitFor('instructor_status',
        (p) => p?.instructor?.id === alice.accepted.instructor.id && p.status === 'away');
    });

    test('set_status with an unknown status -> bad_request, socket stays connected', T, async () => {
      const res = await ack(alice.socket, 'set_status', { status: 'sleeping' });
      assert.equal(res.ok, false);
      assert.equal(res.error, 'bad_request');
      assert.equal(typeof res.detail, 'string');
      await sleep(200);
      assert.equal(alice.socket.connected, true);
    });

    test('GET snapshot over HTTP: 200 for staff, same content as join_classroom', T, async () => {
      const viaSocket = await ack(alice.socket, 'join_classroom', { classroom: 'cls-small' });
      const res = await getSnapshotHttp(gw, 'cls-small', tokens.alice);
      assert.equal(res.status, 200, res.text);
      assertEmptySnapshot(res.body, 'cls-small', 30);
      assert.deepEqual(res.body.seats, viaSocket.snapshot.seats);
      assert.deepEqual(res.body.help_queue, viaSocket.snapshot.help_queue);
    });

    test('GET snapshot over HTTP: 401 without a token or with a bad one', T, async () => {
      const none = await getSnapshotHttp(gw, 'cls-101', null);
      assert.equal(none.status, 401, none.text);
      const badTok = signJwt(instructorClaims(PEOPLE.alice.email), 'not-the-secret-not-the-secret-not-the-secret!!');
      gw.tokens.add(badTok);
      const bad = await getSnapshotHttp(gw, 'cls-101', badTok);
      assert.equal(bad.status, 401, bad.text);
      const expired = craft(gw, instructorClaims(PEOPLE.alice.email, { iat: 1, exp: Math.floor(Date.now() / 1000) - 120 }));
      const exp = await getSnapshotHttp(gw, 'cls-101', expired);
      assert.equal(exp.status, 401, exp.text);
    });

    test('GET snapshot over HTTP: 403 for an instructor who is not staff', T, async () => {
      const res = await getSnapshotHttp(gw, 'cls-101', tokens.carol);
      assert.equal(res.status, 403, res.text);
      assert.equal(res.body?.seats, undefined, 'no snapshot content');
    });

    test('GET snapshot over HTTP: a student token is not enough', T, async () => {
      const tok = await studentToken(gw, 's-0042', 'cls-101', 42);
      const res = await getSnapshotHttp(gw, 'cls-101', tok);
      assert.ok(res.status === 401 || res.status === 403, `401 or 403, got ${res.status} ${res.text}`);
    });

    test('the gateway logs contain none of the tokens used', T, () => {
      close(gw, alice.socket);
      close(gw, bob.socket);
      close(gw, carol.socket);
      assertNoSecretsInLogs(gw);
    });
  });
}
