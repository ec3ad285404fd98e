// Cancellable timers that never call clearTimeout.
//
// k6 up to 1.2.3 (this repository pins 1.1.0, the newest on PyPI) runs the
// *next* queued setTimeout callback early when clearTimeout removes the
// timer due first (grafana/k6#5199): a dashboard waiting 40 s for the end of
// the lesson woke up after 20 s, when its Engine.IO heartbeat timer was
// re-armed. So timers are kept here, in a per-VU list, and only ever armed
// with setTimeout; a cancelled one is dropped from the list and its real
// timer, at most MAX_ARM_MS away, fires into nothing.

import { setTimeout } from 'k6/timers';

const MAX_ARM_MS = 1000;
let entries = []; // { at, fn, live }
const armed = []; // targets (ms) of real timers still outstanding

function arm() {
  let next = Infinity;
  for (const e of entries) if (e.live && e.at < next) next = e.at;
  if (next === Infinity) return;
  const target = Math.min(next, Date.now() + MAX_ARM_MS);
  for (const t of armed) if (t <= target) return; // one fires soon enough
  armed.push(target);
  setTimeout(() => fire(target), Math.max(0, target - Date.now()));
}

function fire(target) {
  const i = armed.indexOf(target);
  if (i >= 0) armed.splice(i, 1);
  const now = Date.now();
  const due = [];
  const rest = [];
  for (const e of entries) {
    if (!e.live) continue;
    if (e.at <= now) due.push(e);
    else rest.push(e);
  }
  entries = rest;
  due.sort((a, b) => a.at - b.at);
  let failure = null;
  for (const e of due) {
    e.live = false;
    try {
      e.fn();
    } catch (err) {
      failure = failure || err;
    }
  }
  arm();
  if (failure) throw failure;
}

/** Runs fn after ms; returns a handle whose cancel() stops it. */
export function after(ms, fn) {
  const entry = { at: Date.now() + Math.max(0, ms), fn, live: true };
  entries.push(entry);
  arm();
  return {
    cancel() {
      entry.live = false;
    },
  };
}

/** Resolves after ms. */
export function sleepMs(ms) {
  return new Promise((resolve) => after(ms, resolve));
}
