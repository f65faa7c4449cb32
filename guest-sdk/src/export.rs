//! The glue between a [`Worker`] and the generated bindings: conversions of
//! the WIT records to and from the SDK's types, and the `handler` export.

use std::marker::PhantomData;

use crate::bindings::edge::worker::types as wit;
use crate::bindings::exports::edge::worker::handler::Guest;
use crate::{
    Action, Headers, Hooks, Request, RequestChanges, Response, ResponseChanges, ResponseHead,
    Worker,
};

/// Implementation of the generated `handler` interface for the worker `W`.
/// Only [`export_worker!`](crate::export_worker) names it.
pub struct Export<W>(PhantomData<fn() -> W>);

impl<W: Worker + 'static> Guest for Export<W> {
    fn hooks() -> Result<wit::HookSet, String> {
        crate::log::log_panics();
        W::check_config()?;
        Ok(W::hooks().into())
    }

    fn on_request(request: wit::Request) -> wit::Action {
        crate::log::log_panics();
        W::on_request(request.into()).into()
    }

    fn on_response(request: wit::Request, response: wit::ResponseHead) -> wit::ResponseChanges {
        crate::log::log_panics();
        W::on_response(request.into(), response.into()).into()
    }
}

fn headers_from_wit(headers: Vec<wit::Header>) -> Headers {
    Headers::from_pairs(
        headers
            .into_iter()
            .map(|header| (header.name, header.value))
            .collect(),
    )
}

fn pairs_to_wit(pairs: Vec<(String, String)>) -> Vec<wit::Header> {
    pairs
        .into_iter()
        .map(|(name, value)| wit::Header { name, value })
        .collect()
}

impl From<wit::Request> for Request {
    fn from(request: wit::Request) -> Self {
        Request {
            method: request.method,
            path: request.path,
            query: request.query,
            headers: headers_from_wit(request.headers),
            client_addr: request.client_addr,
            route: request.route,
            params: request.params,
        }
    }
}

impl From<wit::ResponseHead> for ResponseHead {
    fn from(response: wit::ResponseHead) -> Self {
        ResponseHead {
            status: response.status,
            headers: headers_from_wit(response.headers),
        }
    }
}

impl From<RequestChanges> for wit::RequestChanges {
    fn from(changes: RequestChanges) -> Self {
        wit::RequestChanges {
            set_headers: pairs_to_wit(changes.set_headers),
            remove_headers: changes.remove_headers,
            path: changes.path,
        }
    }
}

impl From<Response> for wit::Response {
    fn from(response: Response) -> Self {
        wit::Response {
            status: response.status,
            headers: pairs_to_wit(response.headers.into_pairs()),
            body: response.body,
        }
    }
}

impl From<Action> for wit::Action {
    fn from(action: Action) -> Self {
        match action {
            Action::Continue(changes) => wit::Action::Continue(changes.into()),
            Action::Respond(response) => wit::Action::Respond(response.into()),
            Action::Route { upstream, changes } => wit::Action::Route(wit::RouteTo {
                upstream,
                changes: changes.into(),
            }),
        }
    }
}

impl From<ResponseChanges> for wit::ResponseChanges {
    fn from(changes: ResponseChanges) -> Self {
        wit::ResponseChanges {
            set_headers: pairs_to_wit(changes.set_headers),
            remove_headers: changes.remove_headers,
        }
    }
}

impl From<Hooks> for wit::HookSet {
    fn from(hooks: Hooks) -> Self {
        let mut flags = wit::HookSet::empty();
        if hooks.response {
            flags |= wit::HookSet::RESPONSE;
        }
        flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, value: &str) -> wit::Header {
        wit::Header {
            name: name.to_string(),
            value: value.to_string(),
        }
    }

    #[test]
    fn request_from_wit_keeps_fields() {
        let request = Request::from(wit::Request {
            method: "POST".to_string(),
            path: "/checkout".to_string(),
            query: Some("a=1".to_string()),
            headers: vec![header("x-a", "1"), header("x-a", "2")],
            client_addr: "::1".to_string(),
            route: "shop".to_string(),
            params: vec![("id".to_string(), "7".to_string())],
        });
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/checkout");
        assert_eq!(request.query.as_deref(), Some("a=1"));
        assert_eq!(
            request.headers.get_all("x-a").collect::<Vec<_>>(),
            ["1", "2"]
        );
        assert_eq!(request.client_addr, "::1");
        assert_eq!(request.route, "shop");
        assert_eq!(request.param("id"), Some("7"));
    }

    #[test]
    fn route_action_to_wit() {
        let action = Action::Route {
            upstream: "users".to_string(),
            changes: RequestChanges::new().set_header("x-a", "1").path("/7"),
        };
        let wit::Action::Route(route_to) = action.into() else {
            panic!("expected wit::Action::Route");
        };
        assert_eq!(route_to.upstream, "users");
        assert_eq!(route_to.changes.path.as_deref(), Some("/7"));
        assert_eq!(route_to.changes.set_headers.len(), 1);
        assert_eq!(route_to.changes.set_headers[0].name, "x-a");
        assert_eq!(route_to.changes.set_headers[0].value, "1");
    }

    #[test]
    fn respond_action_to_wit() {
        let action = Action::respond(Response::new(418).header("x-a", "1").body("tea"));
        let wit::Action::Respond(response) = action.into() else {
            panic!("expected wit::Action::Respond");
        };
        assert_eq!(response.status, 418);
        assert_eq!(response.headers.len(), 1);
        assert_eq!(response.body, b"tea");
    }

    #[test]
    fn continue_action_to_wit() {
        let action = Action::Continue(RequestChanges::new().remove_header("x-a"));
        let wit::Action::Continue(changes) = action.into() else {
            panic!("expected wit::Action::Continue");
        };
        assert_eq!(changes.remove_headers, ["x-a"]);
        assert!(changes.set_headers.is_empty());
        assert_eq!(changes.path, None);
    }

    #[test]
    fn response_changes_to_wit() {
        let changes = wit::ResponseChanges::from(
            ResponseChanges::new()
                .set_header("x-a", "1")
                .remove_header("server"),
        );
        assert_eq!(changes.set_headers.len(), 1);
        assert_eq!(changes.remove_headers, ["server"]);
    }

    #[test]
    fn hooks_to_wit_flags() {
        assert_eq!(wit::HookSet::from(Hooks::default()), wit::HookSet::empty());
        assert_eq!(
            wit::HookSet::from(Hooks { response: true }),
            wit::HookSet::RESPONSE
        );
    }
}
