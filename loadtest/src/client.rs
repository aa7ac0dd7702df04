//! One call to the flashsale API, made through a goose user the way every scenario makes it: named for goose's
//! metrics by its route (goose shows `POST /drops/{id}/reservations`), judged by the caller (an answer the scenario expects,
//! such as `409 sold_out`, is a success in goose's tables; anything else is a failure with its status and code),
//! and, where asked, repeated after a 429/503 once its `Retry-After` has passed (capped, jittered, a bounded number
//! of times).
//!
//! The API may be served by several instances (one Postgres, one Redis): a call names the instance it goes to
//! (`Call::on`), the reply says which one answered, and a retry of an idempotent call goes to the next one.
//! Outside a goose run (setup in `test_start`, reads after the run) the same calls go through a goose user that
//! records nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use goose::prelude::{GooseMethod, GooseRequest, GooseUser};
use rand::Rng;
use serde_json::Value;

/// The status recorded for a call that got no HTTP answer (connect error, timeout, broken body).
pub const STATUS_NO_ANSWER: u16 = 0;

/// The instances that serve the API, and how many calls went to each.
#[derive(Debug)]
pub struct Targets {
    /// One base URL per instance, without a trailing `/`; never empty.
    bases: Vec<String>,
    sent: Vec<AtomicU64>,
}

impl Targets {
    /// The instances at `bases` (at least one).
    pub fn new(bases: Vec<String>) -> anyhow::Result<Self> {
        anyhow::ensure!(!bases.is_empty(), "no base URL");
        let sent = bases.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(Self { bases, sent })
    }

    /// How many instances serve the API (at least one).
    pub fn count(&self) -> usize {
        self.bases.len()
    }

    pub fn base(&self, instance: usize) -> &str {
        &self.bases[instance % self.bases.len()]
    }

    pub fn bases(&self) -> &[String] {
        &self.bases
    }

    /// The index of the instance `offset` places after `instance`, wrapping around: with one instance, always 0.
    pub fn next(&self, instance: usize, offset: usize) -> usize {
        (instance % self.bases.len() + offset) % self.bases.len()
    }

    /// Calls sent to each instance so far, in `bases` order.
    pub fn sent(&self) -> Vec<u64> {
        self.sent
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }
}

/// A call, kept as data so that a retry can build it again.
#[derive(Debug, Clone)]
pub struct Call {
    method: GooseMethod,
    path: String,
    /// The route, as goose's tables name it.
    name: &'static str,
    token: Option<String>,
    body: Option<Value>,
    idempotency_key: Option<String>,
    /// Other request headers (a queue drop's `Admission-Pass`).
    headers: Vec<(&'static str, String)>,
    /// Index of the instance to send to (taken modulo the number of instances).
    instance: usize,
}

impl Call {
    pub fn get(name: &'static str, path: impl Into<String>) -> Self {
        Self::new(GooseMethod::Get, name, path, None)
    }

    pub fn post(name: &'static str, path: impl Into<String>, body: Value) -> Self {
        Self::new(GooseMethod::Post, name, path, Some(body))
    }

    pub fn put(name: &'static str, path: impl Into<String>, body: Option<Value>) -> Self {
        Self::new(GooseMethod::Put, name, path, body)
    }

    pub fn delete(name: &'static str, path: impl Into<String>) -> Self {
        Self::new(GooseMethod::Delete, name, path, None)
    }

    pub fn patch(name: &'static str, path: impl Into<String>, body: Value) -> Self {
        Self::new(GooseMethod::Patch, name, path, Some(body))
    }

    fn new(
        method: GooseMethod,
        name: &'static str,
        path: impl Into<String>,
        body: Option<Value>,
    ) -> Self {
        Self {
            method,
            path: path.into(),
            name,
            token: None,
            body,
            idempotency_key: None,
            headers: Vec::new(),
            instance: 0,
        }
    }

    /// Sends to the `instance`-th base URL (modulo their number; 0, the first, unless told).
    pub fn on(mut self, instance: usize) -> Self {
        self.instance = instance;
        self
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

    /// Sends the header `name: value` too.
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The route, as goose's tables name it.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Safe to send again to any instance: it carries an `Idempotency-Key`, or its method is idempotent.
    fn idempotent(&self) -> bool {
        self.idempotency_key.is_some()
            || matches!(
                self.method,
                GooseMethod::Get | GooseMethod::Put | GooseMethod::Delete
            )
    }
}

/// An answer: the status (0 when there was no HTTP answer), the JSON body (`Null` if none), `Retry-After`, and
/// the index of the instance that answered (or was asked, when none did).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<Duration>,
    pub instance: usize,
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

    /// What to call this answer in tallies: `201`, `409 sold_out`, `0` for no answer.
    pub fn label(&self) -> String {
        match self.error_code() {
            Some(code) => format!("{} {code}", self.status),
            None => self.status.to_string(),
        }
    }

    /// Back-pressure the API promises under overload: 429, or 503 with `Retry-After`. The caller waits and
    /// retries; it is not a failure of the server.
    pub fn is_back_pressure(&self) -> bool {
        self.status == 429 || (self.status == 503 && self.retry_after.is_some())
    }

    /// A server error, or no answer at all: never expected.
    pub fn is_server_failure(&self) -> bool {
        self.status == STATUS_NO_ANSWER || (self.status >= 500 && !self.is_back_pressure())
    }
}

/// Which answers a step expects: those count as successes in goose's tables, whatever their status.
pub type Expect = fn(&Reply) -> bool;

/// Any 2xx.
pub fn success(reply: &Reply) -> bool {
    (200..300).contains(&reply.status)
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

/// Sends once. The answer is a success in goose's metrics when `expect` says so or it is back-pressure (which the
/// caller retries), and a failure named by its status and code otherwise.
pub async fn send(user: &mut GooseUser, targets: &Targets, call: &Call, expect: Expect) -> Reply {
    let instance = call.instance % targets.count();
    targets.sent[instance].fetch_add(1, Ordering::Relaxed);
    let no_answer = Reply {
        status: STATUS_NO_ANSWER,
        body: Value::Null,
        retry_after: None,
        instance,
    };
    let url = format!("{}{}", targets.base(instance), call.path);
    let Ok(mut builder) = user.get_request_builder(&call.method, &url) else {
        return no_answer;
    };
    if let Some(token) = &call.token {
        builder = builder.bearer_auth(token);
    }
    if let Some(key) = &call.idempotency_key {
        builder = builder.header("Idempotency-Key", key);
    }
    for (name, value) in &call.headers {
        builder = builder.header(*name, value);
    }
    if let Some(body) = &call.body {
        builder = builder.json(body);
    }
    let request = GooseRequest::builder()
        .name(call.name)
        .set_request_builder(builder)
        .build();
    let Ok(mut goose) = user.request(request).await else {
        return no_answer;
    };
    let reply = match goose.response {
        Ok(response) => {
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            match response.bytes().await {
                Ok(bytes) => Reply {
                    status,
                    body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                    retry_after,
                    instance,
                },
                Err(_) => no_answer,
            }
        }
        Err(_) => no_answer,
    };
    let ok = expect(&reply) || reply.is_back_pressure();
    // Both only send a correction to goose's metrics (and fail when the run is over, which changes nothing here);
    // `set_failure` always answers Err by design, to end a transaction that wants to end.
    if ok && !goose.request.success {
        // Goose has already counted the non-2xx in its Errors table; without this the corrected copy would be
        // counted there a second time. Its `# fails` and error-rate thresholds follow the correction.
        goose.request.error.clear();
        let _ = user.set_success(&mut goose.request);
    } else if !ok && goose.request.success {
        let _ = user.set_failure(&reply.label(), &mut goose.request, None, None);
    }
    reply
}

/// Sends, and repeats after 429/503 up to `policy.retries_max` times, waiting out `Retry-After` (capped). An
/// idempotent call (an `Idempotency-Key`, or GET/PUT/DELETE) is repeated on the next instance each time, so
/// that with several instances no retry goes where the previous try went; others stay on their instance.
pub async fn send_retrying(
    user: &mut GooseUser,
    targets: &Targets,
    call: &Call,
    policy: RetryPolicy,
    expect: Expect,
) -> Reply {
    let mut reply = send(user, targets, call, expect).await;
    let mut retry = call.clone();
    for _ in 0..policy.retries_max {
        if !matches!(reply.status, 429 | 503) {
            break;
        }
        let wait = reply
            .retry_after
            .unwrap_or(RETRY_AFTER_DEFAULT)
            .min(policy.retry_after_cap);
        tokio::time::sleep(wait + jitter(RETRY_JITTER_MS_MAX)).await;
        if retry.idempotent() {
            retry.instance = targets.next(retry.instance, 1);
        }
        reply = send(user, targets, &retry, expect).await;
    }
    reply
}

/// A uniformly random delay in `0..=max_ms` milliseconds. Kept out of async code: the thread-local RNG is not
/// `Send` and must not live across an `.await`.
pub fn jitter(max_ms: u64) -> Duration {
    Duration::from_millis(rand::thread_rng().gen_range(0..=max_ms))
}

/// A goose user that records nothing, for setup and for reads outside a run.
pub fn plain_user(base: &str, timeout: Duration) -> anyhow::Result<GooseUser> {
    let mut config = goose::config::GooseConfiguration::default();
    config.timeout = Some(format!("{:.3}", timeout.as_secs_f64()));
    let url = url::Url::parse(base)?;
    GooseUser::single(url, &config).map_err(|e| anyhow::anyhow!("building an HTTP client: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-trick HTTP server: answers every request with `status` (and `Retry-After: 0`), counting requests.
    async fn fixed_server(status: u16) -> (String, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&hits);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    // Requests one after another on the connection: read a head and its body, answer, repeat.
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let head_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            let n = socket.read(&mut chunk).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < head_end + length {
                            let n = socket.read(&mut chunk).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        buf.drain(..head_end + length);
                        counter.fetch_add(1, Ordering::Relaxed);
                        let answer = format!(
                            "HTTP/1.1 {status} X\r\nretry-after: 0\r\ncontent-type: application/json\r\n\
                             content-length: 2\r\n\r\n{{}}"
                        );
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, hits)
    }

    const ONE_RETRY: RetryPolicy = RetryPolicy {
        retries_max: 1,
        retry_after_cap: Duration::ZERO,
    };

    #[tokio::test]
    async fn idempotent_retries_move_to_the_next_instance() {
        let (busy, busy_hits) = fixed_server(503).await;
        let (ok, ok_hits) = fixed_server(201).await;
        let targets = Targets::new(vec![busy.clone(), ok]).unwrap();
        let mut user = plain_user(&busy, Duration::from_secs(5)).unwrap();
        assert_eq!(targets.count(), 2);
        assert_eq!(targets.next(1, 1), 0);
        assert_eq!(targets.next(3, 0), 1);

        let keyed = Call::post("/r", "/r", json!({ "quantity": 1 }))
            .idempotency_key("k".to_owned())
            .on(0);
        let reply = send_retrying(&mut user, &targets, &keyed, ONE_RETRY, success).await;
        assert_eq!((reply.status, reply.instance), (201, 1));
        assert_eq!(busy_hits.load(Ordering::Relaxed), 1);
        assert_eq!(ok_hits.load(Ordering::Relaxed), 1);

        // Without a key a POST is retried where it went.
        let plain = Call::post("/m", "/m", json!({})).on(0);
        let reply = send_retrying(&mut user, &targets, &plain, ONE_RETRY, success).await;
        assert_eq!((reply.status, reply.instance), (503, 0));
        assert!(reply.is_back_pressure() && !reply.is_server_failure());
        assert_eq!(busy_hits.load(Ordering::Relaxed), 3);
        assert_eq!(ok_hits.load(Ordering::Relaxed), 1);
        assert_eq!(targets.sent(), [3, 1]);
    }

    #[tokio::test]
    async fn with_one_instance_every_call_goes_there() {
        let (busy, hits) = fixed_server(503).await;
        let targets = Targets::new(vec![busy.clone()]).unwrap();
        let mut user = plain_user(&busy, Duration::from_secs(5)).unwrap();
        let cancel = Call::delete("/r/{id}", "/r/1").on(5);
        let reply = send_retrying(&mut user, &targets, &cancel, ONE_RETRY, success).await;
        assert_eq!((reply.status, reply.instance), (503, 0));
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn no_answer_is_a_server_failure() {
        // A port nothing listens on: bind, read the port, close.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let targets = Targets::new(vec![dead.clone()]).unwrap();
        let mut user = plain_user(&dead, Duration::from_secs(5)).unwrap();
        let reply = send(&mut user, &targets, &Call::get("/", "/"), success).await;
        assert_eq!(reply.status, STATUS_NO_ANSWER);
        assert!(reply.is_server_failure());
    }
}
