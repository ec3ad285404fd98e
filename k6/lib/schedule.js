// The classroom's posting schedule, decided before the test starts.
//
// Every student's posts (when, and which events with which ids) follow from
// a seed, so every VU can compute the same plan: the students post it, and
// each dashboard knows exactly which events it must receive for the time it
// was joined. Times are milliseconds after t0, the moment the first phase
// starts (chosen in setup() and shared by every VU).
//
// A lesson is a few phases of work separated by quiet gaps (the instructor
// talks; nobody runs anything). In a phase each student runs a cell every
// few seconds (some fail), and once per burst time the instructor says "run
// all cells": every student runs the whole notebook, posting what finished
// every quarter second in one batch. A few students with errors ask for
// help; some of them cancel a few seconds later. Dashboards that reload do
// so only in the gaps, which makes "joined while it was posted" exact.

export const PROFILES = {
  // What the README's figures are measured with.
  full: {
    students: 200,
    dashboards: 20,
    reloaders: 4, // dashboards that close and reconnect in every gap
    late: 1, // dashboards that first join in the first gap
    leadMs: 12000, // dashboards connect and join before t0
    phaseMs: 50000,
    gapMs: 8000,
    phases: 3,
    burstsAtMs: [20000], // "run all cells", phase-relative
    meanThinkMs: 6000, // between two cells outside bursts
    helpEvery: 25, // about one student in this many asks for help per phase
    tailMs: 8000, // after the last phase: late deliveries, final claims
  },
  // CI: short, fewer students, same shape.
  smoke: {
    students: 40,
    dashboards: 6,
    reloaders: 2,
    late: 1,
    leadMs: 6000,
    phaseMs: 14000,
    gapMs: 6000,
    phases: 2,
    burstsAtMs: [5000],
    meanThinkMs: 4000,
    helpEvery: 8,
    tailMs: 5000,
  },
};

/** A small deterministic PRNG (mulberry32). */
export function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A 32-bit FNV-1a hash of a string. */
export function hash(text) {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

export function studentId(seat) {
  return `s-${String(seat).padStart(4, '0')}`;
}

/** Phase windows, [start, end) in ms after t0. */
export function phases(profile) {
  const out = [];
  for (let p = 0; p < profile.phases; p++) {
    const start = p * (profile.phaseMs + profile.gapMs);
    out.push({ index: p, start, end: start + profile.phaseMs });
  }
  return out;
}

/** When the last phase ends (ms after t0). */
export function lessonEnd(profile) {
  const all = phases(profile);
  return all[all.length - 1].end;
}

const ERRORS = [
  ['NameError', "name 'df' is not defined"],
  ['TypeError', "unsupported operand type(s) for +: 'int' and 'str'"],
  ['KeyError', "'price'"],
  ['ValueError', 'could not convert string to float: \'n/a\''],
  ['ZeroDivisionError', 'division by zero'],
  ['ModuleNotFoundError', "No module named 'seaborn'"],
  ['IndexError', 'list index out of range'],
];

const HELP_MESSAGES = [
  'My plot is empty and I do not know why',
  'I get a NameError on the cell with the merge',
  'Is the second exercise supposed to take this long?',
  'The notebook cannot find the data file',
  '',
];

const NOTEBOOK_CELLS = 16;

/**
 * Every student's posts: plans[seat - 1] = [{ at, events: [...] }], in time
 * order. Event bodies lack `occurred_at` and `k6_sent_at`, which the student
 * fills in when it posts.
 */
export function buildPlans(profile, { classroom, runId, seed }) {
  const windows = phases(profile);
  const plans = [];
  for (let seat = 1; seat <= profile.students; seat++) {
    const random = rng(hash(`${seed}/${seat}`));
    const student = studentId(seat);
    const base = { classroom, seat, student };
    let n = 0;
    let executionCount = 0;
    const nextId = () => `${runId}-${seat}-${n++}`;
    const cell = (cellIndex, failed, durationMs) => {
      executionCount += 1;
      const event = {
        id: nextId(),
        type: 'cell_executed',
        ...base,
        notebook: 'week3/pandas-lab.ipynb',
        cell_id: `cell-${String(cellIndex).padStart(2, '0')}`,
        execution_count: executionCount,
        status: failed ? 'error' : 'ok',
        duration_ms: durationMs,
      };
      if (failed) {
        const [ename, evalue] = ERRORS[Math.floor(random() * ERRORS.length)];
        event.error = { ename, evalue };
      }
      return event;
    };

    const posts = [];
    // A student with a notebook bug fails the same cell in every run-all.
    const brokenCell = random() < 0.25 ? 1 + Math.floor(random() * NOTEBOOK_CELLS) : 0;
    for (const w of windows) {
      const bursts = profile.burstsAtMs.map((b) => {
        const start = w.start + b + Math.floor(random() * 1500);
        return { start, end: start + 4000 };
      });
      let t = w.start + Math.floor(random() * profile.meanThinkMs);
      let cellCursor = 1 + Math.floor(random() * NOTEBOOK_CELLS);
      while (t < w.end - 250) {
        const burst = bursts.find((b) => t >= b.start && t < b.end);
        if (burst) {
          // Run all: cells finish one after the other; the extension posts
          // what finished in each 250 ms window as one batch.
          let clock = burst.start;
          let batch = [];
          let flushAt = clock + 250;
          for (let c = 1; c <= NOTEBOOK_CELLS; c++) {
            const duration = 30 + Math.floor(random() * 220);
            clock += duration;
            const failed = c === brokenCell || random() < 0.03;
            while (clock >= flushAt) {
              if (batch.length && flushAt < w.end) posts.push({ at: flushAt, events: batch });
              batch = [];
              flushAt += 250;
            }
            batch.push(cell(c, failed, duration));
            if (failed) break; // run-all stops at the first error
          }
          if (batch.length && flushAt < w.end) posts.push({ at: flushAt, events: batch });
          t = Math.max(burst.end, flushAt) + Math.floor(random() * 2000);
          continue;
        }
        const failed = random() < 0.1;
        posts.push({ at: t, events: [cell(cellCursor, failed, 5 + Math.floor(random() * 3000))] });
        cellCursor = cellCursor >= NOTEBOOK_CELLS ? 1 : cellCursor + 1;
        // Exponential think time, bounded: a student rarely waits 4× the mean.
        const think = -Math.log(1 - random()) * profile.meanThinkMs;
        t += Math.max(400, Math.min(think, 4 * profile.meanThinkMs));
        // Don't step into a burst's middle: wait for it instead.
        const upcoming = bursts.find((b) => t > b.start && t < b.end);
        if (upcoming) t = upcoming.start;
      }
      // Help: one student in helpEvery per phase, chosen by seat so that every
      // phase has some. Requests come in the first 40 % of the phase, so
      // that they are claimed and cancelled within it.
      if ((seat + 3 * w.index) % profile.helpEvery === 0) {
        const at = w.start + Math.floor(random() * (profile.phaseMs * 0.4));
        const request = {
          id: nextId(),
          type: 'help_requested',
          ...base,
          message: HELP_MESSAGES[Math.floor(random() * HELP_MESSAGES.length)],
        };
        posts.push({ at, events: [request], help: true });
        if (random() < 0.3) {
          // Figured it out after all. Dashboards claim within 1.5 s of the
          // request; 6 s later the claim has been decided, so the claim's
          // outcome does not race the cancellation.
          const cancel = { id: nextId(), type: 'help_cancelled', ...base, request_id: request.id };
          posts.push({ at: Math.min(at + 6000 + Math.floor(random() * 2000), w.end - 1), events: [cancel] });
        }
      }
    }
    posts.sort((a, b) => a.at - b.at);
    plans.push(posts);
  }
  return plans;
}

/**
 * The key a dashboard files a delivery under, for the events whose delivery
 * is certain: every accepted cell_executed and help_requested reaches every
 * dashboard joined when it was posted. (help_cancelled is sent only when the
 * request was still open or claimed, so it is counted, not required.)
 */
export function deliveryKey(type, idOrRequestId) {
  return type === 'cell_executed' ? `c:${idOrRequestId}` : `h:${idOrRequestId}`;
}

/** Totals of a plan, for thresholds and the summary. */
export function summarize(plans, profile) {
  let posts = 0;
  let events = 0;
  let cells = 0;
  let errors = 0;
  let help = 0;
  let cancels = 0;
  const perPhase = phases(profile).map(() => 0);
  for (const plan of plans) {
    for (const post of plan) {
      posts += 1;
      for (const e of post.events) {
        events += 1;
        if (e.type === 'cell_executed') {
          cells += 1;
          if (e.status === 'error') errors += 1;
        } else if (e.type === 'help_requested') help += 1;
        else cancels += 1;
        if (e.type !== 'help_cancelled') {
          const p = phases(profile).findIndex((w) => post.at >= w.start && post.at < w.end);
          perPhase[p] += 1;
        }
      }
    }
  }
  return { posts, events, cells, errors, help, cancels, perPhase };
}
