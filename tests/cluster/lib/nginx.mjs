// Debian's nginx in front of the pods, run as a foreground process of the
// test with its own configuration, logs and temp files in a temp dir.
//
// The cookie-affinity configuration is the README's own nginx snippet
// (section "Load balancers and sticky sessions"), read from README.md with
// only the upstream servers and the listen address filled in, so that what
// the README tells operators is what these tests run.

import { spawn } from 'node:child_process';
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { freePort, sleep } from './cluster.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const README = path.resolve(here, '../../../README.md');

/** The README's nginx block, as written there. */
export async function readmeNginxSnippet() {
  const text = await readFile(README, 'utf8');
  const m = /```nginx\n([\s\S]*?)```/.exec(text);
  if (!m) throw new Error('README.md has no ```nginx block');
  return m[1];
}

/** The README's snippet with our servers and listen address. */
function affinityServer(snippet, servers, port) {
  const upstream = /(upstream\s+\w+\s*\{[^}]*?)((?:\s*server\s+[^;]+;)+)(\s*\})/;
  if (!upstream.test(snippet)) throw new Error(`no upstream with servers in the README snippet:\n${snippet}`);
  let conf = snippet.replace(upstream, (_, head, _servers, tail) =>
    `${head} ${servers.map((s) => `server ${s};`).join(' ')}${tail}`);
  if (!/server\s*\{/.test(conf)) throw new Error('no server block in the README snippet');
  conf = conf.replace(/server\s*\{/, `server {\n  listen 127.0.0.1:${port};`);
  return conf;
}

/** Round robin, no affinity: for clients that speak WebSocket only. */
function roundRobinServer(servers, port) {
  return `
upstream cellgate_rr { ${servers.map((s) => `server ${s};`).join(' ')} }
server {
  listen 127.0.0.1:${port};
  location / {
    proxy_pass http://cellgate_rr;
    proxy_http_version 1.1;
    proxy_set_header Upgrade $http_upgrade;
    proxy_set_header Connection "upgrade";
    proxy_read_timeout 3600s;
  }
}`;
}

/**
 * Starts nginx with two front doors to `servers` ("127.0.0.1:port"):
 * `url` with the README's cookie affinity, `rrUrl` round robin.
 * `accessLog()` parses the access log: one { at, ms, status, method, uri,
 * sid, upstream, upstreamStatus, cookie } per request.
 */
export async function startNginx(servers) {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'cellgate-nginx-'));
  // nginx workers run as nobody when the master is root: let them write temp files.
  await chmod(dir, 0o755);
  for (const t of ['body', 'proxy', 'fastcgi', 'uwsgi', 'scgi']) {
    await mkdir(path.join(dir, t));
    await chmod(path.join(dir, t), 0o777);
  }
  const [port, rrPort] = [await freePort(), await freePort()];
  const snippet = await readmeNginxSnippet();
  const conf = `
worker_processes 1;
worker_rlimit_nofile 16384;
error_log ${dir}/error.log warn;
events { worker_connections 8192; }
http {
  client_body_temp_path ${dir}/body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  log_format cg '$msec $status $request_method "$request_uri" "$upstream_addr" "$upstream_status" "$cookie_cgaff" $request_time';
  access_log ${dir}/access.log cg;
  # ---- README.md, "Load balancers and sticky sessions" ----
${affinityServer(snippet, servers, port)}
  # ---- websocket-only clients, no affinity ----
${roundRobinServer(servers, rrPort)}
}
`;
  const confFile = path.join(dir, 'nginx.conf');
  await writeFile(confFile, conf);
  const out = [];
  const proc = spawn('nginx', ['-p', dir, '-e', `${dir}/error.log`, '-c', confFile,
    '-g', `daemon off; pid ${dir}/nginx.pid;`], { stdio: ['ignore', 'pipe', 'pipe'] });
  proc.stdout.on('data', (b) => out.push(b));
  proc.stderr.on('data', (b) => out.push(b));
  const ngx = {
    dir,
    conf,
    url: `http://127.0.0.1:${port}`,
    rrUrl: `http://127.0.0.1:${rrPort}`,
    proc,
    errorLog: async () => readFile(path.join(dir, 'error.log'), 'utf8').catch(() => ''),
    accessLog: async () => (await readFile(path.join(dir, 'access.log'), 'utf8').catch(() => ''))
      .split('\n').filter(Boolean).map(parseLine),
    stop: async () => {
      if (proc.exitCode === null && proc.signalCode === null) {
        const exited = new Promise((r) => proc.once('exit', r));
        proc.kill('SIGQUIT');
        const t = setTimeout(() => proc.kill('SIGKILL'), 5000);
        await exited;
        clearTimeout(t);
      }
      await rm(dir, { recursive: true, force: true });
    },
  };
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (proc.exitCode !== null) {
      throw new Error(`nginx exited ${proc.exitCode}: ${Buffer.concat(out)}\n${await ngx.errorLog()}\n${conf}`);
    }
    try {
      const r = await fetch(`${ngx.url}/healthz`, { signal: AbortSignal.timeout(1000) });
      await r.arrayBuffer();
      if (r.status === 200) break;
    } catch { /* not yet */ }
    if (Date.now() > deadline) {
      await ngx.stop();
      throw new Error(`nginx did not answer within 10 s: ${Buffer.concat(out)}`);
    }
    await sleep(50);
  }
  return ngx;
}

function parseLine(line) {
  const m = /^(\S+) (\d+) (\S+) "([^"]*)" "([^"]*)" "([^"]*)" "([^"]*)" (\S+)$/.exec(line);
  if (!m) return { raw: line };
  const [, msec, status, method, uri, upstream, upstreamStatus, cookie, requestTime] = m;
  const sid = /[?&]sid=([^&]+)/.exec(uri)?.[1];
  return {
    // when the request ended, and how long it took, in ms
    at: Math.round(Number(msec) * 1000),
    ms: Math.round(Number(requestTime) * 1000),
    status: Number(status), method, uri, upstream, upstreamStatus, cookie, sid, raw: line,
  };
}
