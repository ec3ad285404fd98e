// Dashboards connecting: transports, where the token is carried, what the
// first event looks like, ops endpoints and socket metrics.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startGateway, DBS, randomString } from './lib/gateway.mjs';
import {
  T, PEOPLE, seedDirectory, connectDashboard, expectRefusal, assertRefusal, close, craft,
  instructorClaims, signJwt, scrape, metricValue, parseMetrics, eventually, isRfc3339,
  assertNoSecretsInLogs,
} from './lib/helpers.mjs';

function assertAccepted(accepted, socket, person) {
  assert.equal(typeof accepted, 'object', 'connection_accepted payload');
  assert.equal(accepted.sid, socket.id, 'connection_accepted.sid is the socket id');
  assert.equal(typeof accepted.instructor, 'object');
  assert.equal(accepted.instructor.email, person.email);
  assert.equal(accepted.instructor.name, person.name);
  assert.ok(accepted.instructor.id !== undefined && accepted.instructor.id !== null && accepted.instructor.id !== '',
    'instructor.id present');
  assert.equal(typeof accepted.node, 'string');
  assert.ok(accepted.node.length > 0, 'node is not empty');
  assert.ok(isRfc3339(accepted.server_time), `server_time is RFC 3339: ${accepted.server_time}`);
  assert.ok(Math.abs(Date.parse(accepted.server_time) - Date.now()) < 60_000, 'server_time is about now');
}

for (const db of DBS) {
  describe(`connecting a dashboard (${db})`, { concurrency: false }, () => {
    let gw;
    let tokens;

    before(async () => {
      gw = await startGateway({ db });
      tokens = await seedDirectory(gw);
    });
    after(async () => { await gw?.stop(); });

    test('websocket only: the first event is connection_accepted naming the instructor', T, async () => {
      const { socket, rec, accepted } = await connectDashboard(gw, { token: tokens.alice, transports: ['websocket'] });
      try {
        assert.equal(rec.events[0]?.name, 'connection_accepted', `first event; got ${JSON.stringify(rec.names())}`);
        assertAccepted(accepted, socket, PEOPLE.alice);
        assert.equal(socket.connected, true);
        assert.equal(socket.io.engine.transport.name, 'websocket');
      } finally {
        close(gw, socket);
      }
    });

    test('polling, then upgrade to websocket: accepted, and the transport becomes websocket', T, async () => {
      const { socket, rec, accepted } = await connectDashboard(gw, {
        token: tokens.bob, transports: ['polling', 'websocket'],
      });
      try {
        assert.equal(rec.events[0]?.name, 'connection_accepted', `first event; got ${JSON.stringify(rec.names())}`);
        assertAccepted(accepted, socket, PEOPLE.bob);
        await eventually(() => socket.io.engine.transport.name === 'websocket',
          { timeout: 5000, message: `upgrade to websocket (transport is ${socket.io.engine.transport.name})` });
        assert.equal(socket.connected, true, 'still connected after the upgrade');
      } finally {
        close(gw, socket);
      }
    });

    test('Authorization: Bearer header instead of auth.token (polling)', T, async () => {
      const { socket, rec, accepted } = await connectDashboard(gw, {
        transports: ['polling'],
        extraHeaders: { Authorization: `Bearer ${tokens.alice}` },
      });
      try {
        assert.equal(rec.events[0]?.name, 'connection_accepted');
        assertAccepted(accepted, socket, PEOPLE.alice);
        assert.equal(socket.io.engine.transport.name, 'polling');
      } finally {
        close(gw, socket);
      }
    });

    test('Authorization: Bearer header with a bad token is refused with invalid_token', T, async () => {
      const bad = signJwt(instructorClaims(PEOPLE.alice.email), randomString(48));
      gw.tokens.add(bad);
      const err = await expectRefusal(gw, { transports: ['polling'], extraHeaders: { Authorization: `Bearer ${bad}` } });
      assertRefusal(err, 'invalid_token');
    });

    test('a hand-signed HS256 instructor token is accepted (control for the hostile tokens)', T, async () => {
      const token = craft(gw, instructorClaims(PEOPLE.carol.email));
      const { socket, accepted } = await connectDashboard(gw, { token });
      try {
        assertAccepted(accepted, socket, PEOPLE.carol);
      } finally {
        close(gw, socket);
      }
    });

    test('a token in the query string is refused (invalid_token) by default', T, async () => {
      // Not registered for the log scan: a client that puts a token in a URL
      // leaks it to access logs by its own doing.
      const token = signJwt(instructorClaims(PEOPLE.alice.email), gw.secret);
      const err = await expectRefusal(gw, { query: { token }, transports: ['websocket'] });
      assertRefusal(err, 'invalid_token');
    });

    test('/healthz and /readyz answer 200 with a reachable directory', T, async () => {
      const h = await fetch(`${gw.url}/healthz`);
      await h.arrayBuffer();
      assert.equal(h.status, 200);
      const r = await fetch(`${gw.url}/readyz`);
      await r.arrayBuffer();
      assert.equal(r.status, 200);
    });

    test('metrics: cellgate_connected_sockets follows connects and disconnects; auth duration has an outcome label', T, async () => {
      const gauge = async () => metricValue(await scrape(gw), 'cellgate_connected_sockets');
      // every dashboard of the earlier tests has disconnected, refused ones never counted
      await eventually(async () => (await gauge()) === 0,
        { message: 'cellgate_connected_sockets exported and 0 with no dashboard connected' });
      const base = 0;

      const a = await connectDashboard(gw, { token: tokens.alice });
      const b = await connectDashboard(gw, { token: tokens.bob, transports: ['polling', 'websocket'] });
      try {
        await eventually(async () => (await gauge()) === base + 2,
          { message: `cellgate_connected_sockets == ${base + 2}` });
        close(gw, a.socket);
        await eventually(async () => (await gauge()) === base + 1,
          { message: `cellgate_connected_sockets == ${base + 1} after one disconnect` });
      } finally {
        close(gw, a.socket);
        close(gw, b.socket);
      }
      await eventually(async () => (await gauge()) === base,
        { message: `cellgate_connected_sockets back to ${base}` });

      const series = parseMetrics(await scrape(gw));
      const counts = series.filter((s) => s.name === 'cellgate_auth_duration_seconds_count');
      assert.ok(counts.length > 0, 'cellgate_auth_duration_seconds_count is exported');
      assert.ok(counts.every((s) => typeof s.labels.outcome === 'string' && s.labels.outcome.length > 0),
        `every auth duration series has an outcome label: ${JSON.stringify(counts)}`);
      assert.ok(counts.reduce((n, s) => n + s.value, 0) >= 2, 'at least the two handshakes above were timed');
      assert.ok(series.some((s) => s.name === 'cellgate_auth_duration_seconds_bucket' && s.labels.le === '+Inf'),
        'histogram buckets exported');
    });

    test('the gateway logs contain none of the tokens used', T, () => {
      assertNoSecretsInLogs(gw);
    });
  });
}
