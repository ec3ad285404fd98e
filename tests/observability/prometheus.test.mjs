// Two gateway pods in cluster mode (shared Redis, one private PostgreSQL
// database), real traffic, and Debian's real Prometheus scraping both: every
// PromQL expression of the Grafana dashboard and of the alert rules must
// parse and return data.
//
//   node --test tests/observability/        (run.sh does the set-up)
//
// Needs `prometheus` on PATH, PostgreSQL on 127.0.0.1:5432 (user postgres,
// no password), Redis 7+ on 127.0.0.1:6379, and the built binary
// (CELLGATE_BIN, default target/debug/cellgate).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { startGateway, freePort, randomString, sleep } from '../e2e/lib/gateway.mjs';
import {
  ack, cellEvent, close, connectDashboard, craft, eventually, expectRefusal, helpEvent,
  instructorClaims, now, postEvents,
} from '../e2e/lib/helpers.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const DASHBOARD = path.join(root, 'grafana/dashboards/cellgate.json');
const RULES = path.join(root, 'prometheus/cellgate-alerts.yml');
const PODS = ['pod-a', 'pod-b'];
const SCRAPE_SECS = 1;

const run = (file, args) => new Promise((resolve) => {
  execFile(file, args, { timeout: 30_000 }, (error, stdout, stderr) =>
    resolve({ code: error ? (error.code ?? -1) : 0, stdout: String(stdout), stderr: String(stderr) }));
});

const psql = async (sql) => {
  const r = await run('psql', ['-h', '127.0.0.1', '-U', 'postgres', '-d', 'test', '-X', '-q',
    '-v', 'ON_ERROR_STOP=1', '-c', sql]);
  if (r.code !== 0) throw new Error(`psql ${sql}: ${r.stderr}`);
};

const suffix = randomBytes(4).toString('hex');
const dbName = `cellgate_obs_${suffix}`;
const classroom = `cls-obs-${suffix}`;
const pods = [];
let prom;

before(async () => {
  await psql(`CREATE DATABASE ${dbName}`);
  const shared = {
    databaseUrl: `postgres://postgres@127.0.0.1:5432/${dbName}`,
    secret: randomString(48),
  };
  for (const [i, pod] of PODS.entries()) {
    pods.push(await startGateway({
      databaseUrl: shared.databaseUrl,
      migrate: i === 0,
      env: {
        CELLGATE_JWT_SECRET: shared.secret,
        CELLGATE_REDIS_URL: 'redis://127.0.0.1:6379',
        CELLGATE_NODE_ID: `${pod}-${suffix}`,
      },
    }));
  }
  prom = await startPrometheus(pods);
});

after(async () => {
  await Promise.all(pods.map((gw) => gw.stop()));
  await prom?.stop();
  await psql(`DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`).catch(() => {});
});

test('the metrics are served on the metrics port only', async () => {
  const [gw] = pods;
  const app = await fetch(`${gw.url}/metrics`);
  await app.arrayBuffer();
  assert.equal(app.status, 404, '/metrics must not be reachable on the application port');
  const metrics = await fetch(`${gw.metricsUrl}/metrics`);
  const text = await metrics.text();
  assert.equal(metrics.status, 200);
  assert.match(text, /^process_open_fds /m);
});

test('the dashboard has its variables and every panel reads the chosen data source', async () => {
  const dashboard = JSON.parse(await readFile(DASHBOARD, 'utf8'));
  const vars = Object.fromEntries(dashboard.templating.list.map((v) => [v.name, v]));
  assert.equal(vars.datasource?.type, 'datasource');
  assert.equal(vars.datasource.query, 'prometheus');
  assert.equal(vars.pod?.type, 'query');
  assert.equal(vars.pod.includeAll, true);
  assert.equal(vars.pod.allValue ?? null, null, '"All" must expand to the cellgate pods only');
  const ids = new Set();
  for (const panel of dashboard.panels) {
    assert.ok(!ids.has(panel.id), `panel id ${panel.id} is unique`);
    ids.add(panel.id);
    assert.ok(panel.gridPos && panel.gridPos.w > 0, `${panel.title} is placed`);
    if (panel.type === 'row') continue;
    assert.equal(panel.datasource?.uid, '${datasource}', `${panel.title} data source`);
    for (const t of panel.targets) {
      assert.equal(t.datasource?.uid, '${datasource}', `${panel.title} target data source`);
      assert.match(t.expr, /\$pod/, `${panel.title}: ${t.expr} filters by pod`);
    }
  }
  const provider = await readFile(path.join(root, 'grafana/provisioning/dashboards/cellgate.yml'), 'utf8');
  assert.match(provider, /path: \/var\/lib\/grafana\/dashboards\/cellgate/);
});

test('every dashboard and alert expression returns data from a real Prometheus', { timeout: 120_000 }, async () => {
  await eventually(async () => (await query('sum(up{job="cellgate"})'))[0]?.value[1] === '2',
    { timeout: 30_000, message: 'Prometheus scrapes both pods' });
  await traffic(pods);
  // Let every pod be scraped a few times after the traffic (rates need two
  // samples), and the rules be evaluated.
  await sleep(5 * SCRAPE_SECS * 1000);

  const failures = [];
  const check = async (where, expr) => {
    try {
      const result = await query(expr);
      const finite = result.filter((s) => Number.isFinite(Number(s.value[1]))).length;
      if (result.length === 0) failures.push(`${where}: no data for ${expr}`);
      else if (finite === 0) failures.push(`${where}: only NaN for ${expr}`);
      else console.log(`ok ${where}: ${result.length} series (${finite} finite)`);
    } catch (error) {
      failures.push(`${where}: ${error.message}`);
    }
  };

  const dashboard = JSON.parse(await readFile(DASHBOARD, 'utf8'));
  const exprs = dashboardExpressions(dashboard);
  assert.ok(exprs.length >= 25, `only ${exprs.length} dashboard expressions`);
  for (const { panel, expr } of exprs) await check(`panel "${panel}"`, substitute(expr));

  const groups = await rules();
  const all = groups.flatMap((g) => g.rules);
  assert.ok(all.filter((r) => r.type === 'alerting').length >= 5, 'alert rules loaded');
  for (const rule of all) {
    assert.equal(rule.health, 'ok', `rule ${rule.name}: ${rule.lastError}`);
    const inner = rule.type === 'alerting' ? withoutThresholds(rule.query) : rule.query;
    await check(`${rule.type} rule ${rule.name}`, inner);
  }
  assert.deepEqual(failures, []);
});

test('the traffic shows in the series the panels are built on', async () => {
  const at = async (expr) => Number((await query(expr))[0]?.value[1] ?? NaN);
  assert.equal(await at('count(cellgate_connected_sockets{namespace="/"})'), 2, 'both pods');
  assert.ok(await at('sum(cellgate_auth_attempts_total)') >= 7);
  for (const reason of ['invalid_token', 'token_expired', 'instructor_not_found', 'instructor_inactive']) {
    assert.ok(await at(`sum(cellgate_auth_failures_total{reason="${reason}"})`) >= 1, reason);
  }
  assert.ok(await at('sum(cellgate_events_ingested_total{type="cell_executed"})') >= 6);
  assert.ok(await at('sum(cellgate_events_ingested_total{type="help_requested"})') >= 1);
  assert.ok(await at('sum(cellgate_events_rejected_total{reason="invalid"})') >= 1);
  assert.ok(await at('sum(cellgate_events_rejected_total{reason="unauthorized"})') >= 1);
  assert.ok(await at('sum(cellgate_event_delivery_duration_seconds_count)') >= 7);
  assert.ok(await at('sum(cellgate_broadcast_fanout_sockets_sum)') >= 1, 'broadcasts reached dashboards');
  assert.ok(await at('sum(cellgate_connections_closed_total{reason="client_disconnect"})') >= 1);
  assert.equal(await at('min(cellgate_cluster_healthy)'), 1);
});

// ------------------------------------------------------------ traffic ----

/** Dashboards on both pods, refusals for four reasons, events on both pods. */
async function traffic([a, b]) {
  await a.cli('instructors', 'add', 'ada@example.edu', '--name', 'Ada');
  await a.cli('instructors', 'add', 'bea@example.edu', '--name', 'Bea');
  await a.cli('instructors', 'add', 'cy@example.edu', '--name', 'Cy');
  await a.cli('instructors', 'deactivate', 'cy@example.edu');
  await a.cli('classrooms', 'add', classroom, '--seats', '30');
  await a.cli('classrooms', 'staff', classroom, 'ada@example.edu');
  await a.cli('classrooms', 'staff', classroom, 'bea@example.edu');

  const ada = await connectDashboard(a, { token: await a.cli('token', 'instructor', 'ada@example.edu') });
  const bea = await connectDashboard(b, { token: await b.cli('token', 'instructor', 'bea@example.edu') });
  for (const d of [ada, bea]) assert.equal((await ack(d.socket, 'join_classroom', { classroom })).ok, true);
  const leaving = await connectDashboard(b, { token: await b.cli('token', 'instructor', 'ada@example.edu') });
  close(b, leaving.socket);

  await expectRefusal(a, { token: 'not-a-jwt' });
  await expectRefusal(b, {});
  await expectRefusal(a, { token: craft(a, instructorClaims('ada@example.edu', { exp: now() - 3600 })) });
  await expectRefusal(b, { token: craft(b, instructorClaims('nobody@example.edu')) });
  await expectRefusal(a, { token: await a.cli('token', 'instructor', 'cy@example.edu') });

  const student = await a.cli('token', 'student', 's-0001', '--classroom', classroom, '--seat', '1');
  for (const [gw, n] of [[a, 4], [b, 2]]) {
    const events = Array.from({ length: n }, () =>
      cellEvent({ classroom, seat: 1, student: 's-0001', status: 'ok' }));
    assert.equal((await postEvents(gw, student, events)).status, 202);
  }
  const help = helpEvent({ classroom, seat: 1, student: 's-0001' });
  assert.equal((await postEvents(b, student, help)).status, 202);
  // Across pods too: posted to pod b, seen by the dashboard on pod a.
  for (const d of [ada, bea]) await d.rec.waitFor('help_requested');
  assert.equal((await postEvents(a, student, [{ type: 'cell_executed' }])).status, 400);
  assert.equal((await postEvents(a, 'not-a-jwt', cellEvent({ classroom }))).status, 401);
  assert.equal((await ack(ada.socket, 'claim_help', { request_id: help.id })).ok, true);
}

// --------------------------------------------------------- prometheus ----

async function startPrometheus(gateways) {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'cellgate-prom-'));
  const port = await freePort();
  const targets = gateways.map((gw, i) =>
    `      - targets: ['127.0.0.1:${gw.metricsPort}']\n        labels: { pod: '${PODS[i]}' }`);
  const config = [
    'global:',
    `  scrape_interval: ${SCRAPE_SECS}s`,
    `  evaluation_interval: ${SCRAPE_SECS}s`,
    'rule_files:',
    `  - '${RULES}'`,
    'scrape_configs:',
    '  - job_name: cellgate',
    '    static_configs:',
    ...targets,
    '',
  ].join('\n');
  await writeFile(path.join(dir, 'prometheus.yml'), config);

  const out = [];
  const proc = spawn('prometheus', [
    `--config.file=${path.join(dir, 'prometheus.yml')}`,
    `--storage.tsdb.path=${path.join(dir, 'data')}`,
    `--web.listen-address=127.0.0.1:${port}`,
    '--log.level=warn',
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  proc.stdout.on('data', (c) => out.push(c));
  proc.stderr.on('data', (c) => out.push(c));
  let exited = null;
  proc.on('exit', (code) => { exited = code; });

  const url = `http://127.0.0.1:${port}`;
  const stop = async () => {
    if (exited === null) {
      const gone = new Promise((r) => proc.once('exit', r));
      proc.kill('SIGTERM');
      await Promise.race([gone, sleep(5000)]);
      if (exited === null) proc.kill('SIGKILL');
    }
    await rm(dir, { recursive: true, force: true });
  };
  try {
    await eventually(async () => {
      if (exited !== null) throw new Error(`prometheus exited ${exited}: ${Buffer.concat(out)}`);
      return (await fetch(`${url}/-/ready`)).status === 200;
    }, { timeout: 30_000, message: 'prometheus ready' });
  } catch (error) {
    await stop();
    throw error;
  }
  return { url, stop };
}

async function api(pathname, params = {}) {
  const res = await fetch(`${prom.url}${pathname}?${new URLSearchParams(params)}`);
  const body = await res.json();
  if (body.status !== 'success') throw new Error(`${body.errorType}: ${body.error}`);
  return body.data;
}

async function query(expr) {
  const data = await api('/api/v1/query', { query: expr });
  assert.equal(data.resultType, 'vector', `${expr} is an instant vector`);
  return data.result;
}

const rules = async () => (await api('/api/v1/rules')).groups;

// --------------------------------------------------------- expressions ----

/** Every `expr` of every panel (rows included), with its panel's title. */
function dashboardExpressions(dashboard) {
  const panels = dashboard.panels.flatMap((p) => [p, ...(p.panels ?? [])]);
  return panels.flatMap((p) => (p.targets ?? []).map((t) => ({ panel: p.title, expr: t.expr })));
}

/** Grafana's variables as Grafana would expand them for "All" pods. */
function substitute(expr) {
  return expr
    .replaceAll('$__rate_interval', '1m')
    .replaceAll('$__interval', '15s')
    .replaceAll('$pod', PODS.join('|'));
}

/** An alert's expression without its numeric thresholds, so that it returns
 *  the measured values whether or not the alert would fire. */
export function withoutThresholds(expr) {
  return expr.replace(/\s*(==|!=|>=|<=|>|<)\s*(bool\s+)?-?\d+(\.\d+)?(e[+-]?\d+)?(?![\w.])/g, '');
}
