// The 200-seat classroom: students' notebook extensions POST events, 10 to
// 20 instructor dashboards on Socket.IO watch the classroom and claim help
// requests. See k6/README section in the main README ("Load tests").
//
//   k6 run -e CG_PROFILE=smoke k6/classroom.js     (k6/run.sh sets the rest)
//
// Environment:
//   CG_BASE_URL        gateway or load balancer, http://host:port
//   CG_CLASSROOM       classroom the students post to (exists, staffed)
//   CG_INSTRUCTORS     comma-separated e-mails of its staff (dashboard i uses i mod n)
//   CG_JWT_SECRET      the gateway's HS256 secret (tokens are minted here), or
//   CG_TOKENS_FILE     absolute path of { instructors: {email: token}, students: {"s-0001": token} }
//   CG_RUN_ID          prefix of every event id (unique per run: ids are remembered 24 h)
//   CG_PROFILE         smoke | full (lib/schedule.js); CG_STUDENTS, CG_DASHBOARDS override
//   CG_NODES           comma-separated pod names, to count dashboards per pod
//   CG_SEATS           the classroom's seat count (checked in the join snapshot)
//   CG_BREAK           drop_one | other_classroom: deliberately break delivery
//                      (CG_DECOY_CLASSROOM names the other classroom), to see
//                      the thresholds fail
//   CG_SUMMARY_JSON    where handleSummary writes the full k6 summary

import http from 'k6/http';
import { check, sleep } from 'k6';
import exec from 'k6/execution';
import { SharedArray } from 'k6/data';
import { Counter, Rate, Trend } from 'k6/metrics';

import { SocketIO } from './lib/socketio.js';
import { after, sleepMs } from './lib/timers.js';
import { Minter, loadTokenFile } from './lib/jwt.js';
import { PROFILES, buildPlans, summarize, phases, lessonEnd, deliveryKey, hash, studentId } from './lib/schedule.js';
import { summaryText } from './lib/summary.js';

const ENV = __ENV;

function required(name) {
  const value = ENV[name];
  if (!value) throw new Error(`${name} is required (k6/run.sh sets it)`);
  return value;
}

const PROFILE_NAME = ENV.CG_PROFILE || 'full';
if (!PROFILES[PROFILE_NAME]) throw new Error(`CG_PROFILE must be one of ${Object.keys(PROFILES)}`);
const P = { ...PROFILES[PROFILE_NAME] };
if (ENV.CG_STUDENTS) P.students = Number(ENV.CG_STUDENTS);
if (ENV.CG_DASHBOARDS) P.dashboards = Number(ENV.CG_DASHBOARDS);

const BASE = (ENV.CG_BASE_URL || 'http://127.0.0.1:3000').replace(/\/$/, '');
const CLASSROOM = required('CG_CLASSROOM');
const RUN_ID = required('CG_RUN_ID');
const INSTRUCTORS = required('CG_INSTRUCTORS').split(',').filter(Boolean);
const SEATS = Number(ENV.CG_SEATS || 200);
const NODES = (ENV.CG_NODES || '').split(',').filter(Boolean);
const BREAK = ENV.CG_BREAK || '';
const JOIN_CLASSROOM = BREAK === 'other_classroom' ? required('CG_DECOY_CLASSROOM') : CLASSROOM;
if (BREAK && !['drop_one', 'other_classroom'].includes(BREAK)) {
  throw new Error('CG_BREAK must be drop_one or other_classroom');
}

const TOKENS = ENV.CG_TOKENS_FILE ? loadTokenFile(ENV.CG_TOKENS_FILE) : null;
const minter = TOKENS ? null : new Minter(required('CG_JWT_SECRET'), { ttlSecs: 4 * 3600 });

function instructorToken(email) {
  if (!TOKENS) return minter.instructor(email);
  const token = TOKENS.instructors[email];
  if (!token) throw new Error(`no token for ${email} in CG_TOKENS_FILE`);
  return token;
}

function studentToken(seat) {
  if (!TOKENS) return minter.student(studentId(seat), CLASSROOM, seat);
  const token = TOKENS.students[studentId(seat)];
  if (!token) throw new Error(`no token for ${studentId(seat)} in CG_TOKENS_FILE`);
  return token;
}

// The whole lesson, computed once and shared read-only by every VU.
const SEED = hash(RUN_ID);
const plans = new SharedArray('plans', () => buildPlans(P, { classroom: CLASSROOM, runId: RUN_ID, seed: SEED }));
const TOTALS = new SharedArray('totals', () => [summarize(buildPlans(P, { classroom: CLASSROOM, runId: RUN_ID, seed: SEED }), P)])[0];
const PHASES = phases(P);
const LESSON_END = lessonEnd(P);

// Dashboard roles, by index: steady ones stay the whole lesson and are the
// ones that claim help; reloaders close and reconnect in every gap; late
// ones first join in the first gap.
const LATE_FROM = P.dashboards - P.late;
const RELOAD_FROM = LATE_FROM - P.reloaders;
const STEADY = RELOAD_FROM;
const RACERS = Math.min(3, STEADY);
const roleOf = (i) => (i >= LATE_FROM ? 'late' : i >= RELOAD_FROM ? 'reloader' : 'steady');
if (STEADY < 1) throw new Error('need at least one steady dashboard');

// Limits (README "Load tests" explains each).
const LIMITS = {
  deliveryP50: Number(ENV.CG_LIMIT_DELIVERY_P50_MS || 20),
  // The full run's run-all bursts send five times the smoke's frames per
  // second through the same two cores (k6 included): more room in the tail.
  deliveryP95: Number(ENV.CG_LIMIT_DELIVERY_P95_MS || (PROFILE_NAME === 'full' ? 250 : 150)),
  handshakeP95: Number(ENV.CG_LIMIT_HANDSHAKE_P95_MS || 500),
  ackP95: Number(ENV.CG_LIMIT_ACK_P95_MS || 1000),
};
const TOTAL_MS = P.leadMs + LESSON_END + P.tailMs;

export const options = {
  setupTimeout: '60s',
  summaryTrendStats: ['count', 'avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
  scenarios: {
    dashboards: {
      executor: 'per-vu-iterations',
      exec: 'dashboard',
      vus: P.dashboards,
      iterations: 1,
      maxDuration: `${Math.ceil(TOTAL_MS / 1000) + 60}s`,
    },
    students: {
      executor: 'per-vu-iterations',
      exec: 'student',
      vus: P.students,
      iterations: 1,
      maxDuration: `${Math.ceil(TOTAL_MS / 1000) + 60}s`,
    },
  },
  thresholds: {
    // Nothing posted while a dashboard was joined may be missing there.
    events_lost: ['count==0'],
    // Every dashboard finished and reported its count (no vacuous pass).
    dashboards_reported: [`count==${P.dashboards}`],
    // Every scheduled event was accepted (202), retries included.
    events_accepted: [`count==${TOTALS.events}`],
    post_failures: ['count==0'],
    unexpected_disconnects: ['count==0'],
    // Each help request claimed by exactly one of the racing dashboards.
    help_claims_won: [`count==${TOTALS.help}`],
    // Failed operations of every kind, and failed HTTP requests.
    errors: ['rate<0.001'],
    http_req_failed: ['rate<0.001'],
    checks: ['rate==1'],
    // A handshake whose WebSocket opened but whose Engine.IO open packet never
    // came is retried once (see BENCHMARKS.md); rare, but never systematic.
    handshake_stalled: ['rate<0.01'],
    delivery_latency: [`p(50)<${LIMITS.deliveryP50}`, `p(95)<${LIMITS.deliveryP95}`],
    handshake_duration: [`p(95)<${LIMITS.handshakeP95}`],
    ack_duration: [`p(95)<${LIMITS.ackP95}`],
  },
};

// --- metrics --------------------------------------------------------------

const deliveryLatency = new Trend('delivery_latency', true); // k6_sent_at -> dashboard
const fanoutLatency = new Trend('fanout_latency', true); // received_at -> dashboard
const handshakeDuration = new Trend('handshake_duration', true);
const ackDuration = new Trend('ack_duration', true);
const postLag = new Trend('post_lag', true); // how late a student posted vs. plan
const errors = new Rate('errors');
const handshakeStalled = new Rate('handshake_stalled'); // no Engine.IO open packet in 5 s
const eventsLost = new Counter('events_lost');
const eventsExpected = new Counter('events_expected');
const eventsDelivered = new Counter('events_delivered');
const eventsUnexpected = new Counter('events_unexpected');
const duplicateDeliveries = new Counter('duplicate_deliveries');
const dashboardsReported = new Counter('dashboards_reported');
const eventsAccepted = new Counter('events_accepted');
const postFailures = new Counter('post_failures');
const postRetries = new Counter('post_retries');
const unexpectedDisconnects = new Counter('unexpected_disconnects');
const lateRejoins = new Counter('late_rejoins');
const helpClaimsWon = new Counter('help_claims_won');
const helpClaimsConflicts = new Counter('help_claims_conflicts');
const helpResolved = new Counter('help_resolved_ok');
const helpCancelledSeen = new Counter('help_cancelled_deliveries');
const seatUpdates = new Counter('seat_updated_deliveries');
const perNode = {};
for (const node of NODES) perNode[node] = new Counter(`dashboards_on_${node.replace(/[^A-Za-z0-9_]/g, '_')}`);

const wait = sleepMs;

/**
 * A client address from a documentation range, for X-Forwarded-For: behind
 * a proxy the gateway trusts, each student and each instructor's machine is
 * a client of its own, as in a classroom (never an address traffic goes to).
 */
function clientAddress(net, n) {
  return `${net}.${1 + (n % 254)}`;
}
const index = () => exec.scenario.iterationInTest;

export function setup() {
  // One shared clock: the first phase starts leadMs from now.
  const t0 = Date.now() + P.leadMs;
  console.log(`classroom ${CLASSROOM}: ${P.students} students, ${P.dashboards} dashboards ` +
    `(${STEADY} steady, ${P.reloaders} reloading, ${P.late} late), ${TOTALS.events} events ` +
    `(${TOTALS.cells} cells, ${TOTALS.errors} failed, ${TOTALS.help} help requests, ` +
    `${TOTALS.cancels} cancellations) in ${TOTALS.posts} posts over ${LESSON_END / 1000} s`);
  return { t0 };
}

// --- students --------------------------------------------------------------

let studentAddress = '';

export function student(data) {
  const seat = index() + 1;
  const plan = plans[seat - 1];
  const token = studentToken(seat);
  studentAddress = clientAddress('192.0.2', seat - 1);
  eventsAccepted.add(0);
  postFailures.add(0);
  for (const post of plan) {
    const due = data.t0 + post.at;
    const ahead = due - Date.now();
    if (ahead > 0) sleep(ahead / 1000);
    postLag.add(Math.max(0, Date.now() - due));
    send(post, token);
  }
}

function send(post, token) {
  const sentAt = Date.now();
  const occurred = new Date(sentAt).toISOString();
  const events = post.events.map((e) => ({ ...e, occurred_at: occurred, k6_sent_at: sentAt }));
  const body = JSON.stringify(events.length === 1 ? events[0] : events);
  const params = {
    headers: {
      Authorization: `Bearer ${token}`,
      'Content-Type': 'application/json',
      'X-Forwarded-For': studentAddress,
    },
    tags: { name: 'POST /api/v1/events' },
    timeout: '10s',
  };
  for (let attempt = 1; attempt <= 6; attempt++) {
    const res = http.post(`${BASE}/api/v1/events`, body, params);
    if (res.status === 202) {
      const answer = res.json();
      const ok = check(answer, {
        'every event of a post is accepted or a retry duplicate': (a) => a.accepted + a.duplicates === events.length,
        'a first attempt has no duplicates': (a) => attempt > 1 || a.duplicates === 0,
      });
      errors.add(!ok);
      eventsAccepted.add(events.length);
      return;
    }
    const retryable = res.status === 0 || res.status === 429 || res.status === 503 || res.status === 502;
    errors.add(true);
    if (!retryable) {
      console.error(`POST /api/v1/events answered ${res.status}: ${String(res.body).slice(0, 300)}`);
      break;
    }
    postRetries.add(1);
    const after = Number(res.headers['Retry-After'] || 0);
    sleep(Math.min(after > 0 ? after : 0.2, 2));
  }
  postFailures.add(1);
}

// --- dashboards ------------------------------------------------------------

/** Keys of every event a dashboard joined over [from, to] must have (absolute ms). */
function expectedKeys(t0, from, to) {
  const keys = [];
  for (let s = 0; s < plans.length; s++) {
    const plan = plans[s];
    for (const post of plan) {
      const at = t0 + post.at;
      if (at < from || at > to) continue;
      for (const e of post.events) {
        if (e.type === 'cell_executed' || e.type === 'help_requested') keys.push(deliveryKey(e.type, e.id));
      }
    }
  }
  return keys;
}

export async function dashboard(data) {
  const me = index();
  const role = roleOf(me);
  const transport = me % 2 === 0 ? 'polling' : 'websocket';
  const email = INSTRUCTORS[me % INSTRUCTORS.length];
  const token = instructorToken(email);
  const t0 = data.t0;
  const state = {
    received: {},
    intervals: [],
    current: null,
    socket: null,
    dropNext: BREAK === 'drop_one' && me === 0,
  };
  eventsLost.add(0);
  unexpectedDisconnects.add(0);
  helpClaimsWon.add(0);

  const claim = async (requestId) => {
    const socket = state.socket;
    if (!socket || !socket.connected) return;
    const answer = await ack(socket, 'claim_help', { request_id: requestId });
    if (!answer) return;
    if (answer.ok) {
      helpClaimsWon.add(1);
      await ack(socket, 'set_status', { status: 'helping' });
      const helping = (PROFILE_NAME === 'full' ? 8000 : 2000) + (hash(`${requestId}/h`) % (PROFILE_NAME === 'full' ? 7000 : 2000));
      await wait(helping);
      if (!socket.connected) return;
      const resolved = await ack(socket, 'resolve_help', { request_id: requestId }, ['cancelled']);
      if (resolved && resolved.ok) helpResolved.add(1);
      await ack(socket, 'set_status', { status: 'available' });
    } else if (answer.error === 'already_claimed') {
      helpClaimsConflicts.add(1);
      check(answer, { 'already_claimed names the winner': (a) => !!(a.by && a.by.id && a.by.name) });
    } else {
      console.warn(`claim_help ${requestId}: ${JSON.stringify(answer)}`);
    }
  };

  const onCell = (event) => {
    const now = Date.now();
    if (state.dropNext) {
      state.dropNext = false; // CG_BREAK=drop_one: pretend this one never came
      return;
    }
    const key = deliveryKey('cell_executed', event.id);
    if (state.received[key]) {
      duplicateDeliveries.add(1);
      return;
    }
    state.received[key] = now;
    if (typeof event.k6_sent_at === 'number') deliveryLatency.add(now - event.k6_sent_at);
    const received = Date.parse(event.received_at);
    if (!Number.isNaN(received)) fanoutLatency.add(now - received);
  };

  const onHelp = (request) => {
    const key = deliveryKey('help_requested', request.request_id);
    if (state.received[key]) {
      duplicateDeliveries.add(1);
      return;
    }
    state.received[key] = Date.now();
    if (role !== 'steady') return;
    // A few steady dashboards race for each request after a human pause.
    const h = hash(request.request_id);
    for (let k = 0; k < RACERS; k++) {
      if ((h + k) % STEADY === me) {
        after(300 + (hash(`${request.request_id}/${me}`) % 1200), () => {
          claim(request.request_id).catch((e) => {
            errors.add(true);
            console.warn(`claim_help failed: ${e}`);
          });
        });
      }
    }
  };

  const session = async (retried = false) => {
    const socket = new SocketIO(BASE, {
      auth: { token },
      transport,
      headers: { 'X-Forwarded-For': clientAddress('203.0.113', me % INSTRUCTORS.length) },
      tags: { transport },
      connectTimeoutMs: 15000,
      ackTimeoutMs: 10000,
    });
    socket.on('cell_executed', onCell);
    socket.on('help_requested', onHelp);
    // Counted, not parsed: the load generator shares the cores with the pods.
    socket.count('help_cancelled').count('seat_updated');
    socket.onClose((reason) => {
      const counts = socket.counts();
      helpCancelledSeen.add(counts.help_cancelled || 0);
      seatUpdates.add(counts.seat_updated || 0);
      if (state.current && state.current.socket === socket && state.current.to === null) {
        state.current.to = Date.now();
        if (!state.current.leaving) {
          unexpectedDisconnects.add(1);
          errors.add(true);
          console.warn(`dashboard ${me} lost its connection: ${reason}`);
        }
      }
    });
    let accepted;
    try {
      accepted = await socket.connect();
      handshakeStalled.add(false);
    } catch (e) {
      if (e.code === 'open_timeout' && !retried) {
        // Like socket.io-client after its connect time-out: try again.
        handshakeStalled.add(true);
        console.warn(`dashboard ${me}: ${e.message}; trying again`);
        return session(true);
      }
      errors.add(true);
      console.error(`dashboard ${me} (${transport}) could not connect: ${e.message || e}`);
      return null;
    }
    handshakeDuration.add(accepted.timings.total, { transport });
    errors.add(false);
    check(accepted.accepted, {
      'connection_accepted names the instructor': (a) => a.instructor && a.instructor.email === email.toLowerCase(),
      'connection_accepted names the pod': (a) => NODES.length === 0 || NODES.includes(a.node),
    });
    const node = accepted.accepted.node;
    if (perNode[node]) perNode[node].add(1);

    state.socket = socket;
    const joined = await ack(socket, 'join_classroom', { classroom: JOIN_CLASSROOM });
    if (!joined || !joined.ok) {
      console.error(`dashboard ${me}: join_classroom answered ${JSON.stringify(joined)}`);
      socket.close();
      return null;
    }
    check(joined.snapshot, {
      'the join snapshot has every seat': (s) => s.classroom === JOIN_CLASSROOM && s.seats.length === SEATS,
    });
    state.current = { socket, from: Date.now(), to: null, leaving: false };
    state.intervals.push(state.current);
    return socket;
  };

  const leave = async (untilMs) => {
    const current = state.current;
    if (!current || current.to !== null) return;
    // Wait for everything posted while joined (a student may post a little
    // late), but no longer than untilMs.
    const keys = expectedKeys(t0, current.from, Date.now());
    while (Date.now() < untilMs && keys.some((k) => !state.received[k])) await wait(100);
    current.leaving = true;
    await ack(current.socket, 'leave_classroom', { classroom: JOIN_CLASSROOM });
    current.to = Date.now();
    current.socket.close();
    state.socket = null;
  };

  // Steady and reloading dashboards open during the lead, a little apart;
  // late ones in the first gap.
  const firstGap = PHASES.length > 1 ? PHASES[0].end : LESSON_END;
  const openAt = role === 'late'
    ? t0 + firstGap + 1000
    : t0 - P.leadMs + 1000 + Math.floor((me * P.leadMs * 0.5) / P.dashboards);
  await wait(openAt - Date.now());
  await session();

  if (role === 'reloader') {
    for (let p = 0; p + 1 < PHASES.length; p++) {
      const gapStart = t0 + PHASES[p].end;
      const gapEnd = t0 + PHASES[p + 1].start;
      await wait(gapStart - Date.now());
      await leave(gapEnd - 3000);
      await wait(200 + (hash(`${RUN_ID}/${me}/${p}`) % 600)); // the page reloads
      await session();
      if (state.current && state.current.from > gapEnd) lateRejoins.add(1);
    }
  }

  await wait(t0 + LESSON_END + P.tailMs - Date.now());
  await leave(Date.now() + 5000);

  // Every event planned while this dashboard was joined must be here.
  let expected = 0;
  let got = 0;
  const missing = [];
  const counted = {};
  for (const interval of state.intervals) {
    for (const key of expectedKeys(t0, interval.from, interval.to)) {
      if (counted[key]) continue;
      counted[key] = true;
      expected += 1;
      if (state.received[key]) got += 1;
      else if (missing.length < 5) missing.push(key);
    }
  }
  const extra = Object.keys(state.received).filter((k) => !counted[k]).length;
  if (role === 'steady') {
    // A dashboard that left early would expect (and so miss) less: make sure it didn't.
    const first = state.intervals[0];
    check(first, {
      'a steady dashboard is joined for the whole lesson': (i) => !!i && i.from <= t0 && i.to >= t0 + LESSON_END,
    });
  }
  eventsExpected.add(expected);
  eventsDelivered.add(got);
  eventsLost.add(expected - got);
  eventsUnexpected.add(extra);
  dashboardsReported.add(1);
  if (expected - got > 0) {
    console.error(`dashboard ${me} (${role}, ${transport}) missed ${expected - got} of ${expected}, e.g. ${missing.join(' ')}`);
  }
}

/** emitWithAck with the metrics; null when it failed. `tolerated` errors are answers, not failures. */
async function ack(socket, event, payload, tolerated = []) {
  try {
    const { answer, ms } = await socket.emitWithAck(event, payload);
    ackDuration.add(ms, { event });
    const fine = answer && (answer.ok || answer.error === 'already_claimed' || tolerated.includes(answer.error));
    errors.add(!fine);
    if (!fine && event !== 'claim_help') console.warn(`${event} answered ${JSON.stringify(answer)}`);
    return answer;
  } catch (e) {
    errors.add(true);
    console.warn(`${event}: ${e}`);
    return null;
  }
}

export function handleSummary(data) {
  const text = summaryText(data, `classroom (${PROFILE_NAME}): ${P.students} students, ${P.dashboards} dashboards, ${TOTALS.events} events`, [
    {
      title: 'delivery',
      rows: [
        ['events accepted (202)', 'events_accepted', 'count'],
        ['deliveries expected (events x dashboards joined)', 'events_expected', 'count'],
        ['deliveries received', 'events_delivered', 'count'],
        ['deliveries lost', 'events_lost', 'count'],
        ['received outside a joined window', 'events_unexpected', 'count'],
        ['duplicate deliveries', 'duplicate_deliveries', 'count'],
        ['seat_updated received', 'seat_updated_deliveries', 'count'],
        ['help_cancelled received', 'help_cancelled_deliveries', 'count'],
        ['send -> dashboard (delivery_latency)', 'delivery_latency', 'trend'],
        ['gateway received_at -> dashboard', 'fanout_latency', 'trend'],
        ['POST /api/v1/events round trip', 'http_req_duration', 'trend'],
        ['student posted late by (post_lag)', 'post_lag', 'trend'],
        ['post retries', 'post_retries', 'count'],
      ],
    },
    {
      title: 'dashboards',
      rows: [
        ['handshake to connection_accepted', 'handshake_duration', 'trend'],
        ['acknowledgements', 'ack_duration', 'trend'],
        ['dashboards that reported', 'dashboards_reported', 'count'],
        ['unexpected disconnects', 'unexpected_disconnects', 'count'],
        ['handshakes stalled before the open packet (retried)', 'handshake_stalled', 'rate'],
        ['rejoins after their phase had started', 'late_rejoins', 'count'],
        ...NODES.map((n) => [`sessions on ${n}`, `dashboards_on_${n.replace(/[^A-Za-z0-9_]/g, '_')}`, 'count']),
        ['help claims won', 'help_claims_won', 'count'],
        ['help claims lost to a colleague', 'help_claims_conflicts', 'count'],
        ['help requests resolved', 'help_resolved_ok', 'count'],
      ],
    },
    {
      title: 'errors',
      rows: [
        ['failed operations (errors)', 'errors', 'rate'],
        ['failed HTTP requests', 'http_req_failed', 'rate'],
        ['checks', 'checks', 'rate'],
        ['posts never accepted', 'post_failures', 'count'],
      ],
    },
  ]);
  const out = { stdout: text };
  if (ENV.CG_SUMMARY_JSON) out[ENV.CG_SUMMARY_JSON] = JSON.stringify(data, null, 1);
  return out;
}
