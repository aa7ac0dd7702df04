//! Live, in-process over a real Postgres (and Redis for the two-instance test): hearts and their exact count, the
//! drop event stream seeing every change of counts in order with conservation in every event (embedded gate, and
//! two instances on one Redis streaming the same counts), the caps on open streams, the live page, and
//! notifications (one drop_scheduled, one drop_open, one restock per burst; over the list and the stream).
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the fault or load, and every check"
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{cancel, drop_state, eventually, pay, reserve, TestApp, TestMember};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use shell_api::auth::Role;
use shell_api::config::EngineArgs;
use shell_api::live::LiveConfig;
use shell_api::App;
use shell_api::{AppState, Settings};
use tower::ServiceExt;
use uuid::Uuid;

// ---- a small SSE reader over an in-process response body

#[derive(Debug, Clone, Default)]
struct SseEvent {
    event: String,
    id: String,
    data: String,
}

struct SseStream {
    body: Body,
    buf: String,
}

impl SseStream {
    /// Opens `path` on `router`; returns the status and, for a 200, the stream.
    async fn open(
        router: &App,
        path: &str,
        token: Option<&str>,
    ) -> (StatusCode, Value, Option<Self>) {
        let mut request = Request::builder().uri(path);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = router
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        if status != StatusCode::OK {
            let retry = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let mut body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if let Some(retry) = retry {
                body["retry_after"] = json!(retry);
            }
            return (status, body, None);
        }
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        let stream = Self {
            body: response.into_body(),
            buf: String::new(),
        };
        (status, Value::Null, Some(stream))
    }

    /// The next event (comments skipped), or `None` when none came within `limit` or the stream ended.
    async fn next(&mut self, limit: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut event = SseEvent::default();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        event.event = value.trim().to_owned();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        event.data.push_str(value.trim_start());
                    } else if let Some(value) = line.strip_prefix("id:") {
                        event.id = value.trim().to_owned();
                    }
                }
                if event.event.is_empty() && event.data.is_empty() {
                    continue;
                }
                return Some(event);
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .ok()??
                .ok()?;
            if let Ok(data) = frame.into_data() {
                self.buf.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    }

    /// The next `event: drop`, parsed, with conservation checked.
    async fn next_drop(&mut self, limit: Duration) -> Option<Value> {
        let event = self.next(limit).await?;
        assert_eq!(event.event, "drop", "{event:?}");
        let body: Value = serde_json::from_str(&event.data).unwrap();
        let n = |k: &str| body[k].as_u64().unwrap();
        assert_eq!(
            n("available") + n("held") + n("sold"),
            n("stock"),
            "conservation in every event: {body}"
        );
        Some(body)
    }
}

fn counts(drop: &Value) -> (u64, u64, u64) {
    let n = |k: &str| drop[k].as_u64().unwrap();
    (n("available"), n("held"), n("sold"))
}

/// Reads drop events until one shows `want`; every event before it must show `previous` (a heartbeat or a repeat),
/// so no change is skipped and none comes out of order.
async fn expect_change(
    stream: &mut SseStream,
    previous: (u64, u64, u64),
    want: (u64, u64, u64),
    what: &str,
) {
    loop {
        let event = stream
            .next_drop(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("no event showing {want:?} after {what}"));
        let got = counts(&event);
        if got == want {
            return;
        }
        assert_eq!(
            got, previous,
            "after {what}: expected {want:?}, saw {got:?} first"
        );
    }
}

fn fast_reaper() -> EngineArgs {
    EngineArgs {
        reaper_interval_ms: 100,
        ..EngineArgs::default()
    }
}

fn drop_path(drop: &Value) -> String {
    drop["id"].as_str().unwrap().to_owned()
}

fn held_id(response: &common::TestResponse) -> String {
    assert_eq!(response.status, StatusCode::CREATED, "{:?}", response.body);
    response.body["id"].as_str().unwrap().to_owned()
}

// ---- hearts

async fn heart(app: &TestApp, member: &TestMember, product: Uuid, on: bool) -> StatusCode {
    let method = if on { "PUT" } else { "DELETE" };
    app.call(
        method,
        &format!("/api/v1/products/{product}/heart"),
        Some(&member.token),
        None,
    )
    .await
    .status
}

async fn heart_count(app: &TestApp, product: Uuid) -> i64 {
    let body = app
        .call("GET", &format!("/api/v1/products/{product}"), None, None)
        .await
        .body;
    body["heart_count"].as_i64().unwrap()
}

async fn heart_rows(app: &TestApp, product: Uuid) -> i64 {
    app.db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM product_hearts WHERE product_id = $1",
            &[&product],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn hearts_are_idempotent_listed_and_counted() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let (a, b) = (
        app.product(&seller, 100).await,
        app.product(&seller, 200).await,
    );
    let member = app.member(Role::Customer).await;
    assert_eq!(heart_count(&app, a).await, 0);

    for _ in 0..3 {
        assert_eq!(heart(&app, &member, a, true).await, StatusCode::NO_CONTENT);
    }
    assert_eq!(heart_count(&app, a).await, 1, "a repeated PUT counts once");
    assert_eq!(heart(&app, &member, b, true).await, StatusCode::NO_CONTENT);
    let other = app.member(Role::Customer).await;
    assert_eq!(heart(&app, &other, a, true).await, StatusCode::NO_CONTENT);
    assert_eq!(heart_count(&app, a).await, 2);

    // Most recently hearted first, paged.
    let page = app
        .call(
            "GET",
            "/api/v1/members/me/hearts?limit=1",
            Some(&member.token),
            None,
        )
        .await;
    assert_eq!(page.status, StatusCode::OK, "{:?}", page.body);
    assert_eq!(page.body["items"][0]["id"], b.to_string());
    assert!(page.body["items"][0]["heart_count"].is_number());
    let cursor = page.body["next_cursor"].as_str().unwrap();
    let rest = app
        .call(
            "GET",
            &format!("/api/v1/members/me/hearts?limit=1&cursor={cursor}"),
            Some(&member.token),
            None,
        )
        .await;
    assert_eq!(rest.body["items"][0]["id"], a.to_string());
    assert!(rest.body["next_cursor"].is_null());

    for _ in 0..2 {
        assert_eq!(heart(&app, &member, a, false).await, StatusCode::NO_CONTENT);
    }
    assert_eq!(
        heart_count(&app, a).await,
        1,
        "a repeated DELETE uncounts once"
    );
    // Product lists and bulk bodies carry the count too.
    let list = app.call("GET", "/api/v1/products", None, None).await;
    assert!(list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["heart_count"].is_number()));

    // Unknown product: 404; no token: 401.
    assert_eq!(
        heart(&app, &member, Uuid::now_v7(), true).await,
        StatusCode::NOT_FOUND
    );
    let anonymous = app
        .call("PUT", &format!("/api/v1/products/{a}/heart"), None, None)
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_hearts_and_unhearts_leave_the_count_exact() {
    let app = Arc::new(TestApp::new().await);
    let seller = app.member(Role::Seller).await;
    let product = app.product(&seller, 100).await;
    let mut members = Vec::new();
    for _ in 0..16 {
        members.push(app.member(Role::Customer).await);
    }
    // Each member flips its heart several times, ending hearted when its index is even.
    let mut tasks = Vec::new();
    for (n, member) in members.iter().enumerate() {
        let (app, member) = (Arc::clone(&app), member.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..6 {
                let on = if round == 5 {
                    n % 2 == 0
                } else {
                    round % 2 == 0
                };
                assert_eq!(
                    heart(&app, &member, product, on).await,
                    StatusCode::NO_CONTENT
                );
                // Twice in a row sometimes: a repeat must not move the count.
                if round == 2 {
                    assert_eq!(
                        heart(&app, &member, product, on).await,
                        StatusCode::NO_CONTENT
                    );
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let rows = heart_rows(&app, product).await;
    assert_eq!(rows, 8, "the even members hold a heart");
    assert_eq!(
        heart_count(&app, product).await,
        rows,
        "heart_count equals the rows"
    );
}

// ---- drop event stream

#[tokio::test]
async fn the_drop_stream_sees_every_change_in_order_with_conservation() {
    let app = TestApp::with_engine_args(fast_reaper()).await;
    let (_, sale) = app
        .open_drop(5, 1000, json!({ "per_member_limit": 2, "hold_seconds": 2 }))
        .await;
    let path = format!("/api/v1/drops/{}/events", drop_path(&sale));
    let (status, _, stream) = SseStream::open(&app.router, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    let mut stream = stream.unwrap();
    // At once on connect: the same body as GET /drops/{id}.
    let first = stream.next_drop(Duration::from_secs(2)).await.unwrap();
    assert_eq!(first, drop_state(&app, &sale).await);
    assert_eq!(counts(&first), (5, 0, 0));

    let (a, b, c, d) = (
        app.member(Role::Customer).await,
        app.member(Role::Customer).await,
        app.member(Role::Customer).await,
        app.member(Role::Customer).await,
    );
    let hold = held_id(&reserve(&app, &a, &sale, 2).await);
    expect_change(&mut stream, (5, 0, 0), (3, 2, 0), "a reserve").await;
    assert_eq!(pay(&app, &a, &hold, "tok_ok").await.status, StatusCode::OK);
    expect_change(&mut stream, (3, 2, 0), (3, 0, 2), "a payment").await;
    let hold = held_id(&reserve(&app, &b, &sale, 1).await);
    expect_change(&mut stream, (3, 0, 2), (2, 1, 2), "a reserve").await;
    assert_eq!(cancel(&app, &b, &hold).await.status, StatusCode::NO_CONTENT);
    expect_change(&mut stream, (2, 1, 2), (3, 0, 2), "a cancel").await;
    let hold = held_id(&reserve(&app, &c, &sale, 1).await);
    expect_change(&mut stream, (3, 0, 2), (2, 1, 2), "a reserve").await;
    assert_eq!(
        pay(&app, &c, &hold, "tok_declined").await.status,
        StatusCode::PAYMENT_REQUIRED
    );
    expect_change(&mut stream, (2, 1, 2), (3, 0, 2), "a declined payment").await;
    // A hold left alone expires (hold_seconds 2, reaper every 100 ms).
    held_id(&reserve(&app, &d, &sale, 2).await);
    expect_change(&mut stream, (3, 0, 2), (1, 2, 2), "a reserve").await;
    expect_change(&mut stream, (1, 2, 2), (3, 0, 2), "an expiry").await;
    // Sold out, with the status in the body.
    let hold = held_id(&reserve(&app, &b, &sale, 2).await);
    expect_change(&mut stream, (3, 0, 2), (1, 2, 2), "a reserve").await;
    assert_eq!(pay(&app, &b, &hold, "tok_ok").await.status, StatusCode::OK);
    expect_change(&mut stream, (1, 2, 2), (1, 0, 4), "a payment").await;
    let hold = held_id(&reserve(&app, &c, &sale, 1).await);
    expect_change(&mut stream, (1, 0, 4), (0, 1, 4), "the last reserve").await;
    assert_eq!(pay(&app, &c, &hold, "tok_ok").await.status, StatusCode::OK);
    let mut last;
    loop {
        last = stream.next_drop(Duration::from_secs(10)).await.unwrap();
        if counts(&last) == (0, 0, 5) {
            break;
        }
        assert_eq!(counts(&last), (0, 1, 4));
    }
    assert_eq!(last["status"], "sold_out");

    // Nothing changes now: the next event is the heartbeat, the same state, within 5 s.
    let started = std::time::Instant::now();
    let heartbeat = stream.next_drop(Duration::from_secs(7)).await.unwrap();
    assert_eq!(heartbeat, last);
    // 5 s, plus slack for a machine shared with other builds.
    assert!(
        started.elapsed() <= Duration::from_millis(6_000),
        "heartbeat within 5 s"
    );

    // One producer for every watcher; it ends with its last watcher.
    assert_eq!(app.state.live.drops.producers(), 1);
    let (_, _, second) = SseStream::open(&app.router, &path, None).await;
    let mut second = second.unwrap();
    assert_eq!(
        second.next_drop(Duration::from_secs(2)).await.unwrap(),
        last
    );
    assert_eq!(
        app.state.live.drops.producers(),
        1,
        "a second watcher shares it"
    );
    drop((stream, second));
    eventually("the producer stops", Duration::from_secs(3), || async {
        app.state.live.drops.producers() == 0
    })
    .await;
    assert_eq!(app.state.live.streams.open(), 0, "permits given back");

    // Unknown drop: 404 in the API's error format.
    let (status, body, _) = SseStream::open(
        &app.router,
        &format!("/api/v1/drops/{}/events", Uuid::now_v7()),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "drop_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_redis_stream_the_same_counts() {
    let a = TestApp::with_redis(fast_reaper()).await;
    let b = a.another_instance().await;
    let (_, drop) = a
        .open_drop(4, 1000, json!({ "per_member_limit": 2, "hold_seconds": 2 }))
        .await;
    let path = format!("/api/v1/drops/{}/events", drop_path(&drop));
    let mut on_a = SseStream::open(&a.router, &path, None).await.2.unwrap();
    let mut on_b = SseStream::open(&b.router, &path, None).await.2.unwrap();
    for stream in [&mut on_a, &mut on_b] {
        assert_eq!(
            counts(&stream.next_drop(Duration::from_secs(3)).await.unwrap()),
            (4, 0, 0)
        );
    }
    let (x, y) = (
        a.member(Role::Customer).await,
        a.member(Role::Customer).await,
    );
    // Each step on one instance; both streams must show it, in the same order.
    let hold = held_id(&reserve(&a, &x, &drop, 2).await);
    for stream in [&mut on_a, &mut on_b] {
        expect_change(stream, (4, 0, 0), (2, 2, 0), "reserve on A").await;
    }
    let mut previous = (2, 2, 0);
    assert_eq!(pay(&b, &x, &hold, "tok_ok").await.status, StatusCode::OK);
    for stream in [&mut on_a, &mut on_b] {
        expect_change(stream, previous, (2, 0, 2), "payment on B").await;
    }
    previous = (2, 0, 2);
    let hold = held_id(&reserve(&b, &y, &drop, 1).await);
    for stream in [&mut on_a, &mut on_b] {
        expect_change(stream, previous, (1, 1, 2), "reserve on B").await;
    }
    previous = (1, 1, 2);
    assert_eq!(cancel(&a, &y, &hold).await.status, StatusCode::NO_CONTENT);
    for stream in [&mut on_a, &mut on_b] {
        expect_change(stream, previous, (2, 0, 2), "cancel on A").await;
    }
    previous = (2, 0, 2);
    held_id(&reserve(&a, &y, &drop, 2).await);
    for stream in [&mut on_a, &mut on_b] {
        expect_change(stream, previous, (0, 2, 2), "reserve on A (sold out)").await;
    }
    previous = (0, 2, 2);
    for stream in [&mut on_a, &mut on_b] {
        expect_change(stream, previous, (2, 0, 2), "expiry by Redis's clock").await;
    }
}

// ---- caps, tokens in the query, the page

/// An app over `app`'s engine with its own live limits.
fn with_live(app: &TestApp, live: LiveConfig) -> App {
    let settings = Settings {
        live,
        ..Settings::for_tests()
    };
    let state = AppState::new(
        app.db.pool.clone(),
        settings,
        Arc::clone(&app.state.engine),
        None,
    );
    shell_api::app(state)
}

#[tokio::test]
async fn streams_are_capped_per_member_and_per_instance_with_429() {
    let app = TestApp::new().await;
    let (_, sale) = app.open_drop(3, 1000, json!({})).await;
    let router = with_live(
        &app,
        LiveConfig {
            streams_max: 3,
            streams_per_member_max: 2,
            ..LiveConfig::default()
        },
    );
    let member = app.member(Role::Customer).await;
    let events = format!("/api/v1/drops/{}/events", drop_path(&sale));
    let signed = format!("{events}?access_token={}", member.token);
    let first = SseStream::open(&router, &signed, None).await;
    assert_eq!(first.0, StatusCode::OK);
    // The notification stream counts against the same caps, and takes the token from the query too.
    let notices = format!(
        "/api/v1/members/me/notifications/stream?access_token={}",
        member.token
    );
    let second = SseStream::open(&router, &notices, None).await;
    assert_eq!(second.0, StatusCode::OK, "{:?}", second.1);
    let refused = SseStream::open(&router, &signed, None).await;
    assert_eq!(refused.0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.1["error"]["code"], "overloaded");
    assert_eq!(refused.1["retry_after"], "5");
    let anonymous = SseStream::open(&router, &events, None).await;
    assert_eq!(
        anonymous.0,
        StatusCode::OK,
        "another member's place is free"
    );
    let full = SseStream::open(&router, &events, None).await;
    assert_eq!(full.0, StatusCode::TOO_MANY_REQUESTS, "the instance cap");
    drop(first);
    let again = SseStream::open(&router, &signed, None).await;
    assert_eq!(
        again.0,
        StatusCode::OK,
        "a closed stream gives its place back"
    );

    // Tokens: a bad one is 401; the notification stream needs one.
    let bad = SseStream::open(&router, &format!("{events}?access_token=not.a.token"), None).await;
    assert_eq!(bad.0, StatusCode::UNAUTHORIZED);
    drop((second, anonymous, again));
    let anonymous_notices =
        SseStream::open(&router, "/api/v1/members/me/notifications/stream", None).await;
    assert_eq!(anonymous_notices.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn shutdown_ends_every_stream_and_producer() {
    let app = TestApp::new().await;
    let (_, sale) = app.open_drop(3, 1000, json!({})).await;
    let member = app.member(Role::Customer).await;
    let path = format!("/api/v1/drops/{}/events", drop_path(&sale));
    let mut events = SseStream::open(&app.router, &path, None).await.2.unwrap();
    let mut notices = SseStream::open(
        &app.router,
        "/api/v1/members/me/notifications/stream",
        Some(&member.token),
    )
    .await
    .2
    .unwrap();
    assert!(events.next_drop(Duration::from_secs(2)).await.is_some());
    app.state.live.shutdown();
    let started = std::time::Instant::now();
    assert!(events.next(Duration::from_secs(3)).await.is_none());
    assert!(notices.next(Duration::from_secs(3)).await.is_none());
    assert!(started.elapsed() < Duration::from_secs(2), "ended at once");
    eventually("no producer left", Duration::from_secs(2), || async {
        app.state.live.drops.producers() == 0
    })
    .await;
}

#[tokio::test]
async fn the_live_page_is_served_for_a_drop_and_404_otherwise() {
    let app = TestApp::new().await;
    let (_, drop) = app.open_drop(3, 1000, json!({})).await;
    for (path, status) in [
        (format!("/live/drops/{}", drop_path(&drop)), StatusCode::OK),
        (
            format!("/live/drops/{}", Uuid::now_v7()),
            StatusCode::NOT_FOUND,
        ),
        // A mangled link gets the HTML page too, not the API's JSON (found by scripts/fuzz.sh).
        ("/live/drops/null%2Cnull".to_owned(), StatusCode::NOT_FOUND),
        ("/live/assets/page.js".to_owned(), StatusCode::OK),
        ("/live/assets/page.css".to_owned(), StatusCode::OK),
        ("/live/assets/other.js".to_owned(), StatusCode::NOT_FOUND),
    ] {
        let response = app
            .router
            .clone()
            .oneshot(Request::builder().uri(&path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{path}");
        if path.starts_with("/live/drops/") {
            assert_eq!(
                response.headers()["content-type"],
                "text/html; charset=utf-8",
                "{path}"
            );
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let html = String::from_utf8(bytes.to_vec()).unwrap();
            assert!(html.contains("name=\"viewport\""), "{path}");
            if status == StatusCode::OK {
                assert!(
                    html.contains(drop["id"].as_str().unwrap()),
                    "state in the page"
                );
                assert!(!html.contains("__DROP_JSON__"));
            }
        }
    }
}

// ---- notifications

async fn notifications(app: &TestApp, member: &TestMember) -> Value {
    let response = app
        .call(
            "GET",
            "/api/v1/members/me/notifications?limit=100",
            Some(&member.token),
            None,
        )
        .await;
    assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    response.body
}

fn kinds(list: &Value) -> Vec<String> {
    // Oldest first, for reading.
    let mut kinds: Vec<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["kind"].as_str().unwrap().to_owned())
        .collect();
    kinds.reverse();
    kinds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hearts_are_told_once_of_a_drop_its_opening_and_each_restock_burst() {
    let app = TestApp::with_engine_args(fast_reaper()).await;
    let notifier = tokio::spawn(shell_api::live::notifications::notify_forever(
        app.state.clone(),
    ));
    let seller = app.member(Role::Seller).await;
    let product = app.product(&seller, 1000).await;
    let fan = app.member(Role::Customer).await;
    let stranger = app.member(Role::Customer).await;
    let buyer = app.member(Role::Customer).await;
    assert_eq!(
        heart(&app, &fan, product, true).await,
        StatusCode::NO_CONTENT
    );
    let (_, _, stream) = SseStream::open(
        &app.router,
        "/api/v1/members/me/notifications/stream",
        Some(&fan.token),
    )
    .await;
    let mut stream = stream.unwrap();

    let opens_at = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let sale = app
        .drop(
            &seller,
            json!({ "product_id": product, "stock": 2, "opens_at": opens_at.to_rfc3339(),
                    "per_member_limit": 2, "hold_seconds": 60 }),
        )
        .await;
    let drop_id = drop_path(&sale);
    eventually(
        "drop_scheduled and drop_open",
        Duration::from_secs(10),
        || async { kinds(&notifications(&app, &fan).await) == ["drop_scheduled", "drop_open"] },
    )
    .await;
    let list = notifications(&app, &fan).await;
    assert_eq!(list["unread"], 2);
    for item in list["items"].as_array().unwrap() {
        assert_eq!(item["drop_id"], drop_id);
        assert_eq!(item["product_id"], product.to_string());
        assert_eq!(item["read"], false);
        assert!(item.get("refund_id").is_none());
    }

    // Sold out, then units come back: one restock. Again within the burst window: no second one.
    let hold = held_id(&reserve(&app, &buyer, &sale, 2).await);
    tokio::time::sleep(Duration::from_millis(1500)).await; // the notifier sees it sold out
    assert_eq!(
        cancel(&app, &buyer, &hold).await.status,
        StatusCode::NO_CONTENT
    );
    eventually("a restock", Duration::from_secs(10), || async {
        kinds(&notifications(&app, &fan).await).len() == 3
    })
    .await;
    let hold = held_id(&reserve(&app, &buyer, &sale, 2).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        cancel(&app, &buyer, &hold).await.status,
        StatusCode::NO_CONTENT
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let list = notifications(&app, &fan).await;
    assert_eq!(kinds(&list), ["drop_scheduled", "drop_open", "restock"]);
    assert!(notifications(&app, &stranger).await["items"]
        .as_array()
        .unwrap()
        .is_empty());

    // The stream carried the same three, in order, and nothing else.
    let mut streamed = Vec::new();
    while let Some(event) = stream.next(Duration::from_secs(2)).await {
        assert_eq!(event.event, "notification");
        let body: Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(event.id, body["id"].as_str().unwrap());
        streamed.push(body);
    }
    let listed: Vec<Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .cloned()
        .collect();
    assert_eq!(streamed, listed);

    // Read marks: up to the drop_open.
    let up_to = listed[1]["id"].clone();
    let read = app
        .call(
            "POST",
            "/api/v1/members/me/notifications/read",
            Some(&fan.token),
            Some(json!({ "up_to": up_to })),
        )
        .await;
    assert_eq!(read.status, StatusCode::NO_CONTENT);
    let list = notifications(&app, &fan).await;
    assert_eq!(list["unread"], 1);
    assert_eq!(list["items"][0]["read"], false);
    assert_eq!(list["items"][1]["read"], true);
    let bad = app
        .call(
            "POST",
            "/api/v1/members/me/notifications/read",
            Some(&fan.token),
            Some(json!({ "up_to": 7 })),
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);

    // A second notifier (as another instance would run) announces nothing again.
    let second = tokio::spawn(shell_api::live::notifications::notify_forever(
        app.state.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(kinds(&notifications(&app, &fan).await).len(), 3);
    notifier.abort();
    second.abort();
}

#[tokio::test]
async fn refund_decided_is_written_once_per_refund() {
    let app = TestApp::new().await;
    let buyer = app.member(Role::Customer).await;
    let refund = Uuid::now_v7();
    let client = app.db.client().await;
    assert!(
        shell_api::live::notifications::refund_decided(&client, buyer.id, refund)
            .await
            .unwrap()
    );
    assert!(
        !shell_api::live::notifications::refund_decided(&client, buyer.id, refund)
            .await
            .unwrap()
    );
    let list = notifications(&app, &buyer).await;
    assert_eq!(kinds(&list), ["refund_decided"]);
    assert_eq!(list["items"][0]["refund_id"], refund.to_string());
    assert!(list["items"][0].get("drop_id").is_none());
}

#[tokio::test]
async fn notify_members_writes_each_kind_with_its_references_and_the_shape_check_refuses_a_bare_one(
) {
    use shell_api::notify::{notify_members, About, Kind};
    let app = TestApp::new().await;
    let buyer = app.member(Role::Customer).await;
    let (_seller, drop) = app.open_drop(5, 1000, json!({})).await;
    let drop_id: Uuid = drop["id"].as_str().unwrap().parse().unwrap();
    let (purchase, subscription) = (Uuid::now_v7(), Uuid::now_v7());
    let client = app.db.client().await;
    let on_drop = About {
        drop_id: Some(drop_id),
        ..About::default()
    };
    for (kind, about) in [
        (Kind::DrawWon, on_drop),
        (
            Kind::Shipped,
            About {
                purchase_id: Some(purchase),
                ..on_drop
            },
        ),
        (
            Kind::SubscriptionRenewed,
            About {
                subscription_id: Some(subscription),
                ..About::default()
            },
        ),
    ] {
        assert_eq!(
            notify_members(&client, kind, &[buyer.id], about)
                .await
                .unwrap(),
            1
        );
    }
    // A kind without the reference its shape needs is refused by Postgres, not stored half-made.
    assert!(notify_members(&client, Kind::Shipped, &[buyer.id], on_drop)
        .await
        .is_err());
    assert!(notify_members(
        &client,
        Kind::SubscriptionChanged,
        &[buyer.id],
        About::default()
    )
    .await
    .is_err());
    // Written in one millisecond, so found by kind rather than by place in the newest-first list.
    let list = notifications(&app, &buyer).await;
    let of = |kind: &str| {
        let found = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["kind"] == kind);
        let found: Vec<&Value> = found.collect();
        assert_eq!(found.len(), 1, "one {kind} in {list}");
        found[0].clone()
    };
    assert_eq!(list["items"].as_array().unwrap().len(), 3);
    assert_eq!(
        of("subscription_renewed")["subscription_id"],
        subscription.to_string()
    );
    assert_eq!(of("shipped")["purchase_id"], purchase.to_string());
    assert_eq!(of("shipped")["drop_id"], drop_id.to_string());
    assert_eq!(of("draw_won")["drop_id"], drop_id.to_string());
    assert!(of("draw_won").get("purchase_id").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_instances_drop_open_is_written_once_and_streamed_by_the_other_instance() {
    let a = TestApp::with_redis(fast_reaper()).await;
    let b = a.another_instance().await;
    // Both instances run the notifier, as two `flashsale serve` would.
    let notifiers = [
        tokio::spawn(shell_api::live::notifications::notify_forever(
            a.state.clone(),
        )),
        tokio::spawn(shell_api::live::notifications::notify_forever(
            b.state.clone(),
        )),
    ];
    let seller = a.member(Role::Seller).await;
    let product = a.product(&seller, 1000).await;
    let mut fans = Vec::new();
    for _ in 0..5 {
        let fan = a.member(Role::Customer).await;
        assert_eq!(heart(&a, &fan, product, true).await, StatusCode::NO_CONTENT);
        fans.push(fan);
    }
    // The first fan listens on B; the drop is created on A.
    let mut stream = SseStream::open(
        &b.router,
        "/api/v1/members/me/notifications/stream",
        Some(&fans[0].token),
    )
    .await
    .2
    .unwrap();
    let opens_at = chrono::Utc::now() + chrono::Duration::milliseconds(1000);
    a.drop(
        &seller,
        json!({ "product_id": product, "stock": 3, "opens_at": opens_at.to_rfc3339() }),
    )
    .await;
    for fan in &fans {
        eventually("both notifications", Duration::from_secs(10), || async {
            kinds(&notifications(&b, fan).await) == ["drop_scheduled", "drop_open"]
        })
        .await;
    }
    // Another few ticks of both notifiers change nothing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for fan in &fans {
        assert_eq!(
            kinds(&notifications(&a, fan).await),
            ["drop_scheduled", "drop_open"]
        );
    }
    let mut streamed = Vec::new();
    while let Some(event) = stream.next(Duration::from_secs(2)).await {
        let body: Value = serde_json::from_str(&event.data).unwrap();
        streamed.push(body["kind"].as_str().unwrap().to_owned());
    }
    assert_eq!(streamed, ["drop_scheduled", "drop_open"]);
    for notifier in notifiers {
        notifier.abort();
    }
}
