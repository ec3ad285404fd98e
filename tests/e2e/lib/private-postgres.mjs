// A PostgreSQL server of the test's own, on a free port and in a temporary
// directory, so that a test may stop and restart it without touching the
// machine's shared service.
//
//   const pg = await startPrivatePostgres();
//   ... pg.url ... await pg.stop(); await pg.start(); ...
//   await pg.destroy();
//
// Runs Debian's binaries (/usr/lib/postgresql/<version>/bin). initdb and
// the server refuse to run as root, so as root they run as the `postgres`
// user, which owns the data directory.

import { execFile } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { chmod, chown, copyFile, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { freePort } from './gateway.mjs';

function binDir() {
  const root = '/usr/lib/postgresql';
  if (!existsSync(root)) throw new Error('PostgreSQL server binaries not found under /usr/lib/postgresql');
  const versions = readdirSync(root).filter((v) => existsSync(path.join(root, v, 'bin/initdb')));
  if (versions.length === 0) throw new Error('no initdb under /usr/lib/postgresql/*/bin');
  versions.sort((a, b) => Number(b) - Number(a));
  return path.join(root, versions[0], 'bin');
}

function run(file, args, { asPostgres, timeout = 60_000 } = {}) {
  const [cmd, argv] = asPostgres ? ['runuser', ['-u', 'postgres', '--', file, ...args]] : [file, args];
  return new Promise((resolve, reject) => {
    execFile(cmd, argv, { timeout }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${path.basename(file)} ${args.join(' ')} failed: ${stderr || error.message}`));
      else resolve(String(stdout));
    });
  });
}

/**
 * @param {object} [opts]
 * @param {{ cert: string, key: string }} [opts.tls]  serve TLS with this
 *   certificate and key, and refuse TCP clients that do not use it
 */
async function postgresIds() {
  const { execFileSync } = await import('node:child_process');
  const uid = Number(execFileSync('id', ['-u', 'postgres']).toString().trim());
  const gid = Number(execFileSync('id', ['-g', 'postgres']).toString().trim());
  return { uid, gid };
}

export async function startPrivatePostgres({ tls } = {}) {
  const bin = binDir();
  const asPostgres = process.getuid?.() === 0;
  const dir = await mkdtemp(path.join(os.tmpdir(), 'cellgate-pg-'));
  if (asPostgres) {
    const { uid, gid } = await postgresIds();
    await chown(dir, uid, gid);
  }
  const data = path.join(dir, 'data');
  const port = await freePort();
  await run(path.join(bin, 'initdb'), ['-D', data, '-A', 'trust', '-U', 'postgres', '--no-sync', '-E', 'UTF8'],
    { asPostgres });

  let options = `-p ${port} -k ${dir} -c listen_addresses=127.0.0.1 -c fsync=off`;
  if (tls) {
    const owner = asPostgres ? await postgresIds() : null;
    const own = async (file, mode) => {
      await chmod(file, mode);
      if (owner) await chown(file, owner.uid, owner.gid);
    };
    for (const [from, to] of [[tls.cert, 'server.crt'], [tls.key, 'server.key']]) {
      await copyFile(from, path.join(data, to));
      await own(path.join(data, to), 0o600);
    }
    await writeFile(path.join(data, 'pg_hba.conf'),
      'local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n');
    await own(path.join(data, 'pg_hba.conf'), 0o600);
    options += ' -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key';
  }
  const pg = {
    port,
    dir,
    url: `postgres://postgres@127.0.0.1:${port}/cellgate`,
    running: false,
    async start() {
      await run(path.join(bin, 'pg_ctl'), ['-D', data, '-o', options, '-l', path.join(dir, 'log'), '-w', 'start'],
        { asPostgres });
      pg.running = true;
    },
    /** Stops at once, as a crash or a failover would: open connections break. */
    async stop() {
      await run(path.join(bin, 'pg_ctl'), ['-D', data, '-m', 'immediate', '-w', 'stop'], { asPostgres });
      pg.running = false;
    },
    async destroy() {
      if (pg.running) await pg.stop().catch(() => {});
      await rm(dir, { recursive: true, force: true });
    },
  };
  await pg.start();
  await run(path.join(bin, 'psql'), ['-h', '127.0.0.1', '-p', String(port), '-U', 'postgres', '-d', 'postgres',
    '-X', '-q', '-c', 'CREATE DATABASE cellgate']);
  return pg;
}
