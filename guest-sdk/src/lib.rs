//! The guest SDK for Edge workers: plain Rust types over the
//! `edge:worker@0.1.2` WIT contract, so that a worker is one trait impl and
//! one macro call.
//!
//! A worker is a WebAssembly component that runs on a route of an Edge node.
//! The host calls its request hook after routing and before the upstream, and,
//! if the worker implements one, its response hook when the upstream's
//! response headers arrive.
//!
//! # Example
//!
//! A worker crate is a `cdylib` that depends on `edge-sdk` (and `serde` if it
//! parses its config into a type):
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! edge-sdk = { path = "../../guest-sdk" }
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! This worker answers `/health` itself, tags every other request with a
//! header whose value comes from its config, and stamps the upstream's
//! response:
//!
//! ```
//! use edge_sdk::{
//!     Action, Hooks, Request, RequestChanges, Response, ResponseChanges, ResponseHead, Worker,
//! };
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Config {
//!     tenant: String,
//! }
//!
//! struct Tenant;
//!
//! impl Worker for Tenant {
//!     fn hooks() -> Hooks {
//!         Hooks { response: true }
//!     }
//!
//!     fn on_request(request: Request) -> Action {
//!         if request.path == "/health" {
//!             return Action::respond(Response::new(200).body("ok"));
//!         }
//!         let config: Config = match edge_sdk::config::parse() {
//!             Ok(config) => config,
//!             Err(error) => {
//!                 edge_sdk::log::error(&format!("invalid config: {error}"));
//!                 return Action::respond(Response::new(500));
//!             }
//!         };
//!         Action::Continue(RequestChanges::new().set_header("x-tenant", config.tenant))
//!     }
//!
//!     fn on_response(_request: Request, response: ResponseHead) -> ResponseChanges {
//!         ResponseChanges::new().set_header("x-upstream-status", response.status.to_string())
//!     }
//! }
//!
//! edge_sdk::export_worker!(Tenant);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`. The output in
//! `target/wasm32-wasip2/release/` is a component that an Edge node loads.
//!
//! # The hooks
//!
//! - [`Worker::hooks`] runs once per route and worker binding when the host
//!   loads the module, with that binding's config available. It returns which
//!   optional hooks the worker implements, so an unused hook costs nothing per
//!   request.
//! - [`Worker::on_request`] runs before the upstream is called and returns an
//!   [`Action`]: continue with [`RequestChanges`], respond with a
//!   [`Response`], or route to another upstream.
//! - [`Worker::on_response`] runs only if `hooks` returned
//!   `Hooks { response: true }`, when the upstream's status and headers
//!   arrive. It returns [`ResponseChanges`] to the headers.
//!
//! # Isolation model
//!
//! The host creates a fresh instance of the module for every call of every
//! hook. Nothing a worker keeps in memory, including `static` values, survives
//! from one call to the next, so one request (or one user) cannot see
//! another's data. It also means the request hook cannot pass values to the
//! response hook in memory.
//!
//! The host sets a CPU deadline and a memory cap for each call, per route. A
//! call that runs past the deadline, grows memory past the cap or panics traps.
//! The host then fails that request with a 5xx response and a log line, and
//! keeps serving others.
//!
//! A worker has no ambient authority: the host links WASI with an empty
//! context (no files, environment variables or sockets). It reaches the host
//! only through [`log`], [`config`], [`clock`], [`context`], [`secrets`],
//! [`upstreams`], [`crypto`] and [`fetch`], which sends requests only to the
//! upstreams its route entry allows.
//!
//! # Config
//!
//! Each worker binding on a route has a config table in the node's TOML
//! config. The host passes that table to the worker as JSON. [`config::get`]
//! returns one top-level key (strings as they are, other values as JSON text),
//! [`config::json`] returns the whole table, and [`config::parse`]
//! deserializes it into any `serde::Deserialize` type. Because instances are
//! fresh, a worker parses its config again on every call, so keep it small.
//!
//! # Native unit tests
//!
//! The SDK also builds for the build machine's own target, so `cargo test`
//! runs a worker's hooks natively. There the host imports are replaced by the
//! `testing` module (on targets other than `wasm32` only): config comes
//! from `testing::set_config` and log lines collect for `testing::take_logs`.
//!
//! # Limitations
//!
//! - Hooks see headers, not bodies: neither the request body nor the
//!   upstream's response body reaches the worker (the bodies of its own
//!   [`fetch`] responses do).
//! - [`fetch`] works while a request is handled; called from
//!   [`Worker::check_config`] or [`Worker::hooks`], at load time, every
//!   request fails with `NotAllowed`.
//! - `hooks` cannot report an invalid config, so a worker finds out on each
//!   request and should answer with a clear error then.
//! - Header names and values, paths and statuses are not checked by the SDK.
//!   The host decides what to do with invalid ones.

#![deny(missing_docs)]

mod action;
pub mod clock;
pub mod config;
pub mod context;
pub mod crypto;
mod export;
pub mod fetch;
mod headers;
#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
mod heap;
pub mod log;
mod request;
mod response;
pub mod secrets;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
pub mod upstreams;

pub use action::Action;
pub use config::ConfigError;
pub use headers::{is_set_by_node, is_token, settable_header_problem, HeaderIter, Headers};
pub use request::{Request, RequestChanges};
pub use response::{Response, ResponseChanges, ResponseHead};

/// Bindings generated from `wit/worker.wit`, for [`export_worker!`]. Workers
/// use the SDK's types instead.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "worker",
        pub_export_macro: true,
        default_bindings_module: "edge_sdk::bindings",
    });
}

#[doc(hidden)]
pub use export::Export;

/// The optional hooks a worker implements beyond the request hook.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hooks {
    /// Call [`Worker::on_response`] for responses from the upstream.
    pub response: bool,
}

/// A worker: the hooks the host calls. Export the implementing type with
/// [`export_worker!`].
///
/// The methods take no `self`, because every call runs in a fresh instance
/// and there is no state to keep.
pub trait Worker {
    /// Returns the optional hooks this worker implements.
    ///
    /// The host calls it once per route and worker binding, when it loads the
    /// module, with that binding's config readable through [`config`]. The
    /// default implements none.
    fn hooks() -> Hooks {
        Hooks::default()
    }

    /// Checks the worker's config when the host loads the module, before any
    /// request. An error rejects the binding: the node does not start, and
    /// the message, which should name the bad key, is shown to the operator.
    /// The default accepts any config.
    fn check_config() -> Result<(), String> {
        Ok(())
    }

    /// Decides what happens to `request` before the upstream is called.
    fn on_request(request: Request) -> Action;

    /// Returns changes to the headers of the upstream's response, before the
    /// body is sent on.
    ///
    /// The host calls it only when [`Worker::hooks`] returned
    /// `Hooks { response: true }`. The default changes nothing.
    fn on_response(request: Request, response: ResponseHead) -> ResponseChanges {
        let _ = (request, response);
        ResponseChanges::default()
    }
}

/// Exports a type that implements [`Worker`] as the module's `handler`.
///
/// Call it once, at the top level of the worker crate:
///
/// ```
/// # use edge_sdk::{Action, Request, Worker};
/// struct PassThrough;
///
/// impl Worker for PassThrough {
///     fn on_request(_request: Request) -> Action {
///         Action::next()
///     }
/// }
///
/// edge_sdk::export_worker!(PassThrough);
/// ```
#[macro_export]
macro_rules! export_worker {
    ($worker:ty) => {
        const _: () = {
            type EdgeSdkExport = $crate::Export<$worker>;
    $crate::bindings::export!(EdgeSdkExport with_types_in $crate::bindings);
        };
    };
}
