// The directory's PostgreSQL goes away mid-class and comes back. The server
// is the test's own (lib/private-postgres.mjs), stopped as a crash would
// stop it: instructors the gateway saw recently keep connecting from the
// stale cache, everyone else is told `directory_unavailable`, help requests
// are answered 503 with Retry-After rather than accepted and lost, and all
// of it recovers without restarting the gateway.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startGateway } from './lib/gateway.mjs';
import { startPrivatePostgres } from './lib/private-postgres.mjs';
import {
  T, PEOPLE, seedDirectory, connectDashboard, expectRefusal, assertRefusal, close, ack,
  postEvents, studentToken, cellEvent, helpEvent, scrape, metricValue, eventually,
  assertNoSecretsInLogs,
} from './lib/helpers.mjs';

describe('directory outage (a private PostgreSQL stopped and restarted)', { concurrency: false }, () => {
  let pg;
  let gw;
  let tokens;
  let student;
  /** The help request refused during the outage, posted again after it. */
  let pendingHelp;

  before(async () => {
    pg = await startPrivatePostgres();
    gw = await startGateway({
      databaseUrl: pg.url,
      env: { CELLGATE_DIRECTORY_CACHE_TTL_SECS: '1', CELLGATE_DIRECTORY_STALE_SECS: '300' },
    });
    tokens = await seedDirectory(gw);
    student = await studentToken(gw, 's-0007', 'cls-101', 7);
  });
  after(async () => {
    await gw?.stop();
    await pg?.destroy();
  });

  let watching;

  test('before the outage: alice watches cls-101 and a student posts (all now cached)', T, async () => {
    watching = await connectDashboard(gw, { token: tokens.alice });
    const joined = await ack(watching.socket, 'join_classroom', { classroom: 'cls-101' });
    assert.equal(joined.ok, true);
    const r = await postEvents(gw, student, cellEvent({ classroom: 'cls-101', student: 's-0007', seat: 7 }));
    assert.equal(r.status, 202, JSON.stringify(r.body));
  });

  test('during the outage: cached instructors get in, others are told directory_unavailable', { timeout: 60_000 }, async () => {
    await pg.stop();
    // Let the fresh cache (1 s) run out: from now on only the stale one answers.
    await new Promise((r) => setTimeout(r, 1500));

    // alice was seen a moment ago: a second dashboard of hers gets in.
    const started = Date.now();
    const second = await connectDashboard(gw, { token: tokens.alice });
    const waited = Date.now() - started;
    assert.ok(waited < 3000, `a stale answer took ${waited} ms`);
    // Joining needs the help queue, which only the database has: a clear
    // answer to retry, not a hang.
    const join = await ack(second.socket, 'join_classroom', { classroom: 'cls-101' });
    assert.deepEqual({ ok: join.ok, error: join.error }, { ok: false, error: 'unavailable' });
    close(gw, second.socket);

    // bob never connected: nothing to stand in for the directory.
    const err = await expectRefusal(gw, { token: tokens.bob });
    assertRefusal(err, 'directory_unavailable');

    // A cell event needs no database: the dashboard already watching gets it.
    const cell = cellEvent({ classroom: 'cls-101', student: 's-0007', seat: 7 });
    const posted = await postEvents(gw, student, cell);
    assert.equal(posted.status, 202, JSON.stringify(posted.body));
    await watching.rec.waitFor('cell_executed', (e) => e.id === cell.id);

    // A help request must be stored first: it is refused, to be retried.
    const help = helpEvent({ classroom: 'cls-101', student: 's-0007', seat: 7 });
    const refused = await postEvents(gw, student, help);
    assert.equal(refused.status, 503, JSON.stringify(refused.body));
    assert.ok(Number(refused.headers.get('retry-after')) > 0, 'Retry-After is set');
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(watching.rec.all('help_requested'), [], 'nothing was announced for the refused request');

    const ready = await fetch(`${gw.url}/readyz`);
    assert.equal(ready.status, 503, 'not ready while the directory is down');
    const text = await scrape(gw);
    assert.ok(metricValue(text, 'cellgate_directory_stale_answers_total') >= 1);
    assert.ok(metricValue(text, 'cellgate_directory_errors_total') >= 1);
    pendingHelp = help;
  });

  test('after the outage: everything recovers without a restart', { timeout: 60_000 }, async () => {
    await pg.start();
    await eventually(async () => (await fetch(`${gw.url}/readyz`)).status === 200,
      { timeout: 20_000, message: '/readyz back to 200' });

    const { socket, rec } = await connectDashboard(gw, { token: tokens.bob });
    const joined = await ack(socket, 'join_classroom', { classroom: 'cls-101' });
    assert.equal(joined.ok, true);

    // The extension retries the refused help request: now it is stored and
    // announced, to the dashboard that watched through the outage too.
    const again = await postEvents(gw, student, pendingHelp);
    assert.equal(again.status, 202, JSON.stringify(again.body));
    const announced = await rec.waitFor('help_requested', (h) => h.student === 's-0007');
    await watching.rec.waitFor('help_requested', (h) => h.request_id === announced.request_id);
    const claim = await ack(socket, 'claim_help', { request_id: announced.request_id });
    assert.equal(claim.ok, true, JSON.stringify(claim));
    close(gw, socket);
    close(gw, watching.socket);
  });

  test('the gateway logs contain none of the tokens used', () => {
    for (const t of Object.values(tokens)) gw.tokens.add(t);
    gw.tokens.add(student);
    assertNoSecretsInLogs(gw);
  });
});
