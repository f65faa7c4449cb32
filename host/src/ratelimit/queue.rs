//! The places a request takes in leaky buckets' queues while it waits for
//! its turn.
//!
//! A queued request has already moved its bucket forward by one interval.
//! Sometimes it does not get to leave: its client went away and the
//! pipeline's future was dropped, or a later limit rejected it. Then
//! [`Places`] gives each place back by moving the bucket back one interval.
//! So the next request takes the place instead of waiting behind, or being
//! rejected for, a request that is gone. Requests already waiting keep their turns, so the
//! request that takes the place leaves at the same time as the last of them.

use super::{Clock, Counted, KeyInput, Limit};

/// The queue places of one request, given back on drop unless released.
pub(super) struct Places<'a> {
    clock: &'a dyn Clock,
    request: &'a KeyInput<'a>,
    held: Vec<(&'a Limit, Counted)>,
}

impl<'a> Places<'a> {
    pub fn new(clock: &'a dyn Clock, request: &'a KeyInput<'a>) -> Places<'a> {
        Places {
            clock,
            request,
            held: Vec::new(),
        }
    }

    /// Records a place in `limit`'s queue, counted in the store `counted` names.
    pub fn hold(&mut self, limit: &'a Limit, counted: Counted) {
        self.held.push((limit, counted));
    }

    /// Keeps the places, because the request's turn came.
    pub fn release(&mut self) {
        self.held.clear();
    }
}

impl Drop for Places<'_> {
    fn drop(&mut self) {
        for (limit, counted) in self.held.drain(..) {
            limit.give_back(counted, self.clock, self.request);
        }
    }
}
