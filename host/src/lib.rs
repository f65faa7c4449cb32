//! Edge: a node that routes HTTP requests, runs WebAssembly workers on them
//! and proxies them to upstream services.
//!
//! A request passes through the stages in [`pipeline`]: path normalisation
//! and routing ([`route`]), the route's workers ([`worker`]), and the
//! upstream call ([`proxy`]). [`config`] reads the TOML file, [`node`] builds
//! the shared state from it, and [`listener`] accepts and serves connections.
#![deny(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod breaker;
pub mod cli;
pub mod config;
pub mod context;
pub mod demo;
pub mod drain;
pub mod error;
pub mod exchange;
pub mod h1;
pub mod header_value;
pub mod health;
pub mod idle;
pub mod listener;
pub mod metrics;
pub mod node;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod pipeline;
pub mod proxy;
pub mod ratelimit;
pub mod retry;
pub mod route;
pub mod scaffold;
pub mod send_timeout;
pub mod status;
pub mod timer;
pub mod tls;
pub mod top;
pub mod trace;
pub mod upgrade;
pub mod worker;
