//! cellgate: a Socket.IO gateway that lets instructors watch a live classroom.
//!
//! Notebook extensions POST what happens in students' notebooks to the HTTP
//! ingest API ([`ingest`]); instructors' dashboards connect over Socket.IO
//! ([`realtime`]) after the connect-time authentication in [`auth`], and
//! receive every accepted event live. [`ARCHITECTURE.md`] walks one
//! connection and one event through the modules.
//!
//! [`ARCHITECTURE.md`]: https://example.invalid/cellgate/ARCHITECTURE.md

pub mod app;
pub mod auth;
pub mod classroom;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod directory;
pub mod drain;
pub mod http;
pub mod ingest;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod model;
pub mod realtime;
pub mod server;
pub mod telemetry;
