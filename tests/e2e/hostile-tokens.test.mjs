// Hostile and broken tokens, table-driven: each one is offered by the real
// socket.io-client over WebSocket only and over HTTP long-polling, and each
// must be refused with its exact code (or accepted, for the few controls
// that prove the table is not refusing everything).

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { startGateway } from './lib/gateway.mjs';
import {
  T, PEOPLE, seedDirectory, connectDashboard, expectRefusal, assertRefusal, close,
  now, scrape, metricValue, assertNoSecretsInLogs,
} from './lib/helpers.mjs';

const ISS = 'https://idp.example.edu';
const AUD = 'cellgate';
const KEY_ID = 'term-2026-autumn';

const b64 = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');
const hmac = (alg, secret, data) =>
  createHmac({ HS256: 'sha256', HS384: 'sha384', HS512: 'sha512' }[alg] ?? 'sha256', secret)
    .update(data).digest('base64url');

/**
 * A token from parts: `header` and `claims` are objects (or raw strings,
 * base64url-encoded as they are); the signature is an HMAC with `secret`
 * under `signAs` (default: the header's alg), unless `signature` is given.
 */
function token({ header = {}, claims = {}, secret, signAs, signature }) {
  const h = typeof header === 'string' ? b64(header) : b64({ alg: 'HS256', typ: 'JWT', ...header });
  const p = typeof claims === 'string' ? b64(claims) : b64(claims);
  const data = `${h}.${p}`;
  const sig = signature ?? hmac(signAs ?? header.alg ?? 'HS256', secret, data);
  return `${data}.${sig}`;
}

describe('hostile and broken tokens', { concurrency: false }, () => {
  let gw;
  const cases = [];

  before(async () => {
    gw = await startGateway({
      db: 'sqlite',
      env: {
        CELLGATE_JWT_ISSUER: ISS,
        CELLGATE_JWT_AUDIENCE: AUD,
        CELLGATE_JWT_KEY_ID: KEY_ID,
        CELLGATE_JWT_PREVIOUS_SECRETS: '["the-secret-of-last-term-which-is-long-enough-too"]',
        // Over a hundred handshakes from 127.0.0.1 in a few seconds: the
        // handshake rate limit (limits.test.mjs) would answer rate_limited.
        CELLGATE_HANDSHAKES_PER_MINUTE: '0',
      },
    });
    await seedDirectory(gw);
    await gw.cli('instructors', 'add', 'gone@example.edu', '--name', 'Gone Away');
    await gw.cli('instructors', 'deactivate', 'gone@example.edu');

    const secret = gw.secret;
    const good = (over = {}) => {
      const c = { sub: PEOPLE.alice.email, role: 'instructor', iss: ISS, aud: AUD, iat: now(), exp: now() + 600, ...over };
      for (const k of Object.keys(c)) if (c[k] === undefined) delete c[k];
      return c;
    };
    const signed = (claims, header = {}) => token({ header, claims, secret });
    const valid = signed(good());
    const [vh, vp, vs] = valid.split('.');
    const other = signed(good({ sub: PEOPLE.bob.email }));

    const add = (name, auth, code, extra = {}) => cases.push({ name, auth, code, ...extra });
    const bad = (name, tok, code = 'invalid_token') => add(name, { token: tok }, code);

    // Controls: these must be accepted, or the table proves nothing.
    add('control: a valid token', { token: valid }, null);
    add('control: signed with the previous secret during a rotation',
      { token: token({ claims: good(), secret: 'the-secret-of-last-term-which-is-long-enough-too' }) }, null);
    add('control: naming the configured key id', { token: signed(good(), { kid: KEY_ID }) }, null);
    add('control: expired 10 s ago, within the 30 s leeway', { token: signed(good({ exp: now() - 10 })) }, null);

    // Missing or not a JWT at all.
    add('no auth at all', undefined, 'invalid_token');
    add('auth without a token field', { jwt: valid }, 'invalid_token');
    bad('empty string', '');
    add('token is a number', { token: 12345 }, 'invalid_token');
    add('token is an object', { token: { alg: 'HS256' } }, 'invalid_token');
    bad('plain garbage', 'hello-there');
    bad('two parts only', `${vh}.${vp}`);
    bad('four parts', `${valid}.${vs}`);
    bad('header is not base64url', `!!!.${vp}.${vs}`);
    bad('header is JSON but not an object', token({ header: '"HS256"', claims: good(), secret }));
    bad('payload is not JSON', token({ claims: 'not json at all', secret }));
    bad('payload is a JSON array', token({ claims: '[1,2,3]', secret }));
    bad('trailing whitespace after the signature', `${valid} `);
    bad('oversized (9 KB of claims)', signed(good({ pad: 'x'.repeat(9 * 1024) })));

    // Algorithms and signatures.
    bad('alg none, no signature', token({ header: { alg: 'none' }, claims: good(), signature: '' }));
    bad('alg None (capitalised), no signature', token({ header: { alg: 'None' }, claims: good(), signature: '' }));
    bad('alg none with a signature', token({ header: { alg: 'none' }, claims: good(), secret, signAs: 'HS256' }));
    bad('alg missing from the header', token({ header: '{"typ":"JWT"}', claims: good(), secret }));
    bad('alg unknown (HS999)', token({ header: { alg: 'HS999' }, claims: good(), secret, signAs: 'HS256' }));
    bad('RS256 header on an HMAC signature (key confusion)', token({ header: { alg: 'RS256' }, claims: good(), secret, signAs: 'HS256' }));
    bad('ES256 header on an HMAC signature', token({ header: { alg: 'ES256' }, claims: good(), secret, signAs: 'HS256' }));
    bad('EdDSA header on an HMAC signature', token({ header: { alg: 'EdDSA' }, claims: good(), secret, signAs: 'HS256' }));
    bad('HS384 header on an HS256 signature', token({ header: { alg: 'HS384' }, claims: good(), secret, signAs: 'HS256' }));
    bad('signed with another secret', token({ claims: good(), secret: 'someone-elses-secret-that-is-long-enough' }));
    bad('signature stripped', `${vh}.${vp}.`);
    bad('signature of another token', `${vh}.${vp}.${other.split('.')[2]}`);
    bad('claims swapped under a valid signature', `${vh}.${b64(good({ sub: PEOPLE.bob.email }))}.${vs}`);
    bad('signature bit-flipped', `${vh}.${vp}.${vs.slice(0, -2)}${vs.slice(-2) === 'AA' ? 'AB' : 'AA'}`);
    bad('unknown kid', signed(good(), { kid: 'not-a-key-we-have' }));
    bad('kid of the current key on a previous-secret signature',
      token({ header: { kid: KEY_ID }, claims: good(), secret: 'the-secret-of-last-term-which-is-long-enough-too' }));
    bad('crit header the gateway does not understand', signed(good(), { crit: ['exp'] }));
    bad('b64: false (unencoded payload)', signed(good(), { b64: false, crit: ['b64'] }));

    // Header type.
    bad('typ JWE', signed(good(), { typ: 'JWE' }));
    bad('typ dpop+jwt', signed(good(), { typ: 'dpop+jwt' }));
    bad('typ empty', signed(good(), { typ: '' }));

    // Time claims.
    bad('exp missing', signed(good({ exp: undefined })));
    bad('exp as a string', signed(good({ exp: String(now() + 600) })));
    bad('exp as a float', signed(good({ exp: now() + 600.5 })));
    bad('exp null', signed(good({ exp: null })));
    bad('exp boolean', signed(good({ exp: true })));
    bad('exp 1 hour ago', signed(good({ exp: now() - 3600 })), 'token_expired');
    bad('exp 31 s ago, just past the leeway', signed(good({ exp: now() - 31 })), 'token_expired');
    bad('nbf 10 minutes ahead', signed(good({ nbf: now() + 600 })));
    bad('nbf as a string', signed(good({ nbf: 'yesterday' })));
    bad('iat 10 minutes ahead', signed(good({ iat: now() + 600 })));
    bad('iat as a string', signed(good({ iat: 'now' })));

    // Issuer and audience (configured for this gateway).
    bad('iss missing', signed(good({ iss: undefined })));
    bad('iss of another issuer', signed(good({ iss: 'https://evil.example' })));
    bad('aud missing', signed(good({ aud: undefined })));
    bad('aud of another service', signed(good({ aud: 'grades' })));
    bad('aud list without us', signed(good({ aud: ['grades', 'lms'] })));

    // Role and subject.
    bad('role student on a dashboard', signed(good({ role: 'student', classroom: 'cls-101' })));
    bad('role admin', signed(good({ role: 'admin' })));
    bad('role missing', signed(good({ role: undefined })));
    bad('role as a number', signed(good({ role: 1 })));
    bad('sub missing', signed(good({ sub: undefined })));
    bad('sub empty', signed(good({ sub: '' })));
    bad('sub a number', signed(good({ sub: 42 })));

    // Valid tokens the directory turns away.
    bad('valid token, unknown instructor', signed(good({ sub: 'nobody@example.edu' })), 'instructor_not_found');
    bad('valid token, deactivated instructor', signed(good({ sub: 'gone@example.edu' })), 'instructor_inactive');

    for (const c of cases) if (c.auth?.token && typeof c.auth.token === 'string') gw.tokens.add(c.auth.token);
  });
  after(async () => { await gw?.stop(); });

  test('the table is large enough to mean something', () => {
    const refusals = cases.filter((c) => c.code !== null);
    assert.ok(refusals.length >= 30, `only ${refusals.length} hostile tokens`);
    assert.ok(cases.some((c) => c.code === null), 'controls present');
  });

  for (const transports of [['websocket'], ['polling']]) {
    test(`over ${transports[0]}: every token gets its exact answer`, { timeout: 120_000 }, async () => {
      const wrong = [];
      for (const c of cases) {
        const opts = { transports, ...(c.auth === undefined ? {} : { auth: c.auth }) };
        if (c.code === null) {
          try {
            const { socket } = await connectDashboard(gw, opts);
            close(gw, socket);
          } catch (e) {
            wrong.push(`${c.name}: expected acceptance, got ${e.connectError?.message ?? e.message}`);
          }
          continue;
        }
        try {
          const err = await expectRefusal(gw, opts);
          try { assertRefusal(err, c.code); } catch { wrong.push(`${c.name}: expected ${c.code}, got ${err.message}`); }
        } catch (e) {
          wrong.push(`${c.name}: expected ${c.code}, ${e.message}`);
        }
      }
      assert.deepEqual(wrong, []);
    });
  }

  test('the gateway is still healthy and counted every refusal', T, async () => {
    const res = await fetch(`${gw.url}/healthz`);
    assert.equal(res.status, 200);
    const text = await scrape(gw);
    const refused = cases.filter((c) => c.code !== null).length * 2;
    const counted = ['invalid_token', 'token_expired', 'instructor_not_found', 'instructor_inactive']
      .reduce((n, reason) => n + (metricValue(text, 'cellgate_auth_failures_total', { reason }) ?? 0), 0);
    assert.equal(counted, refused, 'cellgate_auth_failures_total counts each refusal once');
    assert.doesNotMatch(gw.logs(), /panicked/);
  });

  test('the gateway logs contain none of the tokens used', () => {
    assertNoSecretsInLogs(gw);
  });
});
