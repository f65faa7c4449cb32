//! End-to-end tests: each starts real `edge` nodes, real upstream servers on
//! loopback and real worker components built from `workers/`.
//!
//! Build the components first with `scripts/build-workers`.

mod harness;

mod ab_test;
mod bff;
mod cli;
mod context;
mod device_router;
mod jwt;
mod observability;
#[cfg(feature = "otlp")]
mod otlp;
mod proxy;
mod ratelimit;
mod resilience;
mod status_page;
mod tls;
mod websocket;
mod workers;
