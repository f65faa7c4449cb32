//! What the request hook decides.

use crate::{RequestChanges, Response};

/// The decision of [`Worker::on_request`](crate::Worker::on_request): continue,
/// respond or route.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Action {
    /// Apply the changes and go on to the next worker, then the upstream.
    Continue(RequestChanges),
    /// Stop here and send this response. No later worker or upstream runs.
    Respond(Response),
    /// Apply the changes, choose the upstream, and go on to the next worker.
    Route {
        /// The name of an upstream declared in the node's config.
        upstream: String,
        /// Changes applied to the request, as with [`Action::Continue`].
        changes: RequestChanges,
    },
}

impl Action {
    /// Goes on to the next worker without changing the request.
    pub fn next() -> Self {
        Action::Continue(RequestChanges::new())
    }

    /// Sends `response` instead of calling the upstream.
    pub fn respond(response: Response) -> Self {
        Action::Respond(response)
    }

    /// Sends the request to the upstream named `upstream`, without other
    /// changes. Use [`Action::Route`] directly to change the request as well.
    pub fn route(upstream: impl Into<String>) -> Self {
        Action::Route {
            upstream: upstream.into(),
            changes: RequestChanges::new(),
        }
    }
}

impl From<RequestChanges> for Action {
    fn from(changes: RequestChanges) -> Self {
        Action::Continue(changes)
    }
}

impl From<Response> for Action {
    fn from(response: Response) -> Self {
        Action::Respond(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_continues_without_changes() {
        assert_eq!(Action::next(), Action::Continue(RequestChanges::new()));
    }

    #[test]
    fn route_names_upstream() {
        let Action::Route { upstream, changes } = Action::route("users") else {
            panic!("expected Action::Route");
        };
        assert_eq!(upstream, "users");
        assert!(changes.is_empty());
    }

    #[test]
    fn respond_wraps_response() {
        let action = Action::respond(Response::new(204));
        assert_eq!(action, Action::Respond(Response::new(204)));
    }
}
