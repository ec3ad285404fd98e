// A dashboard that sends a request before its connection is open, as the
// README's example does: socket.io-client buffers the emit and flushes it the
// moment the server's CONNECT arrives, which can be before the gateway has
// run its connect handler. Such a request must be answered all the same.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startGateway } from './lib/gateway.mjs';
import { T, seedDirectory, makeSocket, close, assertNoSecretsInLogs } from './lib/helpers.mjs';

const DASHBOARDS = 200;

describe('requests sent before the connection opens', { concurrency: false }, () => {
  let gw;
  let tokens;

  before(async () => {
    gw = await startGateway({
      env: { CELLGATE_HANDSHAKES_PER_MINUTE: '0', CELLGATE_MAX_SOCKETS_PER_INSTRUCTOR: '1000' },
    });
    tokens = await seedDirectory(gw);
  });
  after(async () => { await gw?.stop(); });

  test(`${DASHBOARDS} dashboards that emit join_classroom right after io() all get their answer`, T, async () => {
    const sockets = [];
    try {
      const answers = await Promise.all(Array.from({ length: DASHBOARDS }, (_, k) => {
        const transports = k % 2 ? ['websocket'] : ['polling', 'websocket'];
        const socket = makeSocket(gw, { token: k % 3 ? tokens.alice : tokens.bob, transports });
        sockets.push(socket);
        socket.connect();
        return socket.timeout(10_000).emitWithAck('join_classroom', { classroom: 'cls-101' })
          .then((answer) => ({ k, answer }), (error) => ({ k, error: error.message }));
      }));
      const unanswered = answers.filter((a) => a.error);
      assert.deepEqual(unanswered, [], `${unanswered.length} of ${DASHBOARDS} requests were never answered`);
      for (const { answer } of answers) {
        assert.equal(answer.ok, true, JSON.stringify(answer).slice(0, 300));
        assert.equal(answer.snapshot.classroom, 'cls-101');
      }
    } finally {
      for (const s of sockets) close(gw, s);
    }
    assertNoSecretsInLogs(gw);
  });
});
