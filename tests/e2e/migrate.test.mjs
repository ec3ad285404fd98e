// `cellgate migrate` on a fresh directory and again on a migrated one, on
// SQLite and PostgreSQL: it says what it applied, and the schema works.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { BIN, DBS, PG, psql } from './lib/gateway.mjs';
import { T } from './lib/helpers.mjs';

const cellgate = (args, env) => new Promise((resolve) => {
  execFile(BIN, args, { timeout: 30_000, env: { PATH: process.env.PATH, NO_COLOR: '1', ...env } },
    (error, stdout, stderr) => resolve({ code: error ? error.code ?? 1 : 0, stdout: String(stdout), stderr: String(stderr) }));
});

for (const db of DBS) {
  describe(`cellgate migrate (${db})`, { concurrency: false }, () => {
    let dir;
    let env;
    let dbName;

    before(async () => {
      dir = await mkdtemp(path.join(os.tmpdir(), 'cellgate-migrate-'));
      let url = `sqlite://${dir}/dir.db?mode=rwc`;
      if (db === 'postgres') {
        dbName = `cellgate_e2e_${randomBytes(6).toString('hex')}`;
        await psql(`CREATE DATABASE ${dbName}`);
        url = `postgres://${PG.user}@${PG.host}:${PG.port}/${dbName}`;
      }
      env = { CELLGATE_DATA_DIR: dir, CELLGATE_DATABASE_URL: url };
    });
    after(async () => {
      if (dbName) await psql(`DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`);
      await rm(dir, { recursive: true, force: true });
    });

    test('says what it applied, then that there is nothing left to apply', T, async () => {
      const first = await cellgate(['migrate'], env);
      assert.equal(first.code, 0, first.stderr);
      assert.match(first.stdout, /^applied \d+ migrations?; schema is up to date$/m);
      const added = await cellgate(['instructors', 'add', 'ada@example.edu', '--name', 'Ada'], env);
      assert.equal(added.code, 0, `the schema is usable: ${added.stderr}`);

      const again = await cellgate(['migrate'], env);
      assert.equal(again.code, 0, again.stderr);
      assert.equal(again.stdout.trim(), 'schema is up to date: nothing to apply');
    });
  });
}
