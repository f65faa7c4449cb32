//! The host side of the `upstreams` import: which upstream names the node's
//! config declares, so that a worker can check its config at load.

use super::bindings::edge::worker::upstreams;
use super::host_api::StoreState;

impl upstreams::Host for StoreState {
    fn exists(&mut self, name: String) -> bool {
        self.settings.upstreams.contains(&name)
    }
}
