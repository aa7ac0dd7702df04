//! One HTTP call to the flashsale API, made the way every scenario makes it: bounded by the driver's in-flight
//! semaphore, timed, recorded under (phase, endpoint), and, where asked, repeated after a 429/503 once its
//! `Retry-After` has passed (capped, jittered, a bounded number of times).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use reqwest::Method;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::metrics::{Phase, Recorder, STATUS_TRANSPORT_ERROR};

/// A request, kept as data so that a retry can build it again.
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    path: String,
    token: Option<String>,
    body: Option<Value>,
    idempotency_key: Option<String>,
}

impl Request {
    pub fn get(path: impl Into<String>) -> Self {
        Self::new(Method::GET, path, None)
    }

    pub fn post(path: impl Into<String>, body: Value) -> Self {
        Self::new(Method::POST, path, Some(body))
    }

    pub fn put(path: impl Into<String>, body: Value) -> Self {
        Self::new(Method::PUT, path, Some(body))
    }

    pub fn delete(path: impl Into<String>) -> Self {
        Self::new(Method::DELETE, path, None)
    }

    fn new(method: Method, path: impl Into<String>, body: Option<Value>) -> Self {
        Self {
            method,
            path: path.into(),
            token: None,
            body,
            idempotency_key: None,
        }
    }

    /// Sends `Authorization: Bearer <token>`.
    pub fn auth(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// Sends `Idempotency-Key`, so that a retry after 429/503 (or a lost answer) cannot take a second hold.
    pub fn idempotency_key(mut self, key: String) -> Self {
        self.idempotency_key = Some(key);
        self
    }
}

/// An answer: the status (0 when there was no HTTP answer), the JSON body (`Null` if none) and `Retry-After`.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<Duration>,
}

impl Reply {
    /// `error.code` of an error body.
    pub fn error_code(&self) -> Option<&str> {
        self.body.get("error")?.get("code")?.as_str()
    }

    /// A string field of the body.
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.body.get(key)?.as_str()
    }

    /// What to call this answer in outcome tallies: `201`, `409 sold_out`, `0` for no answer.
    pub fn label(&self) -> String {
        match self.error_code() {
            Some(code) => format!("{} {code}", self.status),
            None => self.status.to_string(),
        }
    }
}

/// How often a 429/503 is retried and how long a `Retry-After` is honoured at most.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub retries_max: u32,
    pub retry_after_cap: Duration,
}

impl RetryPolicy {
    /// No retries: the caller handles every answer.
    pub const NONE: Self = Self {
        retries_max: 0,
        retry_after_cap: Duration::ZERO,
    };
    /// For buyers: five more tries, waiting what the server asks but never more than two seconds.
    pub const OVERLOAD: Self = Self {
        retries_max: 5,
        retry_after_cap: Duration::from_secs(2),
    };
}

/// When the server says 429/503 without `Retry-After`.
const RETRY_AFTER_DEFAULT: Duration = Duration::from_secs(1);
/// Spread of retries, so refused clients do not come back in one herd.
const RETRY_JITTER_MS_MAX: u64 = 250;

/// The client side of the API. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    recorder: Arc<Recorder>,
    inflight: Semaphore,
}

impl Api {
    /// A client for `base_url` with at most `concurrency` requests in flight and a timeout per request.
    pub fn new(base_url: &str, concurrency: usize, timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            // The target is always local; a proxy from the environment must not get in the way.
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(concurrency)
            .connect_timeout(Duration::from_secs(5).min(timeout))
            .timeout(timeout)
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            recorder: Arc::new(Recorder::default()),
            inflight: Semaphore::new(concurrency),
        })
    }

    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// Sends once and records the outcome. Time spent waiting for an in-flight slot is not counted as latency:
    /// the numbers describe the server, not the driver's queue.
    pub async fn send(&self, phase: Phase, endpoint: &'static str, request: &Request) -> Reply {
        // The semaphore is never closed, so acquire cannot fail; without a permit the request would still be
        // correct, only unbounded.
        let _permit = self.inflight.acquire().await.ok();
        let started = Instant::now();
        let reply = self.send_unrecorded(request).await;
        self.recorder
            .record(phase, endpoint, reply.status, started.elapsed());
        reply
    }

    /// Sends, and repeats after 429/503 up to `policy.retries_max` times, waiting out `Retry-After` (capped).
    pub async fn send_retrying(
        &self,
        phase: Phase,
        endpoint: &'static str,
        request: &Request,
        policy: RetryPolicy,
    ) -> Reply {
        let mut reply = self.send(phase, endpoint, request).await;
        for _ in 0..policy.retries_max {
            if !matches!(reply.status, 429 | 503) {
                break;
            }
            let wait = reply
                .retry_after
                .unwrap_or(RETRY_AFTER_DEFAULT)
                .min(policy.retry_after_cap);
            tokio::time::sleep(wait + jitter(RETRY_JITTER_MS_MAX)).await;
            self.recorder.retried(phase, endpoint);
            reply = self.send(phase, endpoint, request).await;
        }
        reply
    }

    async fn send_unrecorded(&self, request: &Request) -> Reply {
        let url = format!("{}{}", self.base, request.path);
        let mut builder = self.http.request(request.method.clone(), url);
        if let Some(token) = &request.token {
            builder = builder.bearer_auth(token);
        }
        if let Some(key) = &request.idempotency_key {
            builder = builder.header("Idempotency-Key", key);
        }
        if let Some(body) = &request.body {
            builder = builder.json(body);
        }
        let no_answer = Reply {
            status: STATUS_TRANSPORT_ERROR,
            body: Value::Null,
            retry_after: None,
        };
        let Ok(response) = builder.send().await else {
            return no_answer;
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let Ok(bytes) = response.bytes().await else {
            return no_answer;
        };
        Reply {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            retry_after,
        }
    }
}

/// A uniformly random delay in `0..=max_ms` milliseconds. Kept out of async code: the thread-local RNG is not
/// `Send` and must not live across an `.await`.
pub fn jitter(max_ms: u64) -> Duration {
    Duration::from_millis(rand::thread_rng().gen_range(0..=max_ms))
}
