//! Which pods a broadcast must reach.
//!
//! Redis answers a publish with the number of subscribers that got it. A
//! pod that lost its subscriptions (cut off from Redis, or still
//! reconnecting after a restart) is simply not counted, and its dashboards
//! miss the event. So each pod keeps the set of pods it has heard through
//! the probe channel ([`super::health`]), and a broadcast that fewer pods
//! received is not acknowledged (see [`super::driver`]).
//!
//! A peer is forgotten when it says goodbye (a pod that shuts down) or
//! after [`FORGET_AFTER_TICKS`] probe periods of silence counted only while
//! this pod itself hears Redis: after a Redis restart, pods come back one
//! by one, and none forgets the others for having been away together.

use std::collections::HashMap;
use std::sync::Mutex;

/// Probe periods (seconds) a peer may stay silent, while this pod hears
/// Redis, before it no longer counts. fred reconnects within a second and
/// a pod probes every second, so a pod back from an outage is heard well
/// within this; a crashed pod holds broadcasts back (503) this long.
pub const FORGET_AFTER_TICKS: u32 = 5;

/// The pods this one expects a broadcast to reach.
pub struct Peers {
    me: String,
    /// Peer key to the probe periods it has been silent for.
    quiet: Mutex<HashMap<String, u32>>,
}

impl Peers {
    /// No peers yet; `me` is this pod's key on the probe channel.
    pub fn new(me: String) -> Self {
        Peers {
            me,
            quiet: Mutex::new(HashMap::new()),
        }
    }

    /// This pod's key on the probe channel.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// A probe of `peer` arrived.
    pub fn heard(&self, peer: &str) {
        if peer == self.me {
            return;
        }
        let mut quiet = self.quiet.lock().expect("peers lock");
        if quiet.insert(peer.to_string(), 0).is_none() {
            tracing::info!(peer, pods = quiet.len() + 1, "cluster: a pod joined");
        }
    }

    /// `peer` said goodbye: it is shutting down.
    pub fn left(&self, peer: &str) {
        let mut quiet = self.quiet.lock().expect("peers lock");
        if quiet.remove(peer).is_some() {
            tracing::info!(peer, pods = quiet.len() + 1, "cluster: a pod left");
        }
    }

    /// One probe period passed while this pod heard Redis: every peer is
    /// one period quieter, and those silent too long are forgotten.
    pub fn tick(&self) {
        let mut quiet = self.quiet.lock().expect("peers lock");
        for silent in quiet.values_mut() {
            *silent += 1;
        }
        let before = quiet.len();
        quiet.retain(|_, silent| *silent <= FORGET_AFTER_TICKS);
        if quiet.len() < before {
            tracing::warn!(
                forgotten = before - quiet.len(),
                pods = quiet.len() + 1,
                "cluster: pods silent too long no longer count"
            );
        }
    }

    /// How many pods (this one included) a broadcast must reach.
    pub fn expected(&self) -> usize {
        self.quiet.lock().expect("peers lock").len() + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_peer_counts_until_it_was_silent_too_long() {
        let peers = Peers::new("a".into());
        assert_eq!(peers.expected(), 1);
        peers.heard("b");
        peers.heard("a");
        assert_eq!(peers.expected(), 2, "itself is not a peer");
        for _ in 0..FORGET_AFTER_TICKS {
            peers.tick();
        }
        assert_eq!(peers.expected(), 2, "silent, but not for long enough");
        peers.tick();
        assert_eq!(peers.expected(), 1, "forgotten");
    }

    #[test]
    fn a_peer_heard_again_starts_its_silence_afresh() {
        let peers = Peers::new("a".into());
        peers.heard("b");
        for _ in 0..10 {
            peers.tick();
            peers.tick();
            peers.heard("b");
        }
        assert_eq!(peers.expected(), 2);
    }

    #[test]
    fn a_goodbye_removes_a_peer_at_once() {
        let peers = Peers::new("a".into());
        peers.heard("b");
        peers.heard("c");
        peers.left("b");
        assert_eq!(peers.expected(), 2);
    }
}
