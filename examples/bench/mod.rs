//! What the benchmarks in `examples/` share: a PostgreSQL database of their
//! own ([`pg`]), the release gateway on free loopback ports ([`gateway`]), a
//! minimal WebSocket Socket.IO client and token minter ([`client`]), a live
//! classroom under load ([`fanout`]) and percentiles ([`stats`]).
//!
//! Each example includes this directory with
//! `#[path = "bench/mod.rs"] mod bench;`; Cargo does not build it as an
//! example of its own.

pub mod client;
pub mod fanout;
pub mod gateway;
pub mod pg;
pub mod stats;
