//! The running time of a worker call: what its CPU deadline counts.
//!
//! At each epoch tick the call's time since the last tick is counted twice,
//! and the smaller figure is kept:
//!
//! - wall time, minus the time the guest waited in host imports for the
//!   network and the time it was yielded to other requests on its thread.
//!   It is too high when the kernel ran other processes on the thread's
//!   core, as a busy machine does;
//! - the thread's CPU time, minus what the thread spent on other requests
//!   while the guest was yielded. It is too high when the guest waited in a
//!   host import while other requests ran on the thread.
//!
//! Each figure is at least the guest's own running time, so the smaller one
//! is too, and a busy machine no longer fails calls that used a fraction of
//! their deadline.
//!
//! Time the guest spends blocked in WASI `poll` is left out of both figures
//! and counted whole. WASI grants a guest nothing else to wait for, so such
//! a block is a sleep, and a guest that sleeps is stopped at its deadline
//! too: the sleep is cut off when the deadline passes.
//!
//! A call that ends before the first tick, and does not sleep, reads only
//! the wall clock when it starts. Reading the thread's CPU clock is a system
//! call (about 0.26 µs here), so it is read only at ticks and around sleeps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use super::EPOCH_TICK;

/// The maximum time before the first tick that counts. A running guest
/// checks the epoch at every loop and call, so it notices the first tick
/// within a tick of starting when the ticker thread is on time. Any more
/// time before the first tick was spent off the CPU.
const BEFORE_FIRST_TICK: Duration = EPOCH_TICK.saturating_mul(2);

/// The running time of one call.
pub(super) struct RunningTime {
    started: Instant,
    deadline: Duration,
    /// The time the guest slept so far, in wall and thread CPU time.
    slept: Spent,
    /// The count and the clocks at the last tick, from the first tick on.
    ticks: Option<Ticks>,
}

/// The clocks when a sleep began.
pub(super) struct SleepStart {
    wall: Instant,
    thread: ThreadId,
    cpu: Duration,
}

/// The running time counted up to the last tick, and the clocks then.
struct Ticks {
    counted: Duration,
    at: Readings,
    yields: Arc<Yields>,
}

/// The clocks at a tick.
#[derive(Clone, Copy)]
struct Readings {
    wall: Instant,
    thread: ThreadId,
    cpu: Duration,
    /// The call's wait in host imports so far.
    waited: Duration,
    /// The time the call's yields took so far.
    yielded: Spent,
    /// The time the guest slept so far.
    slept: Spent,
}

impl Readings {
    fn now(waited: Duration, yields: &Yields, slept: Spent) -> Readings {
        Readings {
            wall: Instant::now(),
            thread: thread::current().id(),
            cpu: thread_cpu_time(),
            waited,
            yielded: yields.spent(),
            slept,
        }
    }

    /// Returns the guest's running time from `self` to `later`: the smaller
    /// of the wall and the CPU figure, plus the sleeps in between. When the
    /// call moved to another thread, whose CPU clock does not measure this
    /// call, the wall figure alone counts.
    fn running_until(&self, later: &Readings) -> Duration {
        let yielded = later.yielded.since(self.yielded);
        let slept = later.slept.since(self.slept);
        let wall = later
            .wall
            .saturating_duration_since(self.wall)
            .saturating_sub(later.waited.saturating_sub(self.waited))
            .saturating_sub(yielded.wall)
            .saturating_sub(slept.wall);
        if later.thread != self.thread {
            return wall + slept.wall;
        }
        let cpu = later
            .cpu
            .saturating_sub(self.cpu)
            .saturating_sub(yielded.cpu)
            .saturating_sub(slept.cpu);
        wall.min(cpu) + slept.wall
    }
}

impl RunningTime {
    /// Starts counting the running time of a call with this CPU deadline.
    pub(super) fn start(deadline: Duration) -> RunningTime {
        RunningTime {
            started: Instant::now(),
            deadline,
            slept: Spent::default(),
            ticks: None,
        }
    }

    pub(super) fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Returns the running time left before the deadline, as counted at the
    /// last tick. The time since then is not counted.
    pub(super) fn left(&self) -> Duration {
        let counted = self.ticks.as_ref().map_or(self.slept.wall, |ticks| {
            ticks.counted + self.slept.since(ticks.at.slept).wall
        });
        self.deadline.saturating_sub(counted)
    }

    /// Reads the clocks as the guest starts to sleep.
    pub(super) fn sleep_begins() -> SleepStart {
        SleepStart {
            wall: Instant::now(),
            thread: thread::current().id(),
            cpu: thread_cpu_time(),
        }
    }

    /// Counts a sleep that began at `start` and ends now.
    pub(super) fn sleep_ended(&mut self, start: SleepStart) {
        let wall = start.wall.elapsed();
        self.slept.wall += wall;
        // The CPU clocks of two threads cannot be compared, so a sleep that
        // ended on another thread is taken to have used the whole wall time.
        self.slept.cpu += if thread::current().id() == start.thread {
            thread_cpu_time().saturating_sub(start.cpu)
        } else {
            wall
        };
    }

    /// Counts the time since the last tick and returns the call's running
    /// time so far, and where its next yield records what it took.
    /// `waited` is the call's whole wait in host imports.
    pub(super) fn tick(&mut self, waited: Duration) -> (Duration, &Arc<Yields>) {
        let ticks = match self.ticks.take() {
            Some(mut ticks) => {
                let now = Readings::now(waited, &ticks.yields, self.slept);
                ticks.counted += ticks.at.running_until(&now);
                ticks.at = now;
                ticks
            }
            None => {
                let yields = Arc::new(Yields::default());
                let at = Readings::now(waited, &yields, self.slept);
                let counted = at
                    .wall
                    .saturating_duration_since(self.started)
                    .saturating_sub(waited)
                    .saturating_sub(self.slept.wall)
                    .min(BEFORE_FIRST_TICK)
                    + self.slept.wall;
                Ticks {
                    counted,
                    at,
                    yields,
                }
            }
        };
        let ticks = self.ticks.insert(ticks);
        (ticks.counted, &ticks.yields)
    }
}

/// The time a call's yields took, in wall and thread CPU time, updated by
/// the yields themselves.
#[derive(Default)]
pub(super) struct Yields {
    wall_nanos: AtomicU64,
    cpu_nanos: AtomicU64,
}

#[derive(Clone, Copy, Default)]
struct Spent {
    wall: Duration,
    cpu: Duration,
}

impl Spent {
    fn since(self, earlier: Spent) -> Spent {
        Spent {
            wall: self.wall.saturating_sub(earlier.wall),
            cpu: self.cpu.saturating_sub(earlier.cpu),
        }
    }
}

impl Yields {
    /// Yields to the other tasks on the thread once, and records the time
    /// that took. tokio's `yield_now` wakes the task only after the runtime
    /// has polled its sockets, so other connections on the thread get their
    /// I/O.
    pub(super) async fn yield_once(&self) {
        let wall = Instant::now();
        let thread = thread::current().id();
        let cpu = thread_cpu_time();
        tokio::task::yield_now().await;
        self.wall_nanos
            .fetch_add(nanos(wall.elapsed()), Ordering::Relaxed);
        // The CPU clocks of two threads cannot be compared, so a task that
        // resumed on another thread counts the interval's wall figure.
        if thread::current().id() == thread {
            let cpu = thread_cpu_time().saturating_sub(cpu);
            self.cpu_nanos.fetch_add(nanos(cpu), Ordering::Relaxed);
        }
    }

    fn spent(&self) -> Spent {
        Spent {
            wall: Duration::from_nanos(self.wall_nanos.load(Ordering::Relaxed)),
            cpu: Duration::from_nanos(self.cpu_nanos.load(Ordering::Relaxed)),
        }
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Returns the CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid, writable timespec, and the thread CPU clock
    // exists on every Linux since 2.6.12, so the call only writes `time`.
    // rustix's `clock_gettime` reads the vDSO directly, which made valgrind
    // abort the node at its first worker call.
    #[allow(unsafe_code)]
    let result = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) };
    if result != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(time.tv_sec).unwrap_or(0),
        u32::try_from(time.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Burns about `duration` of the thread's CPU time.
    fn spin(duration: Duration) {
        let until = thread_cpu_time() + duration;
        while thread_cpu_time() < until {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn sleeping_off_the_cpu_does_not_count() {
        let mut running = RunningTime::start(Duration::from_secs(1));
        running.tick(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(50));
        let counted = running.tick(Duration::ZERO).0;
        assert!(
            counted < Duration::from_millis(20),
            "50 ms asleep counted as {counted:?}"
        );
    }

    #[test]
    fn running_on_the_cpu_counts() {
        let mut running = RunningTime::start(Duration::from_secs(1));
        running.tick(Duration::ZERO);
        spin(Duration::from_millis(30));
        let counted = running.tick(Duration::ZERO).0;
        assert!(
            counted >= Duration::from_millis(30),
            "30 ms of CPU counted as {counted:?}"
        );
    }

    #[test]
    fn time_before_the_first_tick_is_capped() {
        let mut running = RunningTime::start(Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(running.tick(Duration::ZERO).0, BEFORE_FIRST_TICK);
    }

    #[test]
    fn host_waits_do_not_count() {
        let mut running = RunningTime::start(Duration::from_secs(1));
        running.tick(Duration::ZERO);
        // The thread ran something else for 30 ms while the call waited.
        let waiting = Instant::now();
        spin(Duration::from_millis(30));
        let counted = running.tick(waiting.elapsed()).0;
        assert!(
            counted < Duration::from_millis(15),
            "a 30 ms wait counted as {counted:?}"
        );
    }

    #[test]
    fn sleeps_count_whole() {
        let mut running = RunningTime::start(Duration::from_secs(1));
        let start = RunningTime::sleep_begins();
        std::thread::sleep(Duration::from_millis(30));
        running.sleep_ended(start);
        let left = running.left();
        assert!(left <= Duration::from_millis(970), "{left:?} left");
        // Before the first tick, and after it.
        let counted = running.tick(Duration::ZERO).0;
        assert!(counted >= Duration::from_millis(30), "{counted:?}");
        let start = RunningTime::sleep_begins();
        std::thread::sleep(Duration::from_millis(30));
        running.sleep_ended(start);
        let counted = running.tick(Duration::ZERO).0;
        assert!(counted >= Duration::from_millis(60), "{counted:?}");
    }

    #[tokio::test]
    async fn yields_do_not_count() {
        let mut running = RunningTime::start(Duration::from_secs(1));
        let yields = running.tick(Duration::ZERO).1.clone();
        // Another task burns the thread's CPU while the call is yielded.
        let other = tokio::spawn(async { spin(Duration::from_millis(30)) });
        yields.yield_once().await;
        other.await.unwrap();
        let counted = running.tick(Duration::ZERO).0;
        assert!(
            counted < Duration::from_millis(15),
            "30 ms of another task counted as {counted:?}"
        );
    }
}
