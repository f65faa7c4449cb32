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

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::redis::{Cmd, ErrorKind, Pipeline, RedisError, ServerErrorKind, Value};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::redis::{
    load_script, parse_decision, reply_text, split_decisions, Failure, Link, Verdict,
};

/// The maximum number of requests one `EVALSHA` decides. A script blocks the
/// server while it runs, so a long queue goes out as several commands of one
/// pipeline.
pub(super) const MAX_KEYS: usize = 128;

/// A request waiting for its decision.
pub(super) struct Pending {
    pub key: String,
    /// The limit's argument to the script.
    pub spec: Arc<str>,
    /// When the request was queued; its decision is due within the timeout.
    pub queued_at: Instant,
    pub reply: oneshot::Sender<Result<Verdict, Failure>>,
}

/// The queue of one link, and whether its flushing task waits for work.
#[derive(Default)]
pub(super) struct Queue {
    pending: Vec<Pending>,
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
}

impl Batcher {
    /// Queues `pending`, starting the link's flushing task on the first
    /// request, or waking it when it waits.
    pub fn push(&self, link: &Arc<Link>, pending: Pending, settings: &FlushSettings) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.pending.push(pending);
        if !queue.started {
            queue.started = true;
            tokio::spawn(flush_loop(link.clone(), settings.clone()));
        } else if queue.idle {
            queue.idle = false;
            self.wake.notify_one();
        }
    }

    /// Takes the queued requests into `batch`; marks the task idle when
    /// there are none.
    fn take(&self, batch: &mut Vec<Pending>) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.pending.is_empty() {
            queue.idle = true;
            return false;
        }
        std::mem::swap(&mut queue.pending, batch);
        true
    }
}

/// Sends the queued requests of `link`, one batch at a time, for as long as
/// the thread's runtime runs.
async fn flush_loop(link: Arc<Link>, settings: FlushSettings) {
    let mut batch = Vec::new();
    let mut pipeline = ::redis::pipe();
    pipeline.ignore_errors();
    loop {
        if !link.batcher.take(&mut batch) {
            link.batcher.wake.notified().await;
            continue;
        }
        flush(&link, &settings, &mut batch, &mut pipeline).await;
        batch.clear();
    }
}

/// Sends one batch as one pipeline and sends each request in it its decision.
async fn flush(
    link: &Link,
    settings: &FlushSettings,
    batch: &mut Vec<Pending>,
    pipeline: &mut Pipeline,
) {
    // A request whose client went away no longer needs a decision.
    batch.retain(|pending| !pending.reply.is_closed());
    let Some(oldest) = batch.first().map(|pending| pending.queued_at) else {
        return;
    };
    let deadline = oldest + settings.timeout;
    let Some((mut connection, generation)) = link.single_connection() else {
        // The batch in flight before this one failed, so fail at once, as
        // requests do while the link is down.
        fail_all(batch, |_| Failure::Down);
        return;
    };
    pipeline.clear();
    for chunk in batch.chunks(MAX_KEYS) {
        pipeline.add_command(evalsha(&settings.sha, chunk));
    }
    let exchange = async {
        let mut replies = pipeline.query_async::<Vec<Value>>(&mut connection).await?;
        let lost: Vec<usize> = (0..replies.len())
            .filter(|&index| is_noscript(&replies[index]))
            .collect();
        if !lost.is_empty() {
            // The server lost its scripts (restarted or flushed) while the
            // connection stayed up, so load the script again. Only the
            // commands that got NOSCRIPT are sent again, because a flush
            // between two commands of the pipeline lets the earlier ones run.
            load_script(&mut connection).await?;
            let mut again = ::redis::pipe();
            again.ignore_errors();
            let chunks: Vec<&[Pending]> = batch.chunks(MAX_KEYS).collect();
            for &index in &lost {
                again.add_command(evalsha(&settings.sha, chunks[index]));
            }
            let retried = again.query_async::<Vec<Value>>(&mut connection).await?;
            for (index, reply) in lost.into_iter().zip(retried) {
                replies[index] = reply;
            }
        }
        Ok::<_, RedisError>(replies)
    };
    match tokio::time::timeout_at(deadline, exchange).await {
        Ok(Ok(replies)) if replies.len() == batch.len().div_ceil(MAX_KEYS) => {
            let mut pending = batch.drain(..);
            for reply in &replies {
                answer(&mut pending, reply);
            }
        }
        Ok(Ok(replies)) => {
            let count = replies.len();
            fail_all(batch, |wanted| {
                Failure::Reply(format!("{count} replies to a batch of {wanted} requests"))
            });
        }
        Ok(Err(error)) => {
            // A server error reply leaves the connection usable; any other
            // error means it broke.
            if !matches!(error.kind(), ErrorKind::Server(_) | ErrorKind::Extension) {
                link.mark_down(generation);
            }
            fail_all(batch, |_| Failure::Redis(error.clone()));
        }
        Err(_) => {
            link.mark_down(generation);
            fail_all(batch, |_| Failure::Timeout(settings.timeout));
        }
    }
}

/// Sends the requests of one command, taken from `pending`, their decisions
/// from the command's `reply`.
fn answer(pending: &mut impl Iterator<Item = Pending>, reply: &Value) {
    let text = match reply_text(reply) {
        Ok(text) => text,
        Err(failure) => {
            let message = failure.to_string();
            for request in pending.take(MAX_KEYS) {
                let _ = request.reply.send(Err(Failure::Reply(message.clone())));
            }
            return;
        }
    };
    let mut decisions = split_decisions(text);
    for request in pending.take(MAX_KEYS) {
        let decision = match decisions.next() {
            Some(decision) => parse_decision(decision),
            None => Err(Failure::Reply(format!(
                "too few decisions: {}",
                String::from_utf8_lossy(text)
            ))),
        };
        let _ = request.reply.send(decision);
    }
}

/// Builds the `EVALSHA` command that decides the requests of `chunk`.
fn evalsha(sha: &str, chunk: &[Pending]) -> Cmd {
    // Sized up front, because growing the buffers argument by argument costs
    // several reallocations per command.
    let size = "EVALSHA".len() + sha.len() + 3;
    let size = size
        + chunk
            .iter()
            .map(|pending| pending.key.len() + pending.spec.len())
            .sum::<usize>();
    let mut command = Cmd::with_capacity(3 + 2 * chunk.len(), size);
    command.arg("EVALSHA").arg(sha).arg(chunk.len());
    for pending in chunk {
        command.arg(&pending.key);
    }
    for pending in chunk {
        command.arg(&*pending.spec);
    }
    command
}

/// Fails every request of `batch` with the failure that `make` builds from
/// the batch's size.
fn fail_all(batch: &mut Vec<Pending>, make: impl Fn(usize) -> Failure) {
    let size = batch.len();
    for pending in batch.drain(..) {
        let _ = pending.reply.send(Err(make(size)));
    }
}

fn is_noscript(reply: &Value) -> bool {
    matches!(reply, Value::ServerError(error) if error.kind() == Some(ServerErrorKind::NoScript))
}
