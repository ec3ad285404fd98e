// A help request posted again after the gateway lost its memory of having
// sent it (a restart of a single node; in cluster mode, a broadcast that
// failed and answered 503) reaches the dashboards if it is still open, as
// it was stored, and is a plain duplicate once someone has taken it up.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import os from 'node:os';
import path from 'node:path';
import { mkdtemp, rm } from 'node:fs/promises';
import { startGateway, randomString } from './lib/gateway.mjs';
import {
  T, seedDirectory, studentToken, connectDashboard, ack, sleep, postEvents, helpEvent,
  getSnapshotHttp,
} from './lib/helpers.mjs';

describe('help requests posted again after a restart', { concurrency: false }, () => {
  let dir;
  let common;

  before(async () => {
    // The same directory and secret for both runs of the gateway.
    dir = await mkdtemp(path.join(os.tmpdir(), 'cellgate-resend-'));
    common = {
      databaseUrl: `sqlite://${dir}/dir.db?mode=rwc`,
      env: { CELLGATE_JWT_SECRET: randomString(48), CELLGATE_DRAIN_SECS: '1' },
    };
  });
  after(async () => { await rm(dir, { recursive: true, force: true }); });

  test('open ones are sent again as stored, claimed ones stay duplicates', T, async () => {
    const open = helpEvent({ seat: 7, student: 's-0007' });
    const taken = helpEvent({ seat: 7, student: 's-0007', message: 'and a second question' });

    // First run: both are accepted; bob claims the second.
    const first = await startGateway(common);
    let student;
    let tokens;
    try {
      tokens = await seedDirectory(first);
      student = await studentToken(first, 's-0007', 'cls-101', 7);
      const bob = await connectDashboard(first, { token: tokens.bob });
      assert.equal((await ack(bob.socket, 'join_classroom', { classroom: 'cls-101' })).ok, true);
      for (const ev of [open, taken]) {
        const r = await postEvents(first, student, ev);
        assert.equal(r.status, 202, r.text);
        assert.equal(r.body.accepted, 1, r.text);
      }
      const claim = await ack(bob.socket, 'claim_help', { request_id: taken.id });
      assert.equal(claim.ok, true, JSON.stringify(claim));
    } finally {
      await first.stop();
    }

    // Second run on the same directory: the gateway no longer remembers
    // which requests it has sent.
    const second = await startGateway({ ...common, migrate: false });
    try {
      const alice = await connectDashboard(second, { token: tokens.alice });
      const joined = await ack(alice.socket, 'join_classroom', { classroom: 'cls-101' });
      assert.equal(joined.ok, true, JSON.stringify(joined));
      const stored = joined.snapshot.help_queue.find((h) => h.request_id === open.id);
      assert.ok(stored, `the open request is in the snapshot: ${JSON.stringify(joined.snapshot.help_queue)}`);

      const again = await postEvents(second, student, open);
      assert.equal(again.status, 202, again.text);
      assert.deepEqual([again.body.accepted, again.body.duplicates], [1, 0], again.text);
      const sent = await alice.rec.waitFor('help_requested', (h) => h.request_id === open.id);
      assert.equal(sent.created_at, stored.created_at, 'sent as stored, not re-dated');
      assert.equal(sent.message, open.message);
      assert.equal(sent.status, 'open');

      const claimedAgain = await postEvents(second, student, taken);
      assert.equal(claimedAgain.status, 202, claimedAgain.text);
      assert.deepEqual([claimedAgain.body.accepted, claimedAgain.body.duplicates], [0, 1],
        claimedAgain.text);

      // And the open one, now sent, is a duplicate too.
      const thrice = await postEvents(second, student, open);
      assert.deepEqual([thrice.body.accepted, thrice.body.duplicates], [0, 1], thrice.text);

      await sleep(500);
      const ids = alice.rec.all('help_requested').map((h) => h.request_id);
      assert.deepEqual(ids, [open.id], 'exactly one help_requested, for the open request');
      const snap = await getSnapshotHttp(second, 'cls-101', tokens.alice);
      const claimed = snap.body.help_queue.find((h) => h.request_id === taken.id);
      assert.equal(claimed?.status, 'claimed', 'the claimed request kept its state');
    } finally {
      await second.stop();
    }
  });
});
