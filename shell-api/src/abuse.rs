//! Abuse limits on signing in. A login storm at a drop's opening (thousands of buyers signing in at once) must not
//! take the cores from the reservation path, and guessing passwords must not be free.
//!
//! - **Hashing is bounded** (`hashing`): every argon2 hash or verification takes one of `PASSWORD_HASH_CONCURRENCY`
//!   permits (default: half the cores, at least one) before it goes to the blocking pool, so at most that many
//!   cores ever hash. Waiters queue up to `PASSWORD_HASH_QUEUE_MAX`; past that, or after waiting
//!   `PASSWORD_HASH_WAIT_MS`, the request is answered 429 `overloaded` with `Retry-After` without hashing.
//! - **Failed logins are limited** (`LoginLimiter`) per account (`LOGIN_FAILURES_PER_ACCOUNT`) and per client
//!   address (`LOGIN_FAILURES_PER_ADDRESS`) in a fixed window (`LOGIN_FAILURE_WINDOW_SECONDS`): past either, logins
//!   are answered 429 `too_many_attempts` with `Retry-After` (the rest of the window) before any hashing, even with
//!   the right password. A successful login clears its account's count. The counts live in this instance's
//!   memory (bounded: `LIMITER_ENTRIES_MAX` keys, expired ones swept when full), so behind a load balancer each
//!   instance counts the attempts it sees.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use dashmap::DashMap;
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// Keys each limiter map keeps at most.
pub const LIMITER_ENTRIES_MAX: usize = 100_000;

/// Bounds on password hashing, process-wide (every hash in the process goes through `hashing()`).
#[derive(Debug)]
pub struct Hashing {
    permits: Semaphore,
    concurrency: usize,
    queue_max: usize,
    wait_max: Duration,
    waiting: AtomicUsize,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
}

#[derive(Debug, Clone, Copy)]
pub struct HashingConfig {
    pub concurrency: usize,
    pub queue_max: usize,
    pub wait_max: Duration,
}

impl Default for HashingConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self {
            concurrency: (cores / 2).max(1),
            queue_max: 1024,
            wait_max: Duration::from_secs(10),
        }
    }
}

static HASHING: OnceLock<Hashing> = OnceLock::new();

/// Sets the bounds; only the first call (before any hashing) counts. `serve` calls it at start.
pub fn configure_hashing(config: HashingConfig) {
    let _ = HASHING.set(Hashing::new(config));
}

/// The process's hashing bounds (the defaults unless `configure_hashing` ran first).
pub fn hashing() -> &'static Hashing {
    HASHING.get_or_init(|| Hashing::new(HashingConfig::default()))
}

impl Hashing {
    fn new(config: HashingConfig) -> Self {
        let concurrency = config.concurrency.max(1);
        Self {
            permits: Semaphore::new(concurrency),
            concurrency,
            queue_max: config.queue_max,
            wait_max: config.wait_max,
            waiting: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    /// Runs `work` (an argon2 hash or verification) on the blocking pool once a permit is free.
    pub async fn run<T, F>(&self, work: F) -> Result<T, ApiError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue_max {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(busy());
        }
        let permit = tokio::time::timeout(self.wait_max, self.permits.acquire()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        let _permit = match permit {
            Ok(Ok(permit)) => permit,
            // Timed out, or the semaphore closed (never: it lives for the process).
            _ => return Err(busy()),
        };
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak.fetch_max(now, Ordering::AcqRel);
        let result = tokio::task::spawn_blocking(work).await;
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        result.map_err(ApiError::internal)
    }

    /// Hashes running now, and the most that ever ran at once.
    pub fn in_flight(&self) -> (usize, usize) {
        (
            self.in_flight.load(Ordering::Acquire),
            self.peak.load(Ordering::Acquire),
        )
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Requests waiting for a hashing permit.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

fn busy() -> ApiError {
    ApiError::too_many_requests(1).with_message("too many sign-ins at once, retry shortly")
}

#[derive(Debug, Clone, Copy)]
pub struct LoginLimits {
    pub failures_per_account: u32,
    pub failures_per_address: u32,
    pub window: Duration,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            failures_per_account: 5,
            failures_per_address: 50,
            window: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

/// Failed logins per account and per client address, in fixed windows.
#[derive(Debug)]
pub struct LoginLimiter {
    limits: LoginLimits,
    accounts: DashMap<String, Window>,
    addresses: DashMap<IpAddr, Window>,
}

impl LoginLimiter {
    pub fn new(limits: LoginLimits) -> Self {
        Self {
            limits,
            accounts: DashMap::new(),
            addresses: DashMap::new(),
        }
    }

    /// 429 `too_many_attempts` while the account or the address is past its failures in the current window.
    pub fn check(&self, email: &str, address: Option<IpAddr>) -> Result<(), ApiError> {
        let now = Instant::now();
        let account = locked(
            self.accounts.get(email).map(|w| *w),
            self.limits.failures_per_account,
            self.limits.window,
            now,
        );
        let address = address.and_then(|ip| {
            locked(
                self.addresses.get(&ip).map(|w| *w),
                self.limits.failures_per_address,
                self.limits.window,
                now,
            )
        });
        match account.max(address) {
            None => Ok(()),
            Some(wait) => Err(too_many_attempts(wait)),
        }
    }

    /// Counts a failed login against the account and the address.
    pub fn failed(&self, email: &str, address: Option<IpAddr>) {
        let now = Instant::now();
        count(&self.accounts, email.to_owned(), self.limits.window, now);
        if let Some(ip) = address {
            count(&self.addresses, ip, self.limits.window, now);
        }
    }

    /// A successful login clears its account's failures (the address keeps its count).
    pub fn succeeded(&self, email: &str) {
        self.accounts.remove(email);
    }
}

/// How long until the window ends, when it is past `max` failures.
fn locked(window: Option<Window>, max: u32, length: Duration, now: Instant) -> Option<Duration> {
    let window = window?;
    let ends = window.started + length;
    (window.failures >= max && ends > now).then(|| ends - now)
}

fn count<K: std::hash::Hash + Eq + Clone>(
    map: &DashMap<K, Window>,
    key: K,
    length: Duration,
    now: Instant,
) {
    if map.len() >= LIMITER_ENTRIES_MAX && !map.contains_key(&key) {
        map.retain(|_, w| w.started + length > now);
        if map.len() >= LIMITER_ENTRIES_MAX {
            // Every key is live: forget the whole map rather than grow (a flood of addresses would fill it).
            map.clear();
        }
    }
    let mut entry = map.entry(key).or_insert(Window {
        started: now,
        failures: 0,
    });
    if entry.started + length <= now {
        *entry = Window {
            started: now,
            failures: 0,
        };
    }
    entry.failures = entry.failures.saturating_add(1);
}

fn too_many_attempts(wait: Duration) -> ApiError {
    let seconds = u32::try_from(wait.as_secs().saturating_add(1)).unwrap_or(u32::MAX);
    let mut err = ApiError::too_many_requests(seconds).with_message(
        "too many failed sign-ins for this account or address; retry after the time in Retry-After",
    );
    err.set_code("too_many_attempts");
    err
}

/// The client's address, when the server was started with connection info (in-process tests have none).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<std::net::SocketAddr>>()
                .map(|info| info.0.ip()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_is_locked_past_its_failures_until_the_window_ends() {
        let limiter = LoginLimiter::new(LoginLimits {
            failures_per_account: 3,
            failures_per_address: 100,
            window: Duration::from_secs(60),
        });
        for _ in 0..3 {
            assert!(limiter.check("a@x", None).is_ok());
            limiter.failed("a@x", None);
        }
        let err = limiter.check("a@x", None).unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(err.code(), "too_many_attempts");
        // Another account is not affected; a success clears the count.
        assert!(limiter.check("b@x", None).is_ok());
        limiter.succeeded("a@x");
        assert!(limiter.check("a@x", None).is_ok());
    }

    #[test]
    fn an_address_is_locked_across_accounts() {
        let limiter = LoginLimiter::new(LoginLimits {
            failures_per_account: 100,
            failures_per_address: 4,
            window: Duration::from_secs(60),
        });
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        for i in 0..4 {
            limiter.failed(&format!("m{i}@x"), Some(ip));
        }
        assert!(limiter.check("new@x", Some(ip)).is_err());
        assert!(limiter.check("new@x", None).is_ok());
        assert!(limiter
            .check("new@x", Some("10.0.0.8".parse().unwrap()))
            .is_ok());
    }

    #[test]
    fn a_window_that_ended_starts_over() {
        let now = Instant::now();
        let old = Window {
            started: now - Duration::from_secs(61),
            failures: 10,
        };
        assert_eq!(locked(Some(old), 3, Duration::from_secs(60), now), None);
        let fresh = Window {
            started: now - Duration::from_secs(10),
            failures: 3,
        };
        let wait = locked(Some(fresh), 3, Duration::from_secs(60), now).unwrap();
        assert!(wait <= Duration::from_secs(50) && wait > Duration::from_secs(49));
    }
}
