// Refused dashboard connections: each cause reaches the client as
// connect_error with the stable code as err.message, and is counted in
// cellgate_auth_failures_total{reason=<code>}.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startGateway, DBS, randomString } from './lib/gateway.mjs';
import {
  T, PEOPLE, seedDirectory, studentToken, connectDashboard, expectRefusal, assertRefusal, close,
  craft, signJwt, instructorClaims, studentClaims, now, scrape, metricValue, eventually,
  assertNoSecretsInLogs,
} from './lib/helpers.mjs';

const failures = async (gw, reason) =>
  metricValue(await scrape(gw), 'cellgate_auth_failures_total', { reason }) ?? 0;

/** Connect with `opts`, expect refusal `code`, and the failure counter for it to go up. */
async function refusedWith(gw, opts, code) {
  const before = await failures(gw, code);
  const err = await expectRefusal(gw, opts);
  assertRefusal(err, code);
  await eventually(async () => (await failures(gw, code)) >= before + 1, {
    timeout: 3000,
    message: `cellgate_auth_failures_total{reason="${code}"} to go from ${before} to ${before + 1}`,
  });
  return err;
}

for (const db of DBS) {
  describe(`dashboard refusals (${db})`, { concurrency: false }, () => {
    let gw;
    let tokens;

    before(async () => {
      gw = await startGateway({ db });
      tokens = await seedDirectory(gw);
    });
    after(async () => { await gw?.stop(); });

    test('no token at all -> invalid_token', T, async () => {
      await refusedWith(gw, {}, 'invalid_token');
    });

    test('empty auth.token -> invalid_token', T, async () => {
      await refusedWith(gw, { auth: { token: '' } }, 'invalid_token');
    });

    test('a string that is not a JWT -> invalid_token', T, async () => {
      await refusedWith(gw, { token: 'not-a-jwt' }, 'invalid_token');
    });

    test('bad signature (signed with another secret) -> invalid_token', T, async () => {
      const token = signJwt(instructorClaims(PEOPLE.alice.email), randomString(48));
      gw.tokens.add(token);
      await refusedWith(gw, { token }, 'invalid_token');
    });

    test('tampered payload (sub swapped, signature kept) -> invalid_token', T, async () => {
      const [h, , s] = tokens.carol.split('.');
      const p = Buffer.from(JSON.stringify(instructorClaims(PEOPLE.alice.email))).toString('base64url');
      const token = `${h}.${p}.${s}`;
      gw.tokens.add(token);
      await refusedWith(gw, { token }, 'invalid_token');
    });

    test('alg: none (unsigned) -> invalid_token', T, async () => {
      const token = craft(gw, instructorClaims(PEOPLE.alice.email), { alg: 'none' });
      await refusedWith(gw, { token }, 'invalid_token');
    });

    test('alg: none carrying a valid HS256 signature -> invalid_token', T, async () => {
      const good = signJwt(instructorClaims(PEOPLE.alice.email), gw.secret);
      const [, p, s] = good.split('.');
      const h = Buffer.from(JSON.stringify({ alg: 'none', typ: 'JWT' })).toString('base64url');
      const token = `${h}.${p}.${s}`;
      gw.tokens.add(token);
      await refusedWith(gw, { token }, 'invalid_token');
    });

    test('expired 120 s ago -> token_expired', T, async () => {
      const token = craft(gw, instructorClaims(PEOPLE.alice.email, { iat: now() - 3600, exp: now() - 120 }));
      await refusedWith(gw, { token }, 'token_expired');
    });

    test('expired 5 s ago is still inside the 30 s leeway -> accepted', T, async () => {
      const token = craft(gw, instructorClaims(PEOPLE.alice.email, { iat: now() - 3600, exp: now() - 5 }));
      const { socket, accepted } = await connectDashboard(gw, { token });
      close(gw, socket);
      assert.equal(accepted.instructor.email, PEOPLE.alice.email);
    });

    test('not valid before a time 10 minutes away (nbf) -> invalid_token', T, async () => {
      const token = craft(gw, instructorClaims(PEOPLE.alice.email, { nbf: now() + 600 }));
      await refusedWith(gw, { token }, 'invalid_token');
    });

    test('no exp claim -> invalid_token', T, async () => {
      const token = craft(gw, instructorClaims(PEOPLE.alice.email, { exp: undefined }));
      await refusedWith(gw, { token }, 'invalid_token');
    });

    test('a student token (from the CLI) on the dashboard -> invalid_token', T, async () => {
      const token = await studentToken(gw, 's-0042', 'cls-101', 42);
      await refusedWith(gw, { token }, 'invalid_token');
    });

    test('role "student" with an instructor\'s e-mail as sub -> invalid_token', T, async () => {
      const token = craft(gw, studentClaims(PEOPLE.alice.email, 'cls-101'));
      await refusedWith(gw, { token }, 'invalid_token');
    });

    test('valid token for an instructor the directory does not know -> instructor_not_found', T, async () => {
      const token = craft(gw, instructorClaims('nobody@example.edu'));
      await refusedWith(gw, { token }, 'instructor_not_found');
    });

    test('deactivated instructor (cellgate instructors deactivate) -> instructor_inactive', T, async () => {
      // A fresh instructor that never connected, so no cached directory entry exists.
      const email = `dave.${Date.now()}@example.edu`;
      await gw.cli('instructors', 'add', email, '--name', 'Dave Dormant');
      await gw.cli('instructors', 'deactivate', email);
      const token = await gw.cli('token', 'instructor', email).catch(() => craft(gw, instructorClaims(email)));
      await refusedWith(gw, { token }, 'instructor_inactive');
    });

    test('an instructor reactivated before first use (cellgate instructors activate) is accepted', T, async () => {
      const email = `erin.${Date.now()}@example.edu`;
      await gw.cli('instructors', 'add', email, '--name', 'Erin Again');
      await gw.cli('instructors', 'deactivate', email);
      await gw.cli('instructors', 'activate', email);
      const token = await gw.cli('token', 'instructor', email);
      const { socket, accepted } = await connectDashboard(gw, { token });
      close(gw, socket);
      assert.equal(accepted.instructor.email, email);
      assert.equal(accepted.instructor.name, 'Erin Again');
    });

    test('the gateway logs contain none of the tokens used', T, () => {
      assertNoSecretsInLogs(gw);
    });
  });
}

for (const [label, env] of [
  ['default settings', {}],
  // the same with start-up migrations explicitly off, so that the refusal
  // path is exercised even if the default start-up is broken
  ['CELLGATE_AUTO_MIGRATE=false', { CELLGATE_AUTO_MIGRATE: 'false' }],
]) {
  describe(`directory unreachable (${label})`, { concurrency: false }, () => {
    let gw;

    before(async () => {
      gw = await startGateway({
        db: 'postgres',
        databaseUrl: 'postgres://postgres@127.0.0.1:1/nothing', // nothing listens on port 1
        migrate: false,
        env,
      });
    });
    after(async () => { await gw?.stop(); });

    test('serve still starts: /healthz 200, /readyz 503', T, async () => {
      const h = await fetch(`${gw.url}/healthz`);
      await h.arrayBuffer();
      assert.equal(h.status, 200);
      const r = await fetch(`${gw.url}/readyz`, { signal: AbortSignal.timeout(10_000) });
      await r.arrayBuffer();
      assert.equal(r.status, 503);
    });

    test('a valid instructor token -> directory_unavailable (after retries)', T, async () => {
      const token = craft(gw, instructorClaims(PEOPLE.alice.email));
      const started = Date.now();
      await refusedWith(gw, { token }, 'directory_unavailable');
      assert.ok(Date.now() - started < 15_000, 'refused in reasonable time');
    });

    test('the gateway logs contain none of the tokens used', T, () => {
      assertNoSecretsInLogs(gw);
    });
  });
}
