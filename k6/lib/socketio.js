// A small Socket.IO client for k6: Socket.IO protocol v5 over Engine.IO v4,
// what socket.io-client v4 speaks, on top of k6's WebSocket module (k6/experimental/websockets in k6 1.1).
//
//   const socket = new SocketIO('http://127.0.0.1:8080', { auth: { token } });
//   const { accepted } = await socket.connect();          // rejects with a ConnectRefused
//   socket.on('cell_executed', (payload) => { ... });
//   const answer = await socket.emitWithAck('join_classroom', { classroom: 'cls-101' });
//   socket.close();
//
// What it does on the wire:
// - Engine.IO: the open packet `0{sid, pingInterval, pingTimeout, ...}`, the
//   server's pings `2` answered with `3`, `1` close, `6` noop; a server that
//   stops pinging for pingInterval + pingTimeout is treated as gone.
// - transport "websocket": straight to `/socket.io/?EIO=4&transport=websocket`.
//   transport "polling": like socket.io-client's default, an HTTP long-polling
//   session first (open, CONNECT and its answer over polling, packets joined
//   by the 0x1e separator), then the upgrade to WebSocket on the same sid
//   (`2probe` / `3probe` / `5`). Every request of the session must reach the
//   same pod, so this is what exercises a load balancer's cookie affinity;
//   the VU's cookie jar carries the cookie from the polling requests to the
//   WebSocket request.
// - Socket.IO, namespace "/" only: CONNECT `40{auth}`, answered `40{"sid"}`
//   or CONNECT_ERROR `44{"message": code, "data"?}`; events `42[name, ...args]`;
//   acknowledgements `42<id>[...]` answered `43<id>[...]`; `41` disconnect.
//   Binary packets (types 5 and 6) are not supported and count as errors.

import http from 'k6/http';
import { WebSocket } from 'k6/experimental/websockets'; // k6/websockets from k6 1.2 on
import { after } from './timers.js';

const SEPARATOR = '\x1e';

/** A handshake the gateway answered with CONNECT_ERROR. */
export class ConnectRefused extends Error {
  constructor(code, data) {
    super(code);
    this.name = 'ConnectRefused';
    this.code = code;
    this.data = data;
  }
}

/** A connection that failed below Socket.IO (transport, time-out, protocol). */
export class TransportFailure extends Error {
  constructor(code, detail) {
    super(`${code}: ${detail}`);
    this.name = 'TransportFailure';
    this.code = code;
    this.detail = detail;
  }
}

/** Parses one Socket.IO packet (the part after the Engine.IO `4`). */
export function parseSocketIO(text) {
  const type = text.charCodeAt(0) - 48;
  if (type < 0 || type > 6) throw new Error(`bad Socket.IO packet type in ${text.slice(0, 40)}`);
  if (type === 5 || type === 6) throw new Error('binary Socket.IO packets are not supported');
  let i = 1;
  let nsp = '/';
  if (text.charAt(i) === '/') {
    const comma = text.indexOf(',', i);
    nsp = comma < 0 ? text.slice(i) : text.slice(i, comma);
    i = comma < 0 ? text.length : comma + 1;
  }
  let j = i;
  while (j < text.length && text.charCodeAt(j) >= 48 && text.charCodeAt(j) <= 57) j++;
  const id = j > i ? Number(text.slice(i, j)) : null;
  const data = j < text.length ? JSON.parse(text.slice(j)) : undefined;
  return { type, nsp, id, data };
}

function wsUrlOf(baseUrl) {
  return baseUrl.replace(/^http/, 'ws');
}

export class SocketIO {
  /**
   * @param {string} baseUrl      http://host:port of the gateway (or its load balancer)
   * @param {object} opts
   * @param {object} [opts.auth]  the CONNECT payload, e.g. { token }; null sends none
   * @param {'websocket'|'polling'} [opts.transport]
   * @param {object} [opts.headers]   extra handshake headers (e.g. Authorization)
   * @param {object} [opts.tags]      k6 tags for the built-in http/ws metrics
   * @param {number} [opts.connectTimeoutMs]
   * @param {number} [opts.ackTimeoutMs]
   */
  constructor(baseUrl, opts = {}) {
    this.baseUrl = baseUrl.replace(/\/$/, '');
    this.auth = opts.auth === undefined ? null : opts.auth;
    this.transport = opts.transport || 'websocket';
    this.headers = opts.headers || {};
    this.tags = opts.tags || {};
    this.connectTimeoutMs = opts.connectTimeoutMs || 10000;
    // The Engine.IO open packet comes first, at once: waiting for it longer
    // than this is a stalled handshake (TransportFailure 'open_timeout').
    this.openTimeoutMs = opts.openTimeoutMs || 5000;
    this.ackTimeoutMs = opts.ackTimeoutMs || 10000;

    this.ws = null;
    this.eioSid = null;
    this.sid = null;
    this.connected = false;
    this.closed = false;
    this.pingInterval = 25000;
    this.pingTimeout = 20000;
    this.handlers = {};
    this.anyHandlers = [];
    this.closeHandlers = [];
    this.pendingAcks = {};
    this.nextAckId = 0;
    this.heartbeat = null;
    this.connecting = null; // { resolve, reject, timer } while connect() runs
    this.startedAt = 0;
    this.timings = {};
  }

  /** Listens to server events; `fn` gets the event's arguments. */
  on(event, fn) {
    (this.handlers[event] = this.handlers[event] || []).push(fn);
    return this;
  }

  /**
   * Counts arrivals of `event` without parsing them (read them in
   * counts()); for events a load test only needs to count.
   */
  count(event) {
    this.counted = this.counted || {};
    this.counted[event] = 0;
    return this;
  }

  /** How many of each counted event arrived. */
  counts() {
    return { ...(this.counted || {}) };
  }

  /** Listens to every server event: fn(name, args). */
  onAny(fn) {
    this.anyHandlers.push(fn);
    return this;
  }

  /** fn(reason) once the connection is gone, whoever closed it. */
  onClose(fn) {
    this.closeHandlers.push(fn);
    return this;
  }

  /**
   * Opens the session and authenticates. Resolves once `connection_accepted`
   * has arrived (what an instructor waits for) with { sid, accepted, timings };
   * rejects with ConnectRefused (the server's code) or TransportFailure.
   */
  connect() {
    this.startedAt = Date.now();
    return new Promise((resolve, reject) => {
      const timer = after(this.connectTimeoutMs, () => {
        const reached = Object.keys(this.timings).map((k) => `${k}@${this.timings[k]}ms`).join(' ') || 'nothing';
        this.failConnect(new TransportFailure('timeout', `no answer within ${this.connectTimeoutMs} ms (${this.transport}; reached: ${reached})`));
      });
      this.connecting = { resolve, reject, timer };
      after(this.openTimeoutMs, () => {
        if (this.connecting && this.timings.eioOpen === undefined) {
          const reached = Object.keys(this.timings).map((k) => `${k}@${this.timings[k]}ms`).join(' ') || 'nothing';
          this.failConnect(new TransportFailure('open_timeout', `no Engine.IO open packet within ${this.openTimeoutMs} ms (${this.transport}; reached: ${reached})`));
        }
      });
      try {
        if (this.transport === 'polling') this.openPolling();
        else this.openWebSocket(null);
      } catch (e) {
        this.failConnect(new TransportFailure('transport_error', String(e)));
      }
    });
  }

  emit(event, ...args) {
    this.sendPacket(`2${JSON.stringify([event, ...args])}`);
  }

  /**
   * Emits with an acknowledgement id; resolves with { answer, ms }: the first
   * argument of the server's answer and the round trip in milliseconds.
   */
  emitWithAck(event, payload, timeoutMs) {
    const id = this.nextAckId++;
    const limit = timeoutMs || this.ackTimeoutMs;
    const sentAt = Date.now();
    return new Promise((resolve, reject) => {
      if (!this.connected) {
        reject(new TransportFailure('not_connected', `${event} on a closed socket`));
        return;
      }
      const timer = after(limit, () => {
        delete this.pendingAcks[id];
        reject(new TransportFailure('ack_timeout', `${event}: no acknowledgement within ${limit} ms`));
      });
      this.pendingAcks[id] = {
        event,
        timer,
        reject,
        resolve: (args) => resolve({ answer: args[0], ms: Date.now() - sentAt }),
      };
      this.sendPacket(`2${id}${JSON.stringify([event, payload])}`);
    });
  }

  /** Leaves the namespace and closes the transport. */
  close() {
    if (this.closed) return;
    if (this.connected) {
      try {
        this.sendPacket('1');
      } catch (e) {
        // The transport may already be gone.
      }
    }
    this.finish('io client disconnect');
  }

  /** Closes the transport without a Socket.IO disconnect, as a dying pod or network does. */
  drop() {
    this.finish('transport dropped');
  }

  // --- Engine.IO ----------------------------------------------------------

  pollUrl() {
    const t = Math.random().toString(36).slice(2, 10);
    const sid = this.eioSid ? `&sid=${encodeURIComponent(this.eioSid)}` : '';
    return `${this.baseUrl}/socket.io/?EIO=4&transport=polling&t=${t}${sid}`;
  }

  /** The polling half of socket.io-client's default: open, CONNECT, answer. */
  openPolling() {
    const params = { headers: this.headers, tags: { ...this.tags, eio: 'polling' }, timeout: `${this.connectTimeoutMs}ms` };
    const opened = http.get(this.pollUrl(), params);
    if (opened.status !== 200 || typeof opened.body !== 'string') {
      throw new Error(`polling open answered ${opened.status} ${opened.error || ''}`);
    }
    for (const packet of opened.body.split(SEPARATOR)) this.onEngineIO(packet, 'polling');
    if (!this.eioSid) throw new Error('polling open had no open packet');

    const sent = http.post(this.pollUrl(), `4${this.connectPayload()}`, {
      ...params, headers: { ...this.headers, 'Content-Type': 'text/plain;charset=UTF-8' },
    });
    if (sent.status !== 200) throw new Error(`polling CONNECT answered ${sent.status} ${sent.error || ''}`);

    // The CONNECT answer (often with connection_accepted) comes on a later
    // poll; the server may send a ping first.
    for (let polls = 0; !this.connected; polls++) {
      if (polls === 5) throw new Error('no CONNECT answer in 5 polls');
      const answered = http.get(this.pollUrl(), params);
      if (answered.status !== 200 || typeof answered.body !== 'string') {
        throw new Error(`a poll came back ${answered.status} ${answered.error || ''}`);
      }
      for (const packet of answered.body.split(SEPARATOR)) this.onEngineIO(packet, 'polling');
      if (this.closed || !this.connecting) return; // refused: already settled
    }
    this.timings.polling = Date.now() - this.startedAt;
    this.openWebSocket(this.eioSid);
  }

  openWebSocket(upgradeSid) {
    const sid = upgradeSid ? `&sid=${encodeURIComponent(upgradeSid)}` : '';
    const url = `${wsUrlOf(this.baseUrl)}/socket.io/?EIO=4&transport=websocket${sid}`;
    const ws = new WebSocket(url, null, { headers: this.headers, tags: { ...this.tags, eio: upgradeSid ? 'upgrade' : 'websocket' } });
    this.ws = ws;
    let upgraded = !upgradeSid;
    ws.onopen = () => {
      this.timings.wsOpen = Date.now() - this.startedAt;
      if (upgradeSid) ws.send('2probe');
    };
    ws.onmessage = (msg) => {
      const text = msg.data;
      if (typeof text !== 'string') {
        this.protocolError('binary WebSocket frame');
        return;
      }
      if (!upgraded) {
        if (text === '3probe') {
          upgraded = true;
          ws.send('5');
          this.timings.upgrade = Date.now() - this.startedAt;
          this.maybeAccepted();
          return;
        }
        // Packets the server flushes before the probe answer still count.
      }
      this.onEngineIO(text, 'websocket');
    };
    ws.onerror = (e) => {
      const detail = (e && e.error) || 'websocket error';
      if (this.connecting) this.failConnect(new TransportFailure('transport_error', detail));
      else this.finish(`transport error: ${detail}`);
    };
    ws.onclose = () => {
      if (this.connecting) this.failConnect(new TransportFailure('transport_close', 'closed during the handshake'));
      else this.finish('transport close');
    };
  }

  connectPayload() {
    return this.auth === null ? '0' : `0${JSON.stringify(this.auth)}`;
  }

  sendPacket(sio) {
    if (!this.ws || this.ws.readyState !== 1) {
      throw new TransportFailure('not_connected', 'no open WebSocket');
    }
    this.ws.send(`4${sio}`);
  }

  onEngineIO(text, via) {
    if (text.length === 0 || this.closed) return;
    const kind = text.charAt(0);
    switch (kind) {
      case '0': {
        const open = JSON.parse(text.slice(1));
        this.eioSid = open.sid;
        this.pingInterval = open.pingInterval || this.pingInterval;
        this.pingTimeout = open.pingTimeout || this.pingTimeout;
        this.timings.eioOpen = Date.now() - this.startedAt;
        this.armHeartbeat();
        if (via === 'websocket') this.ws.send(`4${this.connectPayload()}`);
        return;
      }
      case '2': // ping: answer over the transport it came on
        this.armHeartbeat();
        if (via === 'websocket') this.ws.send('3');
        else http.post(this.pollUrl(), '3', { tags: { ...this.tags, eio: 'polling' } });
        return;
      case '1':
        this.finish('server closed the transport');
        return;
      case '4':
        this.onSocketIO(text.slice(1));
        return;
      case '3': // pong (we never ping) or a stray probe answer
      case '6': // noop
        return;
      default:
        this.protocolError(`unknown Engine.IO packet ${text.slice(0, 20)}`);
    }
  }

  armHeartbeat() {
    if (this.heartbeat) this.heartbeat.cancel();
    this.heartbeat = after(this.pingInterval + this.pingTimeout, () => {
      this.heartbeat = null;
      this.finish('ping timeout');
    });
  }

  // --- Socket.IO ----------------------------------------------------------

  onSocketIO(text) {
    // Fast path for events only counted (see count()): no JSON parse, which
    // is most of a load generator's work per frame.
    if (this.counted && text.charCodeAt(0) === 50 && text.charCodeAt(1) === 91 && this.anyHandlers.length === 0) {
      const end = text.indexOf('"', 3);
      const name = end > 3 && text.charCodeAt(2) === 34 ? text.slice(3, end) : null;
      if (name !== null && this.counted[name] !== undefined && !this.handlers[name]) {
        this.counted[name] += 1;
        return;
      }
    }
    let packet;
    try {
      packet = parseSocketIO(text);
    } catch (e) {
      this.protocolError(String(e));
      return;
    }
    if (packet.nsp !== '/') return;
    switch (packet.type) {
      case 0: // CONNECT answer
        this.sid = packet.data && packet.data.sid;
        this.connected = true;
        this.timings.sioConnect = Date.now() - this.startedAt;
        return;
      case 4: { // CONNECT_ERROR
        const data = packet.data || {};
        const refused = new ConnectRefused(data.message, data.data);
        this.timings.refused = Date.now() - this.startedAt;
        this.failConnect(refused);
        return;
      }
      case 1:
        this.finish('io server disconnect');
        return;
      case 2: {
        const [name, ...args] = packet.data;
        if (name === 'connection_accepted' && this.connecting) {
          this.accepted = args[0];
          this.timings.accepted = Date.now() - this.startedAt;
          this.maybeAccepted();
        }
        for (const fn of this.anyHandlers) fn(name, args);
        const list = this.handlers[name];
        if (list) for (const fn of list) fn(...args);
        if (packet.id !== null) this.sendPacket(`3${packet.id}[]`);
        return;
      }
      case 3: {
        const pending = this.pendingAcks[packet.id];
        if (!pending) return; // answered after its time-out
        delete this.pendingAcks[packet.id];
        pending.timer.cancel();
        pending.resolve(packet.data || []);
        return;
      }
      default:
        this.protocolError(`unexpected Socket.IO packet type ${packet.type}`);
    }
  }

  /** Settles connect() once connection_accepted arrived and, when upgrading, the upgrade is done. */
  maybeAccepted() {
    if (!this.connecting || !this.accepted) return;
    if (this.transport === 'polling' && this.timings.upgrade === undefined) return;
    const { resolve, timer } = this.connecting;
    this.connecting = null;
    timer.cancel();
    this.timings.total = Date.now() - this.startedAt;
    resolve({ sid: this.sid, accepted: this.accepted, timings: this.timings });
  }

  failConnect(error) {
    if (!this.connecting) return;
    const { reject, timer } = this.connecting;
    this.connecting = null;
    timer.cancel();
    this.finish(`connect failed: ${error.code}`);
    reject(error);
  }

  protocolError(detail) {
    if (this.connecting) this.failConnect(new TransportFailure('protocol_error', detail));
    else this.finish(`protocol error: ${detail}`);
  }

  finish(reason) {
    if (this.closed) return;
    this.closed = true;
    this.connected = false;
    if (this.heartbeat) this.heartbeat.cancel();
    this.heartbeat = null;
    for (const id of Object.keys(this.pendingAcks)) {
      const pending = this.pendingAcks[id];
      pending.timer.cancel();
      pending.reject(new TransportFailure('closed', `${pending.event}: ${reason}`));
    }
    this.pendingAcks = {};
    if (this.ws && this.ws.readyState <= 1) {
      try {
        this.ws.close();
      } catch (e) {
        // already closing
      }
    }
    if (this.connecting) {
      const { reject, timer } = this.connecting;
      this.connecting = null;
      timer.cancel();
      reject(new TransportFailure('closed', reason));
    }
    for (const fn of this.closeHandlers) fn(reason);
  }
}
