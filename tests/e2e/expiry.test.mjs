// Tokens that expire while a dashboard is connected: the warning ahead of
// time, a refresh that keeps the socket, and at expiry a disconnect that
// socket.io-client tells apart from a network drop.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import { startGateway } from './lib/gateway.mjs';
import {
  T, PEOPLE, seedDirectory, connectDashboard, expectRefusal, assertRefusal, close, craft,
  instructorClaims, now, ack, scrape, metricValue, isRfc3339, sleep, assertNoSecretsInLogs,
} from './lib/helpers.mjs';

describe('tokens that expire while connected', { concurrency: false }, () => {
  let gw;

  before(async () => {
    // No leeway, so that a token lives exactly until its exp.
    gw = await startGateway({ db: 'sqlite', env: { CELLGATE_JWT_LEEWAY_SECS: '0' } });
    await seedDirectory(gw);
  });
  after(async () => { await gw?.stop(); });

  const shortLived = (seconds, email = PEOPLE.alice.email) =>
    craft(gw, instructorClaims(email, { exp: now() + seconds }));

  test('token_expiring comes ahead of time, then token_expired and a server-side disconnect', T, async () => {
    const token = shortLived(3);
    const { socket, rec } = await connectDashboard(gw, { token });
    const disconnected = new Promise((resolve) => socket.once('disconnect', resolve));

    const warning = await rec.waitFor('token_expiring', () => true, 2000);
    assert.ok(isRfc3339(warning.expires_at), `expires_at is RFC 3339: ${warning.expires_at}`);
    const expiresAt = Date.parse(warning.expires_at);
    assert.ok(Math.abs(expiresAt - (now() + 3) * 1000) < 2500, 'expires_at is the token exp');

    const expired = await rec.waitFor('token_expired', () => true, 6000);
    assert.ok(isRfc3339(expired.expired_at));
    const reason = await disconnected;
    // What socket.io-client reports for a server-side disconnect, and the
    // one reason it does not reconnect on its own.
    assert.equal(reason, 'io server disconnect');
    assert.ok(Date.now() >= expiresAt - 250, 'not disconnected before the token expired');
    assert.ok(rec.names().indexOf('token_expiring') < rec.names().indexOf('token_expired'));
    close(gw, socket);

    // The same token is now refused with the code that says "refresh".
    const err = await expectRefusal(gw, { token });
    assertRefusal(err, 'token_expired');
  });

  test('a client with reconnection on does not loop on reconnect after the expiry', T, async () => {
    const socket = io(gw.url, {
      auth: { token: shortLived(2) }, transports: ['websocket'], forceNew: true,
      reconnectionDelay: 100, reconnectionDelayMax: 200,
    });
    gw.sockets.add(socket);
    let connects = 0;
    socket.on('connect', () => { connects += 1; });
    const reason = await new Promise((resolve) => socket.once('disconnect', resolve));
    assert.equal(reason, 'io server disconnect');
    await sleep(1500);
    assert.equal(connects, 1, 'the client did not reconnect by itself');
    assert.equal(socket.connected, false);
    close(gw, socket);
  });

  test('refresh_token with a fresh token of the same instructor keeps the socket connected', T, async () => {
    const { socket, rec } = await connectDashboard(gw, { token: shortLived(3) });
    await rec.waitFor('token_expiring', () => true, 2000);
    const fresh = shortLived(3600);
    const answer = await ack(socket, 'refresh_token', { token: fresh });
    assert.equal(answer.ok, true, JSON.stringify(answer));
    assert.ok(isRfc3339(answer.expires_at));
    assert.ok(Math.abs(Date.parse(answer.expires_at) - (now() + 3600) * 1000) < 2500);

    await sleep(4500);
    assert.equal(socket.connected, true, 'still connected after the first token expired');
    assert.deepEqual(rec.all('token_expired'), []);
    const joined = await ack(socket, 'join_classroom', { classroom: 'cls-101' });
    assert.equal(joined.ok, true, 'the refreshed socket still works');
    close(gw, socket);
  });

  test('refresh_token refuses what it must, with a code, and the socket stays', T, async () => {
    const { socket } = await connectDashboard(gw, { token: shortLived(600) });
    const cases = [
      [{ token: shortLived(600, PEOPLE.bob.email) }, 'different_instructor'],
      [{ token: craft(gw, instructorClaims(PEOPLE.alice.email, { exp: now() - 60 })) }, 'token_expired'],
      [{ token: 'not-a-token' }, 'invalid_token'],
      [{ token: craft(gw, { sub: PEOPLE.alice.email, role: 'student', classroom: 'cls-101', exp: now() + 600 }) }, 'invalid_token'],
    ];
    for (const [payload, code] of cases) {
      const answer = await ack(socket, 'refresh_token', payload);
      assert.deepEqual({ ok: answer.ok, error: answer.error }, { ok: false, error: code }, JSON.stringify(payload).slice(0, 80));
    }
    const bad = await ack(socket, 'refresh_token', { tok: 'x' });
    assert.equal(bad.error, 'bad_request');
    assert.equal(socket.connected, true);
    close(gw, socket);
  });

  test('the metrics count refreshes and expiry disconnects', T, async () => {
    const text = await scrape(gw);
    assert.ok(metricValue(text, 'cellgate_token_expired_disconnects_total') >= 2);
    assert.ok(metricValue(text, 'cellgate_token_refreshes_total', { outcome: 'ok' }) >= 1);
    assert.ok(metricValue(text, 'cellgate_token_refreshes_total', { outcome: 'different_instructor' }) >= 1);
    assert.ok(metricValue(text, 'cellgate_token_refreshes_total', { outcome: 'token_expired' }) >= 1);
  });

  test('the gateway logs contain none of the tokens used', () => {
    assertNoSecretsInLogs(gw);
  });
});
