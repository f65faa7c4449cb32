//! Target health: active checks (a request to a health path every interval)
//! and passive outlier ejection (a target that fails consecutive real
//! requests is taken out for a while). A target that either marks out gets
//! no traffic; when every target of an upstream is out, requests get 503
//! `no_healthy_upstream` without a connection attempt.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::Request;
use tokio::sync::watch;

use crate::node::Node;
use crate::proxy::{RequestBody, Target, Upstream};

/// Settings of active health checks.
#[derive(Debug, Clone)]
pub struct ActiveSettings {
    /// The path requested with GET; a 2xx or 3xx status is healthy.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passed checks that mark an unhealthy target healthy.
    pub healthy_threshold: u32,
    /// Consecutive failed checks that mark a healthy target unhealthy.
    pub unhealthy_threshold: u32,
}

/// Settings of passive outlier ejection.
#[derive(Debug, Clone)]
pub struct PassiveSettings {
    /// Consecutive failed requests that eject a target.
    pub consecutive_failures: u32,
    /// The first ejection's length; each further ejection in a row doubles
    /// it, up to `max_ejection_time`.
    pub ejection_time: Duration,
    pub max_ejection_time: Duration,
}

/// The health of one target, shared by every serving thread.
#[derive(Debug, Default)]
pub struct TargetHealth {
    /// False after `unhealthy_threshold` failed active checks.
    unhealthy: AtomicBool,
    /// The end of the current ejection, in milliseconds since [`epoch`]; 0
    /// when the target is not ejected.
    ejected_until: AtomicU64,
    /// Ejections in a row, for the growing ejection time.
    ejections: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Consecutive active check results, passed (positive) or failed
    /// (negative); only the checker thread writes it.
    streak: std::sync::atomic::AtomicI32,
    /// The last failed check's reason, for the admin listener.
    last_error: std::sync::Mutex<Option<String>>,
}

/// The instant health times count from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn millis_since_epoch(now: Instant) -> u64 {
    now.saturating_duration_since(epoch()).as_millis() as u64
}

impl TargetHealth {
    /// Whether the target may get traffic: it passes its active checks and
    /// is not ejected.
    pub fn is_up(&self, now: Instant) -> bool {
        if self.unhealthy.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || millis_since_epoch(now) >= until
    }

    /// Whether the latest active checks failed.
    pub fn is_unhealthy(&self) -> bool {
        self.unhealthy.load(Ordering::Relaxed)
    }

    /// Time left in the current ejection.
    pub fn ejected_for(&self, now: Instant) -> Duration {
        let until = self.ejected_until.load(Ordering::Relaxed);
        Duration::from_millis(until.saturating_sub(millis_since_epoch(now)))
    }

    /// The reason of the last failed active check.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Counts a real request that succeeded.
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 && self.ejected_until_passed() {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    fn ejected_until_passed(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) <= millis_since_epoch(Instant::now())
    }

    /// Counts a real request that failed, and ejects the target once
    /// `consecutive_failures` failed in a row.
    pub fn record_failure(&self, settings: &PassiveSettings, label: &str, now: Instant) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < settings.consecutive_failures {
            return;
        }
        let now_ms = millis_since_epoch(now);
        if self.ejected_until.load(Ordering::Relaxed) > now_ms {
            return;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let ejections = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let length = settings
            .ejection_time
            .saturating_mul(1 << ejections)
            .min(settings.max_ejection_time);
        self.ejected_until
            .store(now_ms + length.as_millis() as u64, Ordering::Relaxed);
        tracing::info!(
            target_name = %label,
            failures,
            ejection_ms = length.as_millis() as u64,
            "ejected target after consecutive failed requests"
        );
    }

    /// Records an active check's result and flips the target's health at the
    /// thresholds.
    fn record_check(&self, settings: &ActiveSettings, label: &str, result: Result<(), String>) {
        let streak = self.streak.load(Ordering::Relaxed);
        let passed = result.is_ok();
        let streak = match (passed, streak) {
            (true, s) if s > 0 => s.saturating_add(1),
            (true, _) => 1,
            (false, s) if s < 0 => s.saturating_sub(1),
            (false, _) => -1,
        };
        self.streak.store(streak, Ordering::Relaxed);
        let unhealthy = self.unhealthy.load(Ordering::Relaxed);
        if let Err(error) = result {
            let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
            if unhealthy || -streak >= settings.unhealthy_threshold as i32 {
                *last = Some(error.clone());
            }
            if !unhealthy && -streak >= settings.unhealthy_threshold as i32 {
                self.unhealthy.store(true, Ordering::Relaxed);
                tracing::info!(target_name = %label, %error, "target marked unhealthy");
            }
        } else if unhealthy && streak >= settings.healthy_threshold as i32 {
            self.unhealthy.store(false, Ordering::Relaxed);
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
            tracing::info!(target_name = %label, "target marked healthy");
        }
    }
}

/// Starts the thread that runs the active checks of every upstream that has
/// them, until `shutdown` turns true. Returns `None` when no upstream has
/// active checks.
pub fn spawn_checker(
    node: Arc<Node>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
    if node.upstreams.iter().all(|u| u.active_health.is_none()) {
        return Ok(None);
    }
    let handle = crate::listener::spawn_runtime_thread("edge-health", move || async move {
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..node.upstreams.len() {
            let Some(settings) = node.upstreams[index].active_health.clone() else {
                continue;
            };
            for target in 0..node.upstreams[index].targets.len() {
                let node = node.clone();
                let settings = settings.clone();
                tasks.spawn(async move {
                    let upstream = &node.upstreams[index];
                    check_forever(upstream, &upstream.targets[target], &settings).await
                });
            }
        }
        let _ = shutdown.wait_for(|stop| *stop).await;
        tasks.abort_all();
    })?;
    Ok(Some(handle))
}

async fn check_forever(upstream: &Upstream, target: &Target, settings: &ActiveSettings) {
    let mut interval = tokio::time::interval(settings.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let result =
            match tokio::time::timeout(settings.timeout, check(upstream, target, settings)).await {
                Ok(result) => result,
                Err(_) => Err(format!("no response within {:?}", settings.timeout)),
            };
        target.health.record_check(settings, &target.label, result);
    }
}

/// Sends one health check on a new connection.
async fn check(
    upstream: &Upstream,
    target: &Target,
    settings: &ActiveSettings,
) -> Result<(), String> {
    let mut sender = upstream
        .connect(target)
        .await
        .map_err(|refusal| refusal.message())?;
    let host = target.addr.to_string();
    let request = Request::get(settings.path.as_str())
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "edge-health-check")
        .body(RequestBody::empty())
        .map_err(|error| error.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| format!("request failed: {error}"))?;
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("status {}", status.as_u16()))
    }
}
