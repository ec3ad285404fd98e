// A compact end-of-test text summary (k6's own is replaced once a script
// defines handleSummary, and the jslib formatter is not installed here).

function fmt(value, unit) {
  if (value === undefined || value === null || Number.isNaN(value)) return '-';
  if (unit === 'ms') return value >= 100 ? `${value.toFixed(0)} ms` : `${value.toFixed(1)} ms`;
  if (unit === '%') return `${(value * 100).toFixed(3)} %`;
  return Number.isInteger(value) ? String(value) : value.toFixed(2);
}

/**
 * @param data      handleSummary's argument
 * @param sections  [{ title, rows: [[label, metricName, kind]] }] with kind
 *                  'trend' (ms percentiles), 'count', 'rate'
 */
export function summaryText(data, title, sections) {
  const lines = [`\n== ${title}`];
  for (const section of sections) {
    lines.push(`-- ${section.title}`);
    for (const [label, name, kind] of section.rows) {
      const metric = data.metrics[name];
      if (!metric) {
        lines.push(`  ${label.padEnd(44)} (no samples)`);
        continue;
      }
      const v = metric.values;
      let text;
      if (kind === 'trend') {
        const n = v.count === undefined ? '' : `n=${v.count}  `;
        text = `${n}p50 ${fmt(v.med, 'ms')}  p95 ${fmt(v['p(95)'], 'ms')}  p99 ${fmt(v['p(99)'], 'ms')}  max ${fmt(v.max, 'ms')}`;
      } else if (kind === 'rate') {
        text = `${fmt(v.rate, '%')}  (${v.passes} of ${v.passes + v.fails})`;
      } else {
        text = fmt(v.count);
      }
      lines.push(`  ${label.padEnd(44)} ${text}`);
    }
  }
  lines.push('-- thresholds');
  let failed = 0;
  for (const [name, metric] of Object.entries(data.metrics)) {
    if (!metric.thresholds) continue;
    for (const [expr, result] of Object.entries(metric.thresholds)) {
      if (!result.ok) failed += 1;
      lines.push(`  ${result.ok ? 'ok  ' : 'FAIL'} ${name}: ${expr}`);
    }
  }
  lines.push(failed ? `${failed} threshold(s) FAILED` : 'every threshold passed');
  return `${lines.join('\n')}\n`;
}
