// POST /api/v1/events refusals: 400 with per-field errors and nothing
// applied, 401, 403, 413 — and the batch limit of 500.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { startGateway, DBS, randomString } from './lib/gateway.mjs';
import {
  T, seedDirectory, studentToken, connectDashboard, ack, close, sleep, postEvents, rawPost,
  getSnapshotHttp, cellEvent, helpEvent, craft, signJwt, studentClaims, now, hasFieldError,
  scrape, metricValue, eventually, assertNoSecretsInLogs,
} from './lib/helpers.mjs';

for (const db of DBS) {
  describe(`event ingest refusals (${db})`, { concurrency: false }, () => {
    let gw;
    let tokens;
    let dash;
    let tok42; // s-0042, cls-101, seat 42
    let tokFree; // s-0100, cls-101, no seat claim

    before(async () => {
      gw = await startGateway({ db });
      tokens = await seedDirectory(gw);
      dash = await connectDashboard(gw, { token: tokens.alice });
      const j = await ack(dash.socket, 'join_classroom', { classroom: 'cls-101' });
      assert.equal(j.ok, true, JSON.stringify(j));
      tok42 = await studentToken(gw, 's-0042', 'cls-101', 42);
      tokFree = await studentToken(gw, 's-0100', 'cls-101');
    });
    after(async () => { await gw?.stop(); });

    const snapshot = async () => {
      const r = await getSnapshotHttp(gw, 'cls-101', tokens.alice);
      assert.equal(r.status, 200, r.text);
      return r.body;
    };

    /**
     * Nothing of `events` was applied: no broadcast names their ids, the
     * snapshot is unchanged, and each valid one can still be posted fresh.
     */
    async function assertNothingApplied(events, snapBefore, { repostWith } = {}) {
      await sleep(700);
      const ids = new Set(events.map((e) => e?.id).filter(Boolean));
      const leaked = dash.rec.events.filter((e) =>
        (e.name === 'cell_executed' && ids.has(e.payload?.id)) ||
        (e.name === 'help_requested' && ids.has(e.payload?.request_id)));
      assert.deepEqual(leaked.map((e) => [e.name, e.payload]), [], 'no broadcast for a refused body');
      const snapAfter = await snapshot();
      assert.deepEqual(snapAfter.seats, snapBefore.seats, 'seats unchanged');
      assert.deepEqual(snapAfter.help_queue, snapBefore.help_queue, 'help queue unchanged');
      if (repostWith) {
        for (const ev of repostWith.events) {
          const r = await postEvents(gw, repostWith.token, ev);
          assert.equal(r.status, 202, `re-posting a valid item of the refused body: ${r.text}`);
          assert.equal(r.body.accepted, 1, `the valid item was not stored before (not a duplicate): ${r.text}`);
          assert.equal(r.body.duplicates, 0);
        }
      }
    }

    test('400: an array whose item 1 has no type -> error at index 1 field type; item 0 not applied', T, async () => {
      const snap = await snapshot();
      const good = cellEvent({ seat: 42, student: 's-0042' });
      const bad = cellEvent({ seat: 42, student: 's-0042', type: undefined });
      const res = await postEvents(gw, tok42, [good, bad]);
      assert.equal(res.status, 400, res.text);
      assert.ok(hasFieldError(res.body, 1, 'type'), `errors: ${res.text}`);
      assert.ok(!res.body.errors.some((e) => e.index === 0), `item 0 is valid: ${res.text}`);
      await assertNothingApplied([good, bad], snap, { repostWith: { token: tok42, events: [good] } });
    });

    test('400: occurred_at that is not a timestamp -> field occurred_at', T, async () => {
      const snap = await snapshot();
      const ev = cellEvent({ seat: 42, student: 's-0042', occurred_at: 'yesterday at noon' });
      const res = await postEvents(gw, tok42, ev);
      assert.equal(res.status, 400, res.text);
      assert.ok(hasFieldError(res.body, 0, 'occurred_at'), `errors: ${res.text}`);
      await assertNothingApplied([ev], snap);
    });

    test('400: seat out of range (201 and 0 in a 200-seat classroom) -> field seat', T, async () => {
      const snap = await snapshot();
      const hi = cellEvent({ seat: 201, student: 's-0100' });
      const zero = cellEvent({ seat: 0, student: 's-0100' });
      const res = await postEvents(gw, tokFree, [hi, zero]);
      assert.equal(res.status, 400, res.text);
      assert.ok(hasFieldError(res.body, 0, 'seat'), `errors: ${res.text}`);
      assert.ok(hasFieldError(res.body, 1, 'seat'), `errors: ${res.text}`);
      await assertNothingApplied([hi, zero], snap);
    });

    test('400: a help message over 500 characters -> field message; exactly 500 is fine', T, async () => {
      const snap = await snapshot();
      const long = helpEvent({ seat: 100, student: 's-0100', message: 'x'.repeat(501) });
      const res = await postEvents(gw, tokFree, long);
      assert.equal(res.status, 400, res.text);
      assert.ok(hasFieldError(res.body, 0, 'message'), `errors: ${res.text}`);
      await assertNothingApplied([long], snap);

      const ok = helpEvent({ seat: 100, student: 's-0100', message: 'y'.repeat(500) });
      const res2 = await postEvents(gw, tokFree, ok);
      assert.equal(res2.status, 202, res2.text);
      const hr = await dash.rec.waitFor('help_requested', (p) => p?.request_id === ok.id);
      assert.equal(hr.message, 'y'.repeat(500));
      const cancel = await postEvents(gw, tokFree, {
        id: randomUUID(), type: 'help_cancelled', classroom: 'cls-101', seat: 100, student: 's-0100',
        occurred_at: new Date().toISOString(),
      });
      assert.equal(cancel.status, 202, cancel.text);
      await dash.rec.waitFor('help_cancelled', (p) => p?.request_id === ok.id);
    });

    test('400: unknown type, bad status, missing id -> one error per item, nothing applied', T, async () => {
      const snap = await snapshot();
      const items = [
        cellEvent({ seat: 42, student: 's-0042', type: 'cell_deleted' }),
        cellEvent({ seat: 42, student: 's-0042', status: 'maybe' }),
        cellEvent({ seat: 42, student: 's-0042', id: undefined }),
        cellEvent({ seat: 42, student: 's-0042' }),
      ];
      const res = await postEvents(gw, tok42, items);
      assert.equal(res.status, 400, res.text);
      assert.ok(hasFieldError(res.body, 0, 'type'), `errors: ${res.text}`);
      assert.ok(hasFieldError(res.body, 1, 'status'), `errors: ${res.text}`);
      assert.ok(hasFieldError(res.body, 2, 'id'), `errors: ${res.text}`);
      assert.ok(!res.body.errors.some((e) => e.index === 3), `item 3 is valid: ${res.text}`);
      await assertNothingApplied(items, snap, { repostWith: { token: tok42, events: [items[3]] } });
    });

    test('400: a body that is not JSON', T, async () => {
      const res = await postEvents(gw, tok42, '{"id": "abc", "type": ', { raw: true });
      assert.equal(res.status, 400, res.text);
    });

    const batchEvent = (i) =>
      cellEvent({ seat: 100, student: 's-0100', cell_id: `c${i}`, execution_count: i, status: 'ok' });

    test('400: an array of 501 events, nothing applied', T, async () => {
      const snap = await snapshot();
      const tooMany = Array.from({ length: 501 }, (_, i) => batchEvent(i));
      const res = await postEvents(gw, tokFree, tooMany);
      assert.equal(res.status, 400, res.text.slice(0, 500));
      assert.ok(Array.isArray(res.body?.errors) && res.body.errors.length > 0, `errors listed: ${res.text.slice(0, 300)}`);
      await assertNothingApplied(tooMany, snap);
    });

    test('an array of 500 events is accepted, counted, and every one reaches the dashboard', T, async () => {
      const before = metricValue(await scrape(gw), 'cellgate_events_ingested_total') ?? 0;
      const max = Array.from({ length: 500 }, (_, i) => batchEvent(1000 + i));
      const ok = await postEvents(gw, tokFree, max);
      assert.equal(ok.status, 202, ok.text.slice(0, 500));
      assert.equal(ok.body.accepted, 500);
      assert.equal(ok.body.duplicates, 0);
      await eventually(async () =>
        (metricValue(await scrape(gw), 'cellgate_events_ingested_total') ?? 0) >= before + 500,
      { message: 'cellgate_events_ingested_total +500' });
      const ids = new Set(max.map((e) => e.id));
      const seen = () => new Set(dash.rec.all('cell_executed', (p) => ids.has(p?.id)).map((p) => p.id)).size;
      await eventually(() => seen() === 500, { timeout: 10_000, message: 'all 500 cell_executed delivered' })
        .catch(() => {
          assert.fail(`the dashboard received ${seen()} of the 500 accepted events as cell_executed ` +
            `(and ${dash.rec.all('seat_updated', (p) => p?.seat === 100).length} seat_updated for seat 100)`);
        });
      assert.equal(dash.socket.connected, true);
    });

    test('401: no Authorization header', T, async () => {
      const ev = cellEvent();
      const res = await postEvents(gw, null, ev);
      assert.equal(res.status, 401, res.text);
      assert.equal(typeof res.body?.error, 'string', res.text);
      assert.equal(typeof res.body?.detail, 'string', res.text);
    });

    for (const [label, mkToken] of [
      ['a garbage token', () => 'garbage.garbage.garbage'],
      ['a token signed with another secret', () => signJwt(studentClaims('s-0042', 'cls-101', { seat: 42 }), randomString(48))],
      ['an alg:none token', (gw) => craft(gw, studentClaims('s-0042', 'cls-101', { seat: 42 }), { alg: 'none' })],
      ['an expired token', (gw) => craft(gw, studentClaims('s-0042', 'cls-101', { seat: 42, iat: now() - 3600, exp: now() - 120 }))],
    ]) {
      test(`401: ${label}, nothing applied`, T, async () => {
        const token = mkToken(gw);
        gw.tokens.add(token);
        const snap = await snapshot();
        const ev = cellEvent({ seat: 42, student: 's-0042' });
        const res = await postEvents(gw, token, ev);
        assert.equal(res.status, 401, res.text);
        assert.equal(typeof res.body?.error, 'string', res.text);
        assert.equal(typeof res.body?.detail, 'string', res.text);
        await assertNothingApplied([ev], snap);
      });
    }

    test('403: the body names another classroom than the token', T, async () => {
      const ev = cellEvent({ classroom: 'cls-small', seat: 3, student: 's-0042' });
      const res = await postEvents(gw, tok42, ev);
      assert.equal(res.status, 403, res.text);
      assert.equal(res.body?.error, 'forbidden');
      assert.equal(typeof res.body?.detail, 'string');
      const smallSnap = await getSnapshotHttp(gw, 'cls-small', tokens.alice);
      assert.equal(smallSnap.status, 200);
      assert.equal(smallSnap.body.seats[2].student, null, 'cls-small seat 3 untouched');
    });

    test('403: the body names another student than the token, nothing applied', T, async () => {
      const snap = await snapshot();
      const ev = cellEvent({ seat: 43, student: 's-0043' });
      const res = await postEvents(gw, tok42, ev);
      assert.equal(res.status, 403, res.text);
      assert.equal(res.body?.error, 'forbidden');
      assert.equal(typeof res.body?.detail, 'string');
      await assertNothingApplied([ev], snap);
    });

    test('403: an instructor token cannot post events', T, async () => {
      const snap = await snapshot();
      const ev = cellEvent({ seat: 42, student: 's-0042' });
      const res = await postEvents(gw, tokens.alice, ev);
      assert.equal(res.status, 403, res.text);
      assert.equal(res.body?.error, 'forbidden');
      assert.equal(typeof res.body?.detail, 'string');
      await assertNothingApplied([ev], snap);
    });

    test('413: a body of about 1 MB, nothing applied', T, async () => {
      const snap = await snapshot();
      const ev = cellEvent({ seat: 42, student: 's-0042', error: { ename: 'MemoryError', evalue: 'z'.repeat(1024 * 1024) } });
      const res = await rawPost(gw, '/api/v1/events', tok42, Buffer.from(JSON.stringify(ev)));
      assert.equal(res.status, 413, res.text.slice(0, 300));
      await assertNothingApplied([ev], snap);
      // the gateway is still fine afterwards
      const ok = cellEvent({ seat: 42, student: 's-0042', status: 'ok' });
      const res2 = await postEvents(gw, tok42, ok);
      assert.equal(res2.status, 202, res2.text);
    });

    test('a student token with a seat claim works (control for the refusals above)', T, async () => {
      const ev = cellEvent({ seat: 42, student: 's-0042', status: 'ok', cell_id: 'ctl' });
      const res = await postEvents(gw, tok42, ev);
      assert.equal(res.status, 202, res.text);
      assert.equal(res.body.accepted, 1);
      await dash.rec.waitFor('cell_executed', (p) => p?.id === ev.id);
    });

    test('the gateway logs contain none of the tokens used', T, () => {
      close(gw, dash.socket);
      assertNoSecretsInLogs(gw);
    });
  });
}

