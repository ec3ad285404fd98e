// Clients below socket.io-client: plain HTTP requests with any header
// (Origin included), and a dashboard spoken by hand over a raw WebSocket
// (`ws`), whose reading the test can stop.

import http from 'node:http';
import WebSocket from 'ws';

/**
 * One HTTP request with node:http (fetch would not let a test set Origin).
 * Resolves to { status, headers, text, json }.
 */
export function request(url, { method = 'GET', headers = {}, body } = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method, headers, timeout: 10_000 }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let json;
        try { json = JSON.parse(text); } catch { json = undefined; }
        resolve({ status: res.statusCode, headers: res.headers, text, json });
      });
    });
    req.on('error', reject);
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.end(body);
  });
}

/** The Engine.IO open packet of a new polling session: { sid, maxPayload, … }. */
export async function openPolling(gw, headers = {}) {
  const r = await request(`${gw.url}/socket.io/?EIO=4&transport=polling`, { headers });
  if (r.status !== 200 || !r.text.startsWith('0{')) {
    throw new Error(`Engine.IO handshake answered ${r.status}: ${r.text.slice(0, 200)}`);
  }
  return { ...r, open: JSON.parse(r.text.slice(1)) };
}

/**
 * A WebSocket to the gateway's Engine.IO endpoint. Resolves to the open
 * socket, or rejects with the HTTP status of a refused upgrade
 * (`err.status`).
 */
export function openWebSocket(gw, { headers = {}, origin, onMessage } = {}) {
  const ws = new WebSocket(`ws://127.0.0.1:${gw.port}/socket.io/?EIO=4&transport=websocket`, {
    headers,
    ...(origin ? { origin } : {}),
  });
  // Listening from the start: the open packet may come in the same tick.
  if (onMessage) ws.on('message', onMessage);
  return new Promise((resolve, reject) => {
    ws.once('open', () => resolve(ws));
    ws.once('unexpected-response', (_req, res) => {
      const e = new Error(`upgrade refused with ${res.statusCode}`);
      e.status = res.statusCode;
      ws.terminate();
      reject(e);
    });
    ws.once('error', reject);
  });
}

/**
 * A dashboard spoken by hand: Engine.IO over a raw WebSocket, the
 * Socket.IO CONNECT with the token, then join_classroom. Answers pings
 * while it reads. `pause()` stops reading from the TCP connection (the
 * gateway's writes pile up), `resume()` reads again; `closed` resolves
 * when the connection ends.
 */
export async function rawDashboard(gw, token, classroom) {
  const frames = [];
  const waiters = new Set();
  let ws;
  const onMessage = (data) => {
    const frame = data.toString();
    if (frame === '2') { ws.send('3'); return; } // Engine.IO ping
    frames.push(frame);
    for (const w of [...waiters]) w();
  };
  ws = await openWebSocket(gw, { onMessage });
  const closed = new Promise((resolve) => ws.once('close', (code) => resolve(code)));
  const next = (pred, what, timeout = 10_000) => new Promise((resolve, reject) => {
    const look = () => {
      const hit = frames.find(pred);
      if (!hit) return false;
      waiters.delete(look);
      clearTimeout(timer);
      resolve(hit);
      return true;
    };
    const timer = setTimeout(() => {
      waiters.delete(look);
      reject(new Error(`raw dashboard: no ${what} within ${timeout} ms; frames: ${frames.join(' | ').slice(0, 500)}`));
    }, timeout);
    waiters.add(look);
    look();
  });
  await next((f) => f.startsWith('0{'), 'Engine.IO open');
  ws.send(`40${JSON.stringify({ token })}`);
  await next((f) => f.startsWith('40{'), 'Socket.IO connect');
  await next((f) => f.startsWith('42["connection_accepted"'), 'connection_accepted');
  ws.send(`421["join_classroom",${JSON.stringify({ classroom })}]`);
  const joined = JSON.parse((await next((f) => f.startsWith('431['), 'join ack')).slice(3))[0];
  if (!joined.ok) throw new Error(`raw dashboard: join refused ${JSON.stringify(joined)}`);
  return {
    ws,
    frames,
    closed,
    pause: () => ws._socket.pause(),
    resume: () => ws._socket.resume(),
    close: () => ws.terminate(),
  };
}
