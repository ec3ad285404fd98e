// Handshake storm: every dashboard of a classroom reconnects at the same
// instant, as after a pod restart, while clients with bad tokens knock at
// the same moment. Valid dashboards must all get back in (and rejoin) fast;
// no bad token may ever be accepted, and each must be refused with the code
// the wire contract promises for it.
//
//   k6 run -e CG_PROFILE=smoke k6/handshake-storm.js   (k6/run.sh sets the rest)
//
// Environment (besides CG_BASE_URL, CG_JWT_SECRET, CG_RUN_ID, CG_SUMMARY_JSON,
// as in classroom.js):
//   CG_CLASSROOM             the classroom the dashboards rejoin
//   CG_INSTRUCTORS           its staff; dashboard i signs in as i mod n
//   CG_INACTIVE_INSTRUCTOR   a deactivated instructor (expects instructor_inactive)
//   CG_UNKNOWN_INSTRUCTOR    an e-mail not in the directory (expects instructor_not_found)
//   CG_VALID, CG_INVALID     how many of each take part
//   CG_PROFILE               smoke (2 rounds, 8 s apart) | full (3 rounds, 32 s apart:
//                            past the 30 s directory cache, so each round is cold)

import exec from 'k6/execution';
import { check } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';

import { SocketIO, ConnectRefused } from './lib/socketio.js';
import { Minter } from './lib/jwt.js';
import { sleepMs } from './lib/timers.js';
import { summaryText } from './lib/summary.js';

const ENV = __ENV;
function required(name) {
  const value = ENV[name];
  if (!value) throw new Error(`${name} is required (k6/run.sh sets it)`);
  return value;
}

const PROFILE_NAME = ENV.CG_PROFILE || 'full';
const SHAPE = {
  full: { rounds: 3, roundEveryMs: 32000, leadMs: 10000 },
  smoke: { rounds: 2, roundEveryMs: 8000, leadMs: 6000 },
}[PROFILE_NAME];
if (!SHAPE) throw new Error('CG_PROFILE must be smoke or full');

const BASE = (ENV.CG_BASE_URL || 'http://127.0.0.1:3000').replace(/\/$/, '');
const CLASSROOM = required('CG_CLASSROOM');
const INSTRUCTORS = required('CG_INSTRUCTORS').split(',').filter(Boolean);
const VALID = Number(ENV.CG_VALID || (PROFILE_NAME === 'full' ? 150 : 40));
const INVALID = Number(ENV.CG_INVALID || (PROFILE_NAME === 'full' ? 50 : 20));
const minter = new Minter(required('CG_JWT_SECRET'), { ttlSecs: 4 * 3600 });

const LIMITS = {
  stormHandshakeP95: Number(ENV.CG_LIMIT_STORM_HANDSHAKE_P95_MS || 2000),
  refusalP95: Number(ENV.CG_LIMIT_REFUSAL_P95_MS || 2000),
};

export const options = {
  setupTimeout: '30s',
  summaryTrendStats: ['count', 'avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
  scenarios: {
    storm: {
      executor: 'per-vu-iterations',
      vus: VALID + INVALID,
      iterations: 1,
      maxDuration: `${Math.ceil((SHAPE.leadMs + SHAPE.rounds * SHAPE.roundEveryMs) / 1000) + 60}s`,
    },
  },
  thresholds: {
    // A bad token is never let in, and is told exactly why.
    invalid_accepted: ['count==0'],
    wrong_refusal_code: ['count==0'],
    refused_as_expected: [`count==${INVALID * SHAPE.rounds}`],
    // Every valid dashboard is back, and back in its classroom, each round.
    valid_refused: ['count==0'],
    valid_rejoined: [`count==${VALID * SHAPE.rounds}`],
    errors: ['rate<0.001'],
    // A WebSocket that opened without an Engine.IO open packet is retried
    // once (see BENCHMARKS.md); rare, but never systematic.
    handshake_stalled: ['rate<0.01'],
    storm_handshake: [`p(95)<${LIMITS.stormHandshakeP95}`],
    storm_refusal: [`p(95)<${LIMITS.refusalP95}`],
  },
};

const stormHandshake = new Trend('storm_handshake', true); // reconnect -> connection_accepted
const stormRejoin = new Trend('storm_rejoin', true); // reconnect -> join_classroom answered
const stormRefusal = new Trend('storm_refusal', true); // attempt -> connect_error
const firstHandshake = new Trend('first_handshake', true); // the calm connect before the storms
const errors = new Rate('errors');
const handshakeStalled = new Rate('handshake_stalled'); // no Engine.IO open packet in 5 s
const invalidAccepted = new Counter('invalid_accepted');
const wrongCode = new Counter('wrong_refusal_code');
const refusedAsExpected = new Counter('refused_as_expected');
const validRefused = new Counter('valid_refused');
const validRejoined = new Counter('valid_rejoined');

const wait = sleepMs;

// The bad tokens, each with the code it must get. Minted once per VU.
function badTokens() {
  const kinds = minter.invalid(INSTRUCTORS[0]);
  kinds.push({ kind: 'inactive_instructor', code: 'instructor_inactive', token: minter.instructor(required('CG_INACTIVE_INSTRUCTOR')) });
  kinds.push({ kind: 'unknown_instructor', code: 'instructor_not_found', token: minter.instructor(required('CG_UNKNOWN_INSTRUCTOR')) });
  return kinds;
}

export function setup() {
  return { t0: Date.now() + SHAPE.leadMs };
}

export default async function (data) {
  const me = exec.scenario.iterationInTest;
  const transport = me % 2 === 0 ? 'polling' : 'websocket';
  const stormAt = (round) => data.t0 + round * SHAPE.roundEveryMs;
  invalidAccepted.add(0);
  wrongCode.add(0);
  validRefused.add(0);
  if (me < VALID) await validDashboard(me, transport, stormAt);
  else await badClient(me - VALID, transport, stormAt);
}

// Client addresses for X-Forwarded-For, from documentation ranges: each
// instructor's machine has one, each bad client another.
const address = (net, n) => `${net}.${1 + (n % 254)}`;

async function connectAndJoin(token, transport, xff, onDone, retried = false) {
  const socket = new SocketIO(BASE, {
    auth: { token },
    transport,
    headers: { 'X-Forwarded-For': xff },
    tags: { transport },
    connectTimeoutMs: 20000,
  });
  const started = Date.now();
  let accepted;
  try {
    accepted = await socket.connect();
    handshakeStalled.add(false);
  } catch (e) {
    if (e.code !== 'open_timeout' || retried) throw e;
    // Like socket.io-client after its connect time-out: try again.
    handshakeStalled.add(true);
    console.warn(`${e.message}; trying again`);
    return connectAndJoin(token, transport, xff, onDone, true);
  }
  onDone(accepted.timings.total);
  const { answer } = await socket.emitWithAck('join_classroom', { classroom: CLASSROOM });
  if (!answer || !answer.ok) throw new Error(`join_classroom answered ${JSON.stringify(answer)}`);
  return { socket, rejoinMs: Date.now() - started };
}

async function validDashboard(me, transport, stormAt) {
  const token = minter.instructor(INSTRUCTORS[me % INSTRUCTORS.length]);
  const xff = address('203.0.113', me % INSTRUCTORS.length);
  // Before the storm: dashboards open over the lead, a little apart.
  await wait(stormAt(0) - SHAPE.leadMs + 500 + Math.floor((me * SHAPE.leadMs * 0.6) / VALID) - Date.now());
  let socket = null;
  try {
    ({ socket } = await connectAndJoin(token, transport, xff, (ms) => firstHandshake.add(ms, { transport })));
  } catch (e) {
    errors.add(true);
    console.error(`dashboard ${me} could not connect before the storm: ${e.message || e}`);
  }
  for (let round = 1; round <= SHAPE.rounds; round++) {
    await wait(stormAt(round) - Date.now());
    // The pod is gone: every connection drops at once, and every dashboard
    // comes straight back.
    if (socket) socket.drop();
    socket = null;
    try {
      const rejoined = await connectAndJoin(token, transport, xff, (ms) => stormHandshake.add(ms, { transport }));
      socket = rejoined.socket;
      stormRejoin.add(rejoined.rejoinMs, { transport });
      validRejoined.add(1);
      errors.add(false);
    } catch (e) {
      errors.add(true);
      if (e instanceof ConnectRefused) validRefused.add(1);
      console.error(`dashboard ${me} round ${round}: ${e.message || e}`);
    }
  }
  await wait(2000);
  if (socket) socket.close();
}

async function badClient(n, transport, stormAt) {
  const kinds = badTokens();
  for (let round = 1; round <= SHAPE.rounds; round++) {
    const bad = kinds[(n + round) % kinds.length];
    await wait(stormAt(round) - Date.now());
    const socket = new SocketIO(BASE, {
      auth: bad.token === null ? null : { token: bad.token },
      transport,
      headers: { 'X-Forwarded-For': address('198.51.100', n) },
      tags: { transport },
      connectTimeoutMs: 20000,
    });
    const started = Date.now();
    try {
      await socket.connect();
      invalidAccepted.add(1, { kind: bad.kind });
      errors.add(true);
      console.error(`a ${bad.kind} token was ACCEPTED`);
      socket.close();
    } catch (e) {
      if (e instanceof ConnectRefused) {
        stormRefusal.add(Date.now() - started, { transport });
        const right = check(e, { [`${bad.kind} is refused with ${bad.code}`]: (r) => r.code === bad.code });
        if (right) refusedAsExpected.add(1);
        else {
          wrongCode.add(1, { kind: bad.kind });
          console.error(`a ${bad.kind} token was refused with ${e.code}, not ${bad.code}`);
        }
        errors.add(!right);
      } else {
        errors.add(true);
        console.error(`a ${bad.kind} attempt failed below Socket.IO: ${e.code || e}`);
      }
    }
  }
}

export function handleSummary(data) {
  const text = summaryText(data, `handshake storm (${PROFILE_NAME}): ${VALID} dashboards + ${INVALID} bad tokens, ${SHAPE.rounds} rounds`, [
    {
      title: 'valid dashboards',
      rows: [
        ['first connect, before the storm', 'first_handshake', 'trend'],
        ['storm: reconnect -> connection_accepted', 'storm_handshake', 'trend'],
        ['storm: reconnect -> classroom rejoined', 'storm_rejoin', 'trend'],
        ['rejoined', 'valid_rejoined', 'count'],
        ['refused (must be 0)', 'valid_refused', 'count'],
        ['handshakes stalled before the open packet (retried)', 'handshake_stalled', 'rate'],
      ],
    },
    {
      title: 'bad tokens',
      rows: [
        ['attempt -> connect_error', 'storm_refusal', 'trend'],
        ['refused with the right code', 'refused_as_expected', 'count'],
        ['refused with another code', 'wrong_refusal_code', 'count'],
        ['ACCEPTED (must be 0)', 'invalid_accepted', 'count'],
      ],
    },
    { title: 'errors', rows: [['failed operations (errors)', 'errors', 'rate'], ['checks', 'checks', 'rate']] },
  ]);
  const out = { stdout: text };
  if (ENV.CG_SUMMARY_JSON) out[ENV.CG_SUMMARY_JSON] = JSON.stringify(data, null, 1);
  return out;
}
