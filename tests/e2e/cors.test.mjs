// Browser origins: one list (CELLGATE_ALLOWED_ORIGINS) gives the CORS
// answers of polling and the HTTP API and the Origin check of Socket.IO
// requests, the WebSocket upgrade included; credentials never go with a
// wildcard; requests without Origin (not a browser) are not affected.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startGateway } from './lib/gateway.mjs';
import {
  T, seedDirectory, connectDashboard, expectRefusal, close, scrape, metricValue,
} from './lib/helpers.mjs';
import { request, openPolling, openWebSocket } from './lib/raw.mjs';

const DASHBOARD = 'https://dash.example.edu';
const STRANGER = 'https://evil.example.com';

const preflight = (gw, path, origin) => request(`${gw.url}${path}`, {
  method: 'OPTIONS',
  headers: {
    origin,
    'access-control-request-method': 'POST',
    'access-control-request-headers': 'authorization,content-type',
  },
});

const refusals = async (gw) => metricValue(await scrape(gw), 'cellgate_origin_refusals_total') ?? 0;

describe('a listed origin (production with CELLGATE_ALLOWED_ORIGINS)', { concurrency: false }, () => {
  let gw;
  let tokens;

  before(async () => {
    gw = await startGateway({
      env: { CELLGATE_PROFILE: 'production', CELLGATE_ALLOWED_ORIGINS: `${DASHBOARD}, http://localhost:5173` },
    });
    tokens = await seedDirectory(gw);
  });
  after(async () => { await gw?.stop(); });

  test('polling from the listed origin is readable, with credentials, never with a wildcard', T, async () => {
    const { headers } = await openPolling(gw, { origin: DASHBOARD });
    assert.equal(headers['access-control-allow-origin'], DASHBOARD);
    assert.equal(headers['access-control-allow-credentials'], 'true');
    assert.match(headers.vary ?? '', /origin/i);

    const pre = await preflight(gw, '/socket.io/?EIO=4&transport=polling', DASHBOARD);
    assert.ok(pre.status >= 200 && pre.status < 300, `preflight ${pre.status}`);
    assert.equal(pre.headers['access-control-allow-origin'], DASHBOARD);
    assert.equal(pre.headers['access-control-allow-credentials'], 'true');
    assert.match(pre.headers['access-control-allow-headers'] ?? '', /authorization/i);
    assert.match(pre.headers['access-control-allow-methods'] ?? '', /POST/);
  });

  test('a dashboard from the listed origin connects over polling and WebSocket', T, async () => {
    for (const transports of [['polling'], ['websocket'], ['polling', 'websocket']]) {
      const d = await connectDashboard(gw, { token: tokens.alice, transports, extraHeaders: { origin: DASHBOARD } });
      assert.ok(d.accepted.sid, transports.join('+'));
      close(gw, d.socket);
    }
  });

  test('another origin is refused 403 over polling and on the WebSocket upgrade, and counted', T, async () => {
    const before = await refusals(gw);
    const polled = await request(`${gw.url}/socket.io/?EIO=4&transport=polling`, { headers: { origin: STRANGER } });
    assert.equal(polled.status, 403);
    assert.equal(polled.json?.error, 'origin_not_allowed');
    assert.equal(polled.headers['access-control-allow-origin'], undefined);

    await assert.rejects(openWebSocket(gw, { origin: STRANGER }), (e) => e.status === 403);
    const refused = await expectRefusal(gw, { token: tokens.alice, extraHeaders: { origin: STRANGER } });
    assert.match(refused.message, /websocket error|xhr poll error/);
    assert.equal(await refusals(gw), before + 3);

    const pre = await preflight(gw, '/api/v1/events', STRANGER);
    assert.equal(pre.headers['access-control-allow-origin'], undefined, 'no CORS grant for a stranger');
  });

  test('the gateway\'s own origin and requests without Origin are always let through', T, async () => {
    const own = `http://127.0.0.1:${gw.port}`;
    const ws = await openWebSocket(gw, { origin: own });
    ws.terminate();
    const d = await connectDashboard(gw, { token: tokens.bob }); // Node's client sends no Origin
    close(gw, d.socket);
    const health = await request(`${gw.url}/healthz`, { headers: { origin: STRANGER } });
    assert.equal(health.status, 200, 'the Origin check is for Socket.IO only; CORS decides what a page may read');
  });

  test('the API answers a listed origin\'s preflight for a bearer token', T, async () => {
    const pre = await preflight(gw, '/api/v1/events', 'http://localhost:5173');
    assert.equal(pre.headers['access-control-allow-origin'], 'http://localhost:5173');
    assert.match(pre.headers['access-control-allow-headers'] ?? '', /authorization/i);
  });
});

describe('production without a list: same origin only', { concurrency: false }, () => {
  let gw;

  before(async () => {
    gw = await startGateway({ env: { CELLGATE_PROFILE: 'production' } });
  });
  after(async () => { await gw?.stop(); });

  test('no CORS grant at all, cross-origin Socket.IO refused, own origin accepted', T, async () => {
    const pre = await preflight(gw, '/socket.io/?EIO=4&transport=polling', DASHBOARD);
    assert.equal(pre.headers['access-control-allow-origin'], undefined);
    const polled = await request(`${gw.url}/socket.io/?EIO=4&transport=polling`, { headers: { origin: DASHBOARD } });
    assert.equal(polled.status, 403);
    await assert.rejects(openWebSocket(gw, { origin: DASHBOARD }), (e) => e.status === 403);
    const ws = await openWebSocket(gw, { origin: `http://127.0.0.1:${gw.port}` });
    ws.terminate();
  });
});

describe('development default: any origin, without credentials', { concurrency: false }, () => {
  let gw;
  let tokens;

  before(async () => {
    gw = await startGateway({});
    tokens = await seedDirectory(gw);
  });
  after(async () => { await gw?.stop(); });

  test('any origin may poll and read, with "*" and no credentials', T, async () => {
    const { headers } = await openPolling(gw, { origin: STRANGER });
    assert.equal(headers['access-control-allow-origin'], '*');
    assert.equal(headers['access-control-allow-credentials'], undefined);
    const pre = await preflight(gw, '/socket.io/?EIO=4&transport=polling', STRANGER);
    assert.equal(pre.headers['access-control-allow-origin'], '*');
    assert.equal(pre.headers['access-control-allow-credentials'], undefined);
  });

  test('any origin may open a WebSocket and connect a dashboard', T, async () => {
    const d = await connectDashboard(gw, { token: tokens.alice, extraHeaders: { origin: STRANGER } });
    assert.ok(d.accepted.sid);
    close(gw, d.socket);
    assert.equal(await refusals(gw), 0);
  });
});
