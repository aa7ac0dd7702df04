//! `GET /metrics` on the real binary: the exposition parses as Prometheus text, names the series the operations
//! contract lists, and its counters move with a small drop (reservations, a sold-out refusal, a payment, the
//! writer's batches). With `METRICS=false` the route says so and nothing is recorded. On the Redis gate, the
//! gauges the alerts in `deploy/prometheus/alerts.yml` read follow real faults: `flashsale_redis_up` falls to 0 when
//! the private Redis stops, and a drop's `flashsale_journal_lag_seconds` grows while Postgres is cut and returns to 0
//! once the journal has caught up.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the fault or load, and every check"
)]

mod common;

use std::collections::BTreeMap;

use std::time::Duration;

use common::{
    eventually, post_json, seed_member, seed_product, RedisServer, TcpProxy, TestDb, TestServer,
};
use serde_json::json;
use shell_api::auth::Role;

/// One sample: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses the text exposition strictly enough that a malformed line fails the test: `# HELP`/`# TYPE` lines with a
/// known type, and `name{label="value",...} number` samples.
fn parse(text: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
    let mut samples = Vec::new();
    let mut types = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("not a number: {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                let mut labels = BTreeMap::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                    labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (name, labels)
            }
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        samples.push((name.to_owned(), labels, value));
    }
    (samples, types)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .reduce(|a, b| a + b)
}

async fn scrape(
    http: &reqwest::Client,
    server: &TestServer,
) -> (Vec<Sample>, BTreeMap<String, String>) {
    let response = http.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    parse(&response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_name_the_series_and_move_with_a_drop() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db.url, &[]).await;
    let http = reqwest::Client::new();
    let seller = seed_member(&db, Role::Seller).await;
    let product = seed_product(&db, &seller, 1_000).await;
    let opens = (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    let (status, drop) = post_json(
        &http,
        server.url("/api/v1/drops"),
        &seller,
        json!({ "product_id": product, "stock": 2, "opens_at": opens }),
    )
    .await
    .unwrap();
    assert_eq!(status, 201, "{drop}");
    let drop = drop["id"].as_str().unwrap().to_owned();

    let (before, _) = scrape(&http, &server).await;
    let reserved_before = value(
        &before,
        "flashsale_reservations_total",
        &[("outcome", "reserved")],
    )
    .unwrap_or(0.0);

    // Two holds, then a refusal: sold out. One hold is paid.
    let mut holds = Vec::new();
    for _ in 0..3 {
        let buyer = seed_member(&db, Role::Customer).await;
        let (status, body) = post_json(
            &http,
            server.url(&format!("/api/v1/drops/{drop}/reservations")),
            &buyer,
            json!({}),
        )
        .await
        .unwrap();
        holds.push((buyer, status, body));
    }
    assert_eq!(holds[2].1, 409);
    let (buyer, _, hold) = &holds[0];
    let (status, paid) = post_json(
        &http,
        server.url(&format!(
            "/api/v1/reservations/{}/payment",
            hold["id"].as_str().unwrap()
        )),
        buyer,
        json!({ "payment_token": "tok_ok" }),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{paid}");

    let (samples, types) = scrape(&http, &server).await;
    for (name, kind) in [
        ("flashsale_http_requests_total", "counter"),
        ("flashsale_http_request_duration_seconds", "histogram"),
        ("flashsale_reservations_total", "counter"),
        ("flashsale_payments_total", "counter"),
        ("flashsale_holds_released_total", "counter"),
        ("flashsale_drop_loads_total", "counter"),
        ("flashsale_gate_call_seconds", "histogram"),
        ("flashsale_writer_queue_depth", "gauge"),
        ("flashsale_writer_batch_rows", "histogram"),
        ("flashsale_writer_flush_seconds", "histogram"),
        ("flashsale_in_flight", "gauge"),
        ("flashsale_in_flight_max", "gauge"),
        ("flashsale_db_pool_connections", "gauge"),
        ("flashsale_db_pool_max", "gauge"),
        ("flashsale_db_pool_waiting", "gauge"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    let reserved = value(
        &samples,
        "flashsale_reservations_total",
        &[("outcome", "reserved")],
    )
    .unwrap();
    assert_eq!(reserved - reserved_before, 2.0);
    assert_eq!(
        value(
            &samples,
            "flashsale_reservations_total",
            &[("outcome", "sold_out")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "flashsale_payments_total", &[("outcome", "paid")]),
        Some(1.0)
    );
    // Requests by route template (not by id), method and status.
    let route = "/api/v1/drops/{id}/reservations";
    assert_eq!(
        value(
            &samples,
            "flashsale_http_requests_total",
            &[("route", route), ("method", "POST"), ("status", "201")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &samples,
            "flashsale_http_request_duration_seconds_count",
            &[("route", route), ("status", "409")]
        ),
        Some(1.0)
    );
    // Three reservations decided by the gate, and the writer committed the purchase in a batch.
    assert!(
        value(
            &samples,
            "flashsale_gate_call_seconds_count",
            &[("call", "reserve")]
        )
        .unwrap()
            >= 3.0
    );
    assert!(value(&samples, "flashsale_writer_batch_rows_count", &[]).unwrap() >= 1.0);
    assert!(value(&samples, "flashsale_writer_flush_seconds_sum", &[]).unwrap() > 0.0);
    assert!(value(&samples, "flashsale_db_pool_max", &[]).unwrap() >= 1.0);
    // The embedded gate has no Redis and no journal: neither family is there.
    assert!(!types.contains_key("flashsale_redis_up"));
    assert!(!types.contains_key("flashsale_journal_lag_seconds"));
    assert!(server.terminate(std::time::Duration::from_secs(15)).await);
}

/// The value of one series in a fresh scrape.
async fn scraped(
    http: &reqwest::Client,
    server: &TestServer,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    let (samples, _) = scrape(http, server).await;
    value(&samples, name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_up_and_journal_lag_follow_real_faults() {
    let db = TestDb::new().await;
    let mut redis = RedisServer::start().await;
    // The server reaches Postgres through a proxy the test can cut; Redis is its own.
    let target = {
        let url: reqwest::Url = db.url.parse().unwrap();
        format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
    };
    let proxy = TcpProxy::start(target).await;
    let proxied = {
        let mut url: reqwest::Url = db.url.parse().unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(proxy.port)).unwrap();
        url.to_string()
    };
    let server = TestServer::start(
        &proxied,
        &[
            ("REDIS_URL", &redis.url()),
            ("REDIS_KEY_PREFIX", "metrics-test:"),
            ("DB_POOL_WAIT_MS", "1000"),
        ],
    )
    .await;
    let http = reqwest::Client::new();
    let seller = seed_member(&db, Role::Seller).await;
    let product = seed_product(&db, &seller, 1_000).await;
    let opens = (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    let (status, drop) = post_json(
        &http,
        server.url("/api/v1/drops"),
        &seller,
        json!({ "product_id": product, "stock": 50, "opens_at": opens }),
    )
    .await
    .unwrap();
    assert_eq!(status, 201, "{drop}");
    let drop = drop["id"].as_str().unwrap().to_owned();
    let reservations = server.url(&format!("/api/v1/drops/{drop}/reservations"));
    let mut buyers = Vec::new();
    for _ in 0..6 {
        buyers.push(seed_member(&db, Role::Customer).await);
    }
    let reserve = |n: usize| {
        let (http, url, buyer) = (http.clone(), reservations.clone(), &buyers[n]);
        async move {
            let (status, body) = post_json(&http, url, buyer, json!({})).await.unwrap();
            assert_eq!(status, 201, "reservations need only Redis: {body}");
        }
    };
    let lag = [("drop", drop.as_str())];

    // Healthy: Redis answers, and the journal writes the first hold at once.
    reserve(0).await;
    assert_eq!(
        scraped(&http, &server, "flashsale_redis_up", &[]).await,
        Some(1.0)
    );
    eventually("the journal caught up", Duration::from_secs(10), || async {
        scraped(&http, &server, "flashsale_journal_lag_seconds", &lag).await == Some(0.0)
    })
    .await;

    // Postgres cut: holds still go into the stream, the journal cannot write them, and its lag grows.
    proxy.cut();
    for n in 1..4 {
        reserve(n).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let behind = scraped(&http, &server, "flashsale_journal_lag_seconds", &lag)
        .await
        .unwrap();
    assert!(
        behind >= 2.5,
        "journal lag {behind} s with Postgres cut for 3 s"
    );
    proxy.restore();
    eventually(
        "the journal caught up after Postgres came back",
        Duration::from_secs(30),
        || async {
            scraped(&http, &server, "flashsale_journal_lag_seconds", &lag).await == Some(0.0)
        },
    )
    .await;

    // Redis stopped: the next scrape's PING finds nobody.
    redis.stop().await;
    eventually("flashsale_redis_up 0", Duration::from_secs(10), || async {
        scraped(&http, &server, "flashsale_redis_up", &[]).await == Some(0.0)
    })
    .await;
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_off_leaves_the_route_out() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db.url, &[("METRICS", "false")]).await;
    let response = reqwest::get(server.url("/metrics")).await.unwrap();
    assert_eq!(response.status(), 404);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "metrics_disabled");
    assert!(server.terminate(std::time::Duration::from_secs(15)).await);
}
