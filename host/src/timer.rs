//! A coarse timer for timeouts armed on every request: hyper's HTTP/1
//! header-read timeout and the upstream response timeout.
//!
//! hyper arms a new timer for every request head it waits for and drops it
//! when the head arrives. With tokio's timer each of those is a timer-wheel
//! insertion and removal, plus the driver's bookkeeping on every park: about
//! a microsecond per request on the benchmark machine. A header timeout needs
//! no millisecond precision, so this timer keeps the waiting deadlines in a
//! per-thread slab and a sweep task on each serving thread wakes the expired
//! ones every `granularity`. Arming and dropping a timer is then a slab insert
//! and remove on the current thread, with no lock.
//!
//! A timer fires between its deadline and one `granularity` later. On a
//! thread without a sweep task (which the node never does, but hyper's API
//! allows) it falls back to a tokio sleep, so it still fires.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};
use slab::Slab;

/// A [`hyper::rt::Timer`] whose sleeps are woken by the current thread's
/// [`sweep`] task.
#[derive(Debug, Clone, Copy, Default)]
pub struct CoarseTimer;

impl Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(CoarseSleep {
            deadline,
            state: State::Idle,
        })
    }
}

/// Wakes the expired sleeps of the current thread every `granularity`, for
/// as long as the thread's runtime runs it. Spawn one per serving thread.
/// While no sleep waits, it waits too, so an idle node does not wake up.
pub async fn sweep(granularity: Duration) {
    WAITING.with_borrow_mut(|waiting| waiting.swept = true);
    let mut expired = Vec::new();
    loop {
        std::future::poll_fn(|cx| {
            WAITING.with_borrow_mut(|waiting| {
                if waiting.entries.is_empty() {
                    waiting.sweeper = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
        })
        .await;
        tokio::time::sleep(granularity).await;
        let now = Instant::now();
        WAITING.with_borrow_mut(|waiting| {
            for (_, entry) in waiting.entries.iter_mut() {
                if entry.deadline <= now {
                    expired.extend(entry.waker.take());
                }
            }
        });
        // Woken outside the borrow, in case a waker polls in place.
        for waker in expired.drain(..) {
            waker.wake();
        }
    }
}

/// Runs `future` until it completes or `deadline` passes, whichever comes
/// first; `Err(Elapsed)` when the time ran out. The timer is one of this
/// module's, so it fires up to one sweep granularity late.
pub fn timeout_at<F: Future>(deadline: Instant, future: F) -> Timeout<F> {
    Timeout {
        future,
        sleep: CoarseSleep {
            deadline,
            state: State::Idle,
        },
    }
}

pin_project_lite::pin_project! {
    /// The future [`timeout_at`] returns. It is a struct rather than an `async`
    /// fn because an async fn keeps its argument and the pinned copy of it
    /// both, which doubled the size of every future that awaits it.
    pub struct Timeout<F> {
        #[pin]
        future: F,
        sleep: CoarseSleep,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        Pin::new(this.sleep).poll(cx).map(|()| Err(Elapsed))
    }
}

/// A deadline on this module's timer that can be moved, for timeouts that a
/// streaming body checks between frames.
pub struct Deadline(CoarseSleep);

impl Deadline {
    /// Creates a deadline at `at`.
    pub fn new(at: Instant) -> Deadline {
        Deadline(CoarseSleep {
            deadline: at,
            state: State::Idle,
        })
    }

    /// Moves the deadline to `at`.
    pub fn reset(&mut self, at: Instant) {
        self.0.unregister();
        self.0.state = State::Idle;
        self.0.deadline = at;
    }

    /// Returns `Ready` once the deadline has passed, and otherwise arranges
    /// for `cx` to be woken when it does.
    pub fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// The error of [`timeout_at`] when the time ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// The deadlines waiting on one thread.
#[derive(Default)]
struct Waiting {
    entries: Slab<Entry>,
    /// Whether a [`sweep`] task runs on this thread.
    swept: bool,
    /// The sweep task, while it waits for the first entry.
    sweeper: Option<Waker>,
}

struct Entry {
    deadline: Instant,
    /// Taken when the sweep wakes it; the sleep removes its entry on drop.
    waker: Option<Waker>,
}

thread_local! {
    static WAITING: RefCell<Waiting> = RefCell::default();
}

/// Returns the address of this thread's [`WAITING`], which is unique among
/// the threads alive at the same time.
fn this_thread() -> usize {
    WAITING.with(|waiting| waiting as *const RefCell<Waiting> as usize)
}

struct CoarseSleep {
    deadline: Instant,
    state: State,
}

enum State {
    Idle,
    /// An entry in the slab of the thread whose [`this_thread`] is `thread`.
    Registered {
        thread: usize,
        key: usize,
    },
    Fallback(Pin<Box<tokio::time::Sleep>>),
}

impl Sleep for CoarseSleep {}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        let deadline = self.deadline;
        match &mut self.state {
            State::Fallback(sleep) => sleep.as_mut().poll(cx),
            State::Registered { thread, key } if *thread == this_thread() => {
                let key = *key;
                WAITING.with(|waiting| {
                    let mut waiting = waiting.borrow_mut();
                    let entry = &mut waiting.entries[key];
                    match &entry.waker {
                        Some(waker) if waker.will_wake(cx.waker()) => {}
                        _ => entry.waker = Some(cx.waker().clone()),
                    }
                });
                Poll::Pending
            }
            // Polled on another thread than the one it registered with: the
            // node's connections never move, but stay correct if one does.
            State::Registered { .. } => self.fall_back(cx),
            State::Idle => {
                let registered = WAITING.with(|waiting| {
                    let mut waiting = waiting.borrow_mut();
                    if !waiting.swept {
                        return None;
                    }
                    if let Some(sweeper) = waiting.sweeper.take() {
                        sweeper.wake();
                    }
                    Some(waiting.entries.insert(Entry {
                        deadline,
                        waker: Some(cx.waker().clone()),
                    }))
                });
                match registered {
                    Some(key) => {
                        self.state = State::Registered {
                            thread: this_thread(),
                            key,
                        };
                        Poll::Pending
                    }
                    None => self.fall_back(cx),
                }
            }
        }
    }
}

impl CoarseSleep {
    fn fall_back(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.unregister();
        let mut sleep = Box::pin(tokio::time::sleep_until(self.deadline.into()));
        let poll = sleep.as_mut().poll(cx);
        self.state = State::Fallback(sleep);
        poll
    }

    fn unregister(&mut self) {
        if let State::Registered { thread, key } = self.state {
            if thread == this_thread() {
                WAITING.with(|waiting| {
                    waiting.borrow_mut().entries.try_remove(key);
                });
            }
            // NOTE: an entry registered on another thread stays in that
            // thread's slab until the thread ends. The node never moves a
            // connection between threads.
            self.state = State::Idle;
        }
    }
}

impl Drop for CoarseSleep {
    fn drop(&mut self) {
        self.unregister();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn waiting_count() -> usize {
        WAITING.with(|waiting| waiting.borrow().entries.len())
    }

    #[test]
    fn fires_after_the_deadline_within_one_granularity() {
        runtime().block_on(async {
            tokio::spawn(sweep(Duration::from_millis(10)));
            tokio::task::yield_now().await;
            let start = Instant::now();
            CoarseTimer.sleep(Duration::from_millis(30)).await;
            let slept = start.elapsed();
            assert!(slept >= Duration::from_millis(30), "slept {slept:?}");
            assert_eq!(waiting_count(), 0, "a finished sleep leaves no entry");
        });
    }

    #[test]
    fn sleep_dropped_leaves_no_entry() {
        runtime().block_on(async {
            tokio::spawn(sweep(Duration::from_secs(1)));
            tokio::task::yield_now().await;
            let mut sleep = CoarseTimer.sleep(Duration::from_secs(60));
            let pending = futures_poll_once(sleep.as_mut()).await;
            assert!(pending, "a sleep of a minute is pending at first");
            assert_eq!(waiting_count(), 1);
            drop(sleep);
            assert_eq!(waiting_count(), 0);
        });
    }

    #[test]
    fn without_a_sweep_task_it_still_fires() {
        runtime().block_on(async {
            let start = Instant::now();
            CoarseTimer.sleep(Duration::from_millis(20)).await;
            assert!(start.elapsed() >= Duration::from_millis(20));
            assert_eq!(waiting_count(), 0);
        });
    }

    #[test]
    fn timeout_at_returns_output_or_elapsed() {
        runtime().block_on(async {
            tokio::spawn(sweep(Duration::from_millis(10)));
            tokio::task::yield_now().await;
            let soon = |millis| Instant::now() + Duration::from_millis(millis);
            assert_eq!(timeout_at(soon(5000), async { 7 }).await, Ok(7));
            let never = std::future::pending::<()>();
            assert_eq!(timeout_at(soon(20), never).await, Err(Elapsed));
            assert_eq!(waiting_count(), 0);
        });
    }

    /// Polls `future` once and returns whether it was pending.
    async fn futures_poll_once(mut future: Pin<&mut dyn Sleep>) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx).is_pending())).await
    }
}
