//! `compat-worker`: a test-only worker built against `edge:worker@0.1.0`, a
//! frozen copy of the first release of the contract in `wit/`. The
//! end-to-end tests load it to show that a host of a later 0.1.x still runs
//! workers built against 0.1.0.
//!
//! It uses the generated bindings directly, not the guest SDK, because the
//! SDK follows the current contract. The request hook logs through the
//! 0.1.0 `log` import and continues, setting `x-compat` to `0.1.0`.

wit_bindgen::generate!({
    path: "wit",
    world: "worker",
});

use edge::worker::types::{
    Action, Header, HookSet, Request, RequestChanges, ResponseChanges, ResponseHead,
};
use exports::edge::worker::handler::Guest;

struct Compat;

impl Guest for Compat {
    fn hooks() -> Result<HookSet, String> {
        Ok(HookSet::empty())
    }

    fn on_request(_request: Request) -> Action {
        edge::worker::log::write(edge::worker::log::Level::Info, "compat worker called");
        Action::Continue(RequestChanges {
            set_headers: vec![Header {
                name: "x-compat".to_string(),
                value: "0.1.0".to_string(),
            }],
            remove_headers: Vec::new(),
            path: None,
        })
    }

    fn on_response(_request: Request, _response: ResponseHead) -> ResponseChanges {
        ResponseChanges {
            set_headers: Vec::new(),
            remove_headers: Vec::new(),
        }
    }
}

export!(Compat);
