//! Percentiles: exact ones of a sorted sample, and a lock-free histogram
//! for the millions of deliveries a fan-out run records.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds, printed with three decimals.
pub struct Ms(pub f64);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_infinite() {
            return f.pad("> 5000 ms");
        }
        f.pad(&format!("{:.3} ms", self.0))
    }
}

/// A duration as [`Ms`].
pub fn ms(d: Duration) -> Ms {
    Ms(d.as_secs_f64() * 1000.0)
}

/// Seconds (if any) as [`Ms`] text, `n/a` otherwise.
pub fn ms_opt(seconds: Option<f64>) -> String {
    seconds.map_or_else(|| "n/a".into(), |s| Ms(s * 1000.0).to_string())
}

/// Exact below 128 µs, then 64 buckets per power of two (under 1.6 %
/// error), up to 2^40 µs.
const LINEAR: u64 = 128;
const SUB: u64 = 64;
const TOP_BIT: u32 = 40;
const BUCKETS: usize = (LINEAR + (TOP_BIT as u64 - 7 + 1) * SUB) as usize;

/// A histogram of microseconds that many tasks record into at once.
pub struct Histogram {
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

fn index(us: u64) -> usize {
    let us = us.min((1 << (TOP_BIT + 1)) - 1);
    if us < LINEAR {
        return us as usize;
    }
    let bit = 63 - us.leading_zeros(); // 7 or more
    let shift = bit - 6;
    (LINEAR + u64::from(bit - 7) * SUB + ((us >> shift) - SUB)) as usize
}

/// The middle of bucket `i`, in microseconds.
fn middle(i: usize) -> f64 {
    let i = i as u64;
    if i < LINEAR {
        return i as f64;
    }
    let bit = (i - LINEAR) / SUB + 7;
    let shift = bit - 6;
    let low = ((i - LINEAR) % SUB + SUB) << shift;
    low as f64 + (1u64 << shift) as f64 / 2.0
}

impl Histogram {
    /// Records one value.
    pub fn record(&self, us: u64) {
        self.counts[index(us)].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(us, Ordering::Relaxed);
        self.max.fetch_max(us, Ordering::Relaxed);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The `q` quantile (nearest rank), milliseconds; `None` when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
            if seen >= rank {
                let max = self.max.load(Ordering::Relaxed) as f64;
                return Some(middle(i).min(max) / 1000.0);
            }
        }
        None
    }

    /// Largest value, milliseconds.
    pub fn max_ms(&self) -> f64 {
        self.max.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// Mean, milliseconds.
    pub fn mean_ms(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum.load(Ordering::Relaxed) as f64 / n as f64 / 1000.0)
    }
}

/// A quantile for a table cell: `1.234`, or `-`.
pub fn cell(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

/// One Prometheus histogram (without labels other than `le`) from a
/// `/metrics` scrape, or the difference of two scrapes.
#[derive(Debug, Clone, Default)]
pub struct PromHistogram {
    /// `(le, cumulative count)`, `+Inf` last.
    pub buckets: Vec<(f64, f64)>,
    /// `_sum`, seconds.
    pub sum: f64,
    /// `_count`.
    pub count: f64,
}

impl PromHistogram {
    /// The histogram `name` in `text`; empty when absent.
    pub fn parse(text: &str, name: &str) -> Self {
        let mut h = PromHistogram::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let Some(rest) = series.strip_prefix(name) else {
                continue;
            };
            if let Some(labels) = rest.strip_prefix("_bucket{le=\"") {
                let le = labels.trim_end_matches("\"}");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::NAN)
                };
                h.buckets.push((le, value));
            } else if rest == "_sum" {
                h.sum = value;
            } else if rest == "_count" {
                h.count = value;
            }
        }
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        h
    }

    /// `self − before` (same buckets).
    pub fn since(&self, before: &PromHistogram) -> Self {
        let buckets = self
            .buckets
            .iter()
            .zip(
                before
                    .buckets
                    .iter()
                    .map(|b| b.1)
                    .chain(std::iter::repeat(0.0)),
            )
            .map(|(&(le, after), before)| (le, after - before))
            .collect();
        PromHistogram {
            buckets,
            sum: self.sum - before.sum,
            count: self.count - before.count,
        }
    }

    /// The `q` quantile in milliseconds, interpolated inside its bucket as
    /// Prometheus' `histogram_quantile` does.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let rank = q * self.count;
        let mut lower = (0.0, 0.0);
        for &(le, count) in &self.buckets {
            if count >= rank && count > 0.0 {
                if le.is_infinite() {
                    return Some(lower.0 * 1000.0);
                }
                let share = (rank - lower.1) / (count - lower.1);
                return Some((lower.0 + (le - lower.0) * share) * 1000.0);
            }
            lower = (le, count);
        }
        None
    }

    /// Mean in milliseconds (exact).
    pub fn mean_ms(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count * 1000.0)
    }
}
