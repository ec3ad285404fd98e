//! How many dashboards this pod holds, in all and per instructor.
//!
//! A slot is taken when a handshake is accepted and given back when the
//! socket goes ([`SocketSlot::release`], or at the latest when the slot is
//! dropped with the socket), so refused and failed handshakes never count.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Which limit refused a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketLimit {
    /// The instructor has `CELLGATE_MAX_SOCKETS_PER_INSTRUCTOR` dashboards here.
    Instructor,
    /// This pod holds `CELLGATE_MAX_SOCKETS` dashboards.
    Pod,
}

/// The counts and their limits.
pub struct SocketCounts {
    per_instructor: usize,
    per_pod: usize,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_instructor: HashMap<String, usize>,
}

impl SocketCounts {
    /// Limits of `per_instructor` sockets per instructor and `per_pod` in all.
    pub fn new(per_instructor: usize, per_pod: usize) -> Arc<Self> {
        Arc::new(SocketCounts {
            per_instructor,
            per_pod,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// The pod limit.
    pub fn per_pod(&self) -> usize {
        self.per_pod
    }

    /// Whether the pod has room for one more (checked before the token, so
    /// that a full pod spends nothing on a handshake it will refuse).
    pub fn pod_has_room(&self) -> bool {
        self.counts.lock().expect("socket counts lock").total < self.per_pod
    }

    /// Takes a slot for one of `instructor`'s dashboards.
    pub fn open(self: &Arc<Self>, instructor: &str) -> Result<SocketSlot, SocketLimit> {
        let mut counts = self.counts.lock().expect("socket counts lock");
        if counts.total >= self.per_pod {
            return Err(SocketLimit::Pod);
        }
        let mine = counts.by_instructor.get(instructor).copied().unwrap_or(0);
        if mine >= self.per_instructor {
            return Err(SocketLimit::Instructor);
        }
        counts.total += 1;
        counts
            .by_instructor
            .insert(instructor.to_string(), mine + 1);
        Ok(SocketSlot {
            counts: self.clone(),
            instructor: instructor.to_string(),
            released: AtomicBool::new(false),
        })
    }

    /// Dashboards counted now: in all, and of `instructor`.
    pub fn held(&self, instructor: &str) -> (usize, usize) {
        let counts = self.counts.lock().expect("socket counts lock");
        let mine = counts.by_instructor.get(instructor).copied().unwrap_or(0);
        (counts.total, mine)
    }

    fn close(&self, instructor: &str) {
        let mut counts = self.counts.lock().expect("socket counts lock");
        counts.total = counts.total.saturating_sub(1);
        if let Some(mine) = counts.by_instructor.get_mut(instructor) {
            *mine -= 1;
            if *mine == 0 {
                counts.by_instructor.remove(instructor);
            }
        }
    }
}

/// One counted dashboard.
pub struct SocketSlot {
    counts: Arc<SocketCounts>,
    instructor: String,
    released: AtomicBool,
}

impl SocketSlot {
    /// Gives the slot back (once; later calls do nothing).
    pub fn release(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            self.counts.close(&self.instructor);
        }
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.release();
    }
}

impl std::fmt::Debug for SocketSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketSlot")
            .field("released", &self.released)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instructor_at_the_limit_does_not_take_another_instructors_room() {
        let counts = SocketCounts::new(2, 10);
        let a1 = counts.open("ada").unwrap();
        let _a2 = counts.open("ada").unwrap();
        assert_eq!(counts.open("ada").unwrap_err(), SocketLimit::Instructor);
        let _b = counts.open("bob").unwrap();
        assert_eq!(counts.held("ada"), (3, 2));

        a1.release();
        a1.release();
        assert_eq!(counts.held("ada"), (2, 1), "a slot is given back once");
        let _a3 = counts.open("ada").unwrap();
    }

    #[test]
    fn a_full_pod_refuses_everyone_until_a_slot_is_dropped() {
        let counts = SocketCounts::new(5, 2);
        let a = counts.open("ada").unwrap();
        let _b = counts.open("bob").unwrap();
        assert!(!counts.pod_has_room());
        assert_eq!(counts.open("carol").unwrap_err(), SocketLimit::Pod);
        drop(a);
        assert!(counts.pod_has_room());
        assert_eq!(counts.held("ada"), (1, 0));
        let _c = counts.open("carol").unwrap();
    }
}
