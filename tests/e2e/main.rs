//! End-to-end tests: each starts real `edge` nodes, real upstream servers on
//! loopback and real worker components built from `workers/`.
//!
//! Build the components first with `scripts/build-workers`.

mod harness;

mod cli;
mod context;
mod jwt;
mod proxy;
mod ratelimit;
mod resilience;
mod tls;
mod workers;
