//! Micro-batches of global decisions on one serving thread's connection to
//! one Redis server.
//!
//! Requests that need a decision while a batch is being written or awaited
//! wait in a queue. When the batch in flight ends, the queued requests go
//! out together: one `EVALSHA` decides up to [`MAX_KEYS`] of them, in the
//! order they were queued, and one pipeline carries the commands. So the
//! command's encoding, the channel send to the connection's task, the
//! `write`, the `read` and the reply's parse are shared by the batch, and the
//! script still decides each request atomically. At most one batch per
//! connection is in flight, and one timer bounds it: the deadline of its
//! oldest request, so no request waits for Redis longer than the timeout
//! counted from the moment it was queued.
//!
//! A queued request costs no allocation of its own. Its Redis key is written
//! into a buffer of the queue. Its decision comes back through a slot in a
//! slab of the queue, which the flushing task fills and the request's future
//! reads. One lock guards the queue and the slots. In the node it is not
//! contended, because each serving thread runs a current-thread runtime, so
//! a link's requests and its flushing task run on the link's thread.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{Cmd, ErrorKind, Pipeline, RedisError, ServerErrorKind, Value};
use slab::Slab;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::redis::{
    load_script, parse_decision, reply_text, split_decisions, Connector, Failure, Link, Verdict,
};

/// The maximum number of requests one `EVALSHA` decides. A script blocks the
/// server while it runs, so a long queue goes out as several commands of one
/// pipeline.
pub(super) const MAX_KEYS: usize = 128;

/// A request waiting for its decision.
struct Pending {
    /// The request's Redis key, in the `keys` buffer of its queue or batch.
    key: Range<usize>,
    /// The limit's argument to the script.
    spec: Arc<str>,
    /// When the request was queued; its decision is due within the timeout.
    queued_at: Instant,
    /// The request's slot in [`Queue::slots`].
    slot: usize,
}

/// The state of a queued request's decision.
enum Slot {
    /// No decision yet; the waker of the request's future once it was polled.
    Waiting(Option<Waker>),
    /// The decision, until the request's future takes it.
    Done(Result<Verdict, Failure>),
    /// The request's future was dropped before its decision came, so the
    /// flushing task frees the slot instead of filling it.
    Abandoned,
}

/// The queue of one link, and whether its flushing task waits for work.
#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    /// The Redis keys of `pending`, one after another.
    keys: Vec<u8>,
    /// The decisions of queued and in-flight requests.
    slots: Slab<Slot>,
    /// The flushing task is started (on the first request).
    started: bool,
    /// The flushing task waits for [`Batcher::wake`].
    idle: bool,
}

/// The queue of a link and the wake-up of its flushing task.
#[derive(Default)]
pub(super) struct Batcher {
    queue: Mutex<Queue>,
    wake: Notify,
}

/// The backend's settings that a flush uses.
#[derive(Clone)]
pub(super) struct FlushSettings {
    pub sha: Arc<str>,
    pub timeout: Duration,
    /// Opens a new connection when a batch finds its connection broken.
    pub connector: Arc<Connector>,
}

impl Batcher {
    /// Queues a request of the limit whose script argument is `spec`, with
    /// the Redis key that `write_key` appends to a buffer. Calls `start` to
    /// start the link's flushing task ([`flush_loop`]) on the first request,
    /// or wakes the task when it waits. Returns the future of the request's
    /// decision.
    pub fn push(
        &self,
        write_key: impl FnOnce(&mut Vec<u8>),
        spec: &Arc<str>,
        queued_at: Instant,
        start: impl FnOnce(),
    ) -> Answer<'_> {
        let mut queue = self.lock();
        let key_start = queue.keys.len();
        write_key(&mut queue.keys);
        let key = key_start..queue.keys.len();
        let slot = queue.slots.insert(Slot::Waiting(None));
        queue.pending.push(Pending {
            key,
            spec: spec.clone(),
            queued_at,
            slot,
        });
        if !queue.started {
            queue.started = true;
            start();
        } else if queue.idle {
            queue.idle = false;
            self.wake.notify_one();
        }
        Answer {
            batcher: self,
            slot,
            returned: false,
        }
    }

    /// Takes the queued requests and their keys into `pending` and `keys`,
    /// dropping those whose futures were dropped. Marks the flushing task
    /// idle and returns false when there are none.
    fn take(&self, pending: &mut Vec<Pending>, keys: &mut Vec<u8>) -> bool {
        let mut queue = self.lock();
        if queue.pending.is_empty() {
            queue.idle = true;
            return false;
        }
        std::mem::swap(&mut queue.pending, pending);
        std::mem::swap(&mut queue.keys, keys);
        // A request whose client went away no longer needs a decision.
        let slots = &mut queue.slots;
        pending.retain(|request| {
            let abandoned = matches!(slots[request.slot], Slot::Abandoned);
            if abandoned {
                slots.remove(request.slot);
            }
            !abandoned
        });
        true
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores the decision that `decide` makes for each request of
    /// `pending`, in order, and wakes the requests' futures.
    fn settle(
        &self,
        pending: impl Iterator<Item = Pending>,
        mut decide: impl FnMut() -> Result<Verdict, Failure>,
        wakers: &mut Vec<Waker>,
    ) {
        {
            let mut queue = self.lock();
            for request in pending {
                let slot = &mut queue.slots[request.slot];
                match std::mem::replace(slot, Slot::Done(decide())) {
                    Slot::Waiting(waker) => wakers.extend(waker),
                    Slot::Abandoned => {
                        queue.slots.remove(request.slot);
                    }
                    Slot::Done(_) => unreachable!("a request is decided once"),
                }
            }
        }
        // Woken after the lock is released, because a waker may poll its
        // future at once, and that poll takes the lock.
        for waker in wakers.drain(..) {
            waker.wake();
        }
    }
}

/// The future of a queued request's decision.
pub(super) struct Answer<'a> {
    batcher: &'a Batcher,
    slot: usize,
    /// The future returned the decision and freed its slot.
    returned: bool,
}

impl Future for Answer<'_> {
    type Output = Result<Verdict, Failure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        assert!(!self.returned, "an answer polled after it returned");
        let mut queue = self.batcher.lock();
        match &mut queue.slots[self.slot] {
            Slot::Waiting(waker) => {
                match waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Slot::Done(_) => {
                let Slot::Done(decision) = queue.slots.remove(self.slot) else {
                    unreachable!("the slot was matched as done");
                };
                drop(queue);
                self.returned = true;
                Poll::Ready(decision)
            }
            Slot::Abandoned => unreachable!("only a dropped answer abandons its slot"),
        }
    }
}

impl Drop for Answer<'_> {
    fn drop(&mut self) {
        if self.returned {
            return;
        }
        let mut queue = self.batcher.lock();
        match queue.slots[self.slot] {
            // The request is still queued or in the batch in flight, so the
            // flushing task frees the slot when it comes to it.
            Slot::Waiting(_) => queue.slots[self.slot] = Slot::Abandoned,
            Slot::Done(_) => {
                queue.slots.remove(self.slot);
            }
            Slot::Abandoned => {}
        }
    }
}

/// The requests of the batch in flight, and buffers that the flushing task
/// reuses from batch to batch.
struct Batch {
    link: Arc<Link>,
    pending: Vec<Pending>,
    keys: Vec<u8>,
    wakers: Vec<Waker>,
}

impl Batch {
    /// Fails every request of the batch with the failure that `make` builds
    /// from the batch's size.
    fn fail_all(&mut self, make: impl Fn(usize) -> Failure) {
        let size = self.pending.len();
        self.link
            .batcher
            .settle(self.pending.drain(..), || Err(make(size)), &mut self.wakers);
    }
}

impl Drop for Batch {
    /// Fails the requests of a batch whose flushing task ends before they
    /// are decided (the runtime shuts down or the task panics), so that
    /// their futures do not wait for ever.
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            self.fail_all(|_| Failure::Down);
        }
    }
}

/// Sends the queued requests of `link`, one batch at a time, for as long as
/// the thread's runtime runs.
pub(super) async fn flush_loop(link: Arc<Link>, settings: FlushSettings) {
    let mut batch = Batch {
        link,
        pending: Vec::new(),
        keys: Vec::new(),
        wakers: Vec::new(),
    };
    let mut pipeline = ::redis::pipe();
    pipeline.ignore_errors();
    // One timer for the loop's life, moved to each batch's deadline. A new
    // tokio timer whose deadline comes before the runtime's next wake-up
    // wakes the runtime's driver through its eventfd, which costs a system
    // call and an extra poll per batch. Moving a timer later does not.
    let mut expiry = std::pin::pin!(tokio::time::sleep_until(Instant::now() + IDLE_EXPIRY));
    loop {
        if !batch.link.batcher.take(&mut batch.pending, &mut batch.keys) {
            batch.link.batcher.wake.notified().await;
            continue;
        }
        flush(&settings, &mut batch, &mut pipeline, expiry.as_mut()).await;
        batch.keys.clear();
        // Yielded until the runtime has polled its sockets, so the requests
        // that arrived during the round trip are read and join the next
        // batch. Under load that saves about 30 % of the round trips, at the
        // cost of one more poll.
        tokio::task::yield_now().await;
    }
}

/// The delay of the flush loop's timer before the first batch moves it, long
/// enough that the timer does not fire first.
const IDLE_EXPIRY: Duration = Duration::from_secs(3600);

/// Runs `exchange` until it completes or `expiry` fires.
async fn before<F: Future>(
    exchange: F,
    mut expiry: Pin<&mut tokio::time::Sleep>,
) -> Option<F::Output> {
    let mut exchange = std::pin::pin!(exchange);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = exchange.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        expiry.as_mut().poll(cx).map(|()| None)
    })
    .await
}

/// Sends one batch as one pipeline and stores each request's decision.
///
/// A batch whose connection breaks goes once more on a new connection,
/// within the batch's deadline, so a Redis restart does not fail every
/// request that arrived at that moment. If Redis ran the batch before the
/// connection broke, its requests count twice. That is rare, and it
/// rejects requests early rather than admit too many.
async fn flush(
    settings: &FlushSettings,
    batch: &mut Batch,
    pipeline: &mut Pipeline,
    mut expiry: Pin<&mut tokio::time::Sleep>,
) {
    let Some(oldest) = batch.pending.first().map(|pending| pending.queued_at) else {
        return;
    };
    let deadline = oldest + settings.timeout;
    expiry.as_mut().reset(deadline);
    pipeline.clear();
    for chunk in batch.pending.chunks(MAX_KEYS) {
        pipeline.add_command(evalsha(&settings.sha, &batch.keys, chunk));
    }
    let mut resent = false;
    loop {
        let Some((mut connection, generation)) = batch.link.single_connection() else {
            // The batch in flight before this one failed, so fail at once, as
            // requests do while the link is down.
            batch.fail_all(|_| Failure::Down);
            return;
        };
        let exchange = exchange(settings, batch, pipeline, &mut connection);
        let error = match before(exchange, expiry.as_mut()).await {
            Some(Ok(replies)) if replies.len() == batch.pending.len().div_ceil(MAX_KEYS) => {
                batch.link.note_reply(&settings.connector);
                let Batch {
                    link,
                    pending,
                    wakers,
                    ..
                } = batch;
                let mut pending = pending.drain(..);
                for reply in &replies {
                    answer(
                        &link.batcher,
                        pending.by_ref().take(MAX_KEYS),
                        reply,
                        wakers,
                    );
                }
                return;
            }
            Some(Ok(replies)) => {
                let count = replies.len();
                batch.fail_all(|wanted| {
                    Failure::Reply(format!("{count} replies to a batch of {wanted} requests"))
                });
                return;
            }
            // A server error reply leaves the connection usable.
            Some(Err(error))
                if matches!(error.kind(), ErrorKind::Server(_) | ErrorKind::Extension) =>
            {
                batch.link.note_reply(&settings.connector);
                batch.fail_all(|_| Failure::Redis(error.clone()));
                return;
            }
            Some(Err(error)) => error,
            None => {
                batch.link.mark_timed_out(generation);
                batch.fail_all(|_| Failure::Timeout(settings.timeout));
                return;
            }
        };
        // Any other error means the connection broke.
        batch.link.mark_broken(generation);
        if !resent {
            resent = true;
            let reconnect = settings.connector.connection(&batch.link, deadline);
            if let Some(Ok(_)) = before(reconnect, expiry.as_mut()).await {
                continue;
            }
        }
        batch.fail_all(|_| Failure::Redis(error.clone()));
        return;
    }
}

/// Sends the batch's pipeline on `connection` and returns the replies,
/// loading the script again when the server lost it.
async fn exchange(
    settings: &FlushSettings,
    batch: &Batch,
    pipeline: &Pipeline,
    connection: &mut MultiplexedConnection,
) -> Result<Vec<Value>, RedisError> {
    let mut replies = pipeline.query_async::<Vec<Value>>(connection).await?;
    let lost: Vec<usize> = (0..replies.len())
        .filter(|&index| is_noscript(&replies[index]))
        .collect();
    if !lost.is_empty() {
        // The server lost its scripts (restarted or flushed) while the
        // connection stayed up, so load the script again. Only the commands
        // that got NOSCRIPT are sent again, because a flush between two
        // commands of the pipeline lets the earlier ones run.
        load_script(connection).await?;
        let mut again = ::redis::pipe();
        again.ignore_errors();
        let chunks: Vec<&[Pending]> = batch.pending.chunks(MAX_KEYS).collect();
        for &index in &lost {
            again.add_command(evalsha(&settings.sha, &batch.keys, chunks[index]));
        }
        let retried = again.query_async::<Vec<Value>>(connection).await?;
        for (index, reply) in lost.into_iter().zip(retried) {
            replies[index] = reply;
        }
    }
    Ok(replies)
}

/// Stores the decisions of the requests of one command, `chunk`, from the
/// command's `reply`.
fn answer(
    batcher: &Batcher,
    chunk: impl Iterator<Item = Pending>,
    reply: &Value,
    wakers: &mut Vec<Waker>,
) {
    let text = match reply_text(reply) {
        Ok(text) => text,
        Err(failure) => {
            let message = failure.to_string();
            batcher.settle(chunk, || Err(Failure::Reply(message.clone())), wakers);
            return;
        }
    };
    let mut decisions = split_decisions(text);
    let decide = || match decisions.next() {
        Some(decision) => parse_decision(decision),
        None => Err(Failure::Reply(format!(
            "too few decisions: {}",
            String::from_utf8_lossy(text)
        ))),
    };
    batcher.settle(chunk, decide, wakers);
}

/// Builds the `EVALSHA` command that decides the requests of `chunk`, whose
/// keys are in `keys`. When the requests share one limit, the limit's
/// argument goes once, because the script then applies it to every key.
fn evalsha(sha: &str, keys: &[u8], chunk: &[Pending]) -> Cmd {
    let shared = match chunk.first() {
        Some(first) => chunk
            .iter()
            .all(|pending| Arc::ptr_eq(&pending.spec, &first.spec) || pending.spec == first.spec),
        None => false,
    };
    let specs = if shared { &chunk[..1] } else { chunk };
    // Sized up front, because growing the buffers argument by argument costs
    // several reallocations per command.
    let size = "EVALSHA".len() + sha.len() + 3;
    let size = size
        + chunk.iter().map(|pending| pending.key.len()).sum::<usize>()
        + specs
            .iter()
            .map(|pending| pending.spec.len())
            .sum::<usize>();
    let mut command = Cmd::with_capacity(3 + chunk.len() + specs.len(), size);
    command.arg("EVALSHA").arg(sha).arg(chunk.len());
    for pending in chunk {
        command.arg(&keys[pending.key.clone()]);
    }
    for pending in specs {
        command.arg(&*pending.spec);
    }
    command
}

fn is_noscript(reply: &Value) -> bool {
    matches!(reply, Value::ServerError(error) if error.kind() == Some(ServerErrorKind::NoScript))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns the arguments of `command` as text.
    fn arguments(command: &Cmd) -> Vec<String> {
        command
            .args_iter()
            .map(|argument| match argument {
                ::redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                other => panic!("unexpected argument {other:?}"),
            })
            .collect()
    }

    /// Queues requests with the Redis keys and script arguments of
    /// `requests` into a key buffer and a list of pending requests.
    fn queued(requests: &[(&str, &Arc<str>)]) -> (Vec<u8>, Vec<Pending>) {
        let mut keys = Vec::new();
        let mut pending = Vec::new();
        for (slot, (key, spec)) in requests.iter().enumerate() {
            let start = keys.len();
            keys.extend_from_slice(key.as_bytes());
            pending.push(Pending {
                key: start..keys.len(),
                spec: Arc::clone(spec),
                queued_at: Instant::now(),
                slot,
            });
        }
        (keys, pending)
    }

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    impl CountingWaker {
        fn count(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    fn verdict(remaining: u64) -> Verdict {
        Verdict {
            decision: super::super::Decision {
                allowed: true,
                limit: 10,
                remaining,
                reset_ns: 0,
                retry_after_ns: 0,
                delay_ns: 0,
            },
            granted: 1,
        }
    }

    fn poll(answer: &mut Answer<'_>, waker: &Arc<CountingWaker>) -> Poll<Result<Verdict, Failure>> {
        let waker = Waker::from(Arc::clone(waker));
        Pin::new(answer).poll(&mut Context::from_waker(&waker))
    }

    fn slots(batcher: &Batcher) -> usize {
        batcher.lock().slots.len()
    }

    #[test]
    fn answers_wait_for_their_decisions() {
        let batcher = Batcher::default();
        let spec: Arc<str> = Arc::from("2 1000000 10");
        let mut starts = 0;
        let mut first = batcher.push(
            |key| key.extend_from_slice(b"a"),
            &spec,
            Instant::now(),
            || starts += 1,
        );
        let mut second = batcher.push(
            |key| key.extend_from_slice(b"bc"),
            &spec,
            Instant::now(),
            || starts += 1,
        );
        assert_eq!(starts, 1, "the flushing task starts once");
        let waker = Arc::new(CountingWaker::default());
        assert!(poll(&mut first, &waker).is_pending());
        assert!(poll(&mut second, &waker).is_pending());

        let (mut pending, mut keys) = (Vec::new(), Vec::new());
        assert!(batcher.take(&mut pending, &mut keys));
        assert_eq!(keys, b"abc");
        assert_eq!(pending.len(), 2);
        assert_eq!(&keys[pending[1].key.clone()], b"bc");
        let mut remaining = 5;
        let decide = || {
            remaining -= 1;
            Ok(verdict(remaining))
        };
        batcher.settle(pending.drain(..), decide, &mut Vec::new());
        assert_eq!(waker.count(), 2);

        let Poll::Ready(Ok(decided)) = poll(&mut second, &waker) else {
            panic!("the second answer is not ready");
        };
        assert_eq!(decided.decision.remaining, 3);
        let Poll::Ready(Ok(decided)) = poll(&mut first, &waker) else {
            panic!("the first answer is not ready");
        };
        assert_eq!(decided.decision.remaining, 4);
        drop((first, second));
        assert_eq!(slots(&batcher), 0);
        assert!(!batcher.take(&mut pending, &mut keys));
    }

    #[test]
    fn dropped_answers_free_their_slots() {
        let batcher = Batcher::default();
        let spec: Arc<str> = Arc::from("2 1000000 10");
        let push = |key: &'static [u8]| {
            batcher.push(
                |buffer| buffer.extend_from_slice(key),
                &spec,
                Instant::now(),
                || {},
            )
        };
        // Dropped while queued: the next batch leaves the request out.
        let queued = push(b"a");
        let in_flight = push(b"b");
        drop(queued);
        let (mut pending, mut keys) = (Vec::new(), Vec::new());
        assert!(batcher.take(&mut pending, &mut keys));
        assert_eq!(pending.len(), 1);
        assert_eq!(&keys[pending[0].key.clone()], b"b");
        assert_eq!(slots(&batcher), 1);

        // Dropped while in flight: its decision frees the slot.
        drop(in_flight);
        batcher.settle(pending.drain(..), || Ok(verdict(1)), &mut Vec::new());
        assert_eq!(slots(&batcher), 0);

        // Dropped after its decision, before it was polled.
        let decided = push(b"c");
        keys.clear();
        assert!(batcher.take(&mut pending, &mut keys));
        batcher.settle(pending.drain(..), || Err(Failure::Down), &mut Vec::new());
        assert_eq!(slots(&batcher), 1);
        drop(decided);
        assert_eq!(slots(&batcher), 0);
    }

    #[test]
    fn evalsha_sends_a_shared_limit_once() {
        let spec: Arc<str> = Arc::from("1 1000 10 0 1");
        let equal: Arc<str> = Arc::from("1 1000 10 0 1");
        let (keys, pending) = queued(&[("a", &spec), ("b", &spec), ("c", &equal)]);
        let command = evalsha("sha", &keys, &pending);
        assert_eq!(
            arguments(&command),
            ["EVALSHA", "sha", "3", "a", "b", "c", "1 1000 10 0 1"]
        );
    }

    #[test]
    fn evalsha_sends_mixed_limits_per_key() {
        let bucket: Arc<str> = Arc::from("1 1000 10 0 1");
        let window: Arc<str> = Arc::from("2 1000000 5");
        let (keys, pending) = queued(&[("a", &bucket), ("b", &window), ("c", &bucket)]);
        let command = evalsha("sha", &keys, &pending);
        assert_eq!(
            arguments(&command),
            [
                "EVALSHA",
                "sha",
                "3",
                "a",
                "b",
                "c",
                "1 1000 10 0 1",
                "2 1000000 5",
                "1 1000 10 0 1"
            ]
        );
    }
}
