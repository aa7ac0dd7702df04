//! Prometheus metrics: `GET /metrics` in the text exposition format, recorded through the `metrics` facade and
//! rendered by `metrics-exporter-prometheus` (installed by `serve` unless `METRICS=false`).
//!
//! What is recorded as it happens: every request's count and latency by route template, method and status (in
//! `guard`, with the handles cached per worker thread so the hot path does no label formatting or registry lookup),
//! the gate's latency per reservation (engine), the writer's batch rows and flush seconds (engine). What is read
//! when scraped, at no cost to requests: the engine's outcome counters (`EngineStats`), permits in flight, the
//! writer's queue depth, the Postgres pool, each loaded drop's journal lag (Redis gate), and whether Redis answers a
//! PING (one per scrape, bounded by `REDIS_PING_TIMEOUT`: the gate calls Redis only while a drop is loaded, so the
//! last call's outcome can be hours old on an idle instance).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::ApiError;
use crate::AppState;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Seconds: from 100 µs (a refusal from memory) to 10 s (a request at its deadline).
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Rows per writer batch, up to `WRITER_BATCH_ROWS_MAX`'s default.
const ROWS_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];
/// How often histograms are folded when nobody scrapes, so recorded samples cannot pile up.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Cached request handles per worker thread; past this the cache starts over (it cannot grow without bound).
const HTTP_HANDLES_MAX: usize = 4096;
/// Longest wait for Redis's PING during a scrape; no answer by then is `flashsale_redis_up 0`. Well under a
/// one-second scrape interval.
const REDIS_PING_TIMEOUT: Duration = Duration::from_millis(500);

/// Installs the recorder (once per process) and starts its upkeep. Must run inside the Tokio runtime, before the
/// engine starts (the engine takes its handles at start).
pub fn install() -> anyhow::Result<()> {
    if HANDLE.get().is_some() {
        return Ok(());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(SECONDS_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full("flashsale_writer_batch_rows".to_owned()),
            ROWS_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let _ = HANDLE.set(handle);
    ENABLED.store(true, Ordering::Release);
    Ok(())
}

/// Whether a recorder is installed (requests are timed only then).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        "flashsale_http_request_duration_seconds",
        Unit::Seconds,
        "Time to the response head, by route template, method and status"
    );
    describe_histogram!(
        "flashsale_gate_call_seconds",
        Unit::Seconds,
        "Time the stock authority (gate) takes to decide, by call"
    );
    describe_histogram!(
        "flashsale_writer_batch_rows",
        Unit::Count,
        "Rows in each batch the writer commits"
    );
    describe_histogram!(
        "flashsale_writer_flush_seconds",
        Unit::Seconds,
        "Time to commit one writer batch"
    );
    for (name, help) in [
        ("flashsale_http_requests_total", "HTTP requests answered, by route template, method and status"),
        ("flashsale_writer_failed_batches_total", "Writer batches given up on after their retries"),
        ("flashsale_reservations_total", "Reservation attempts by outcome (reserved, sold_out, limit, not_open, overloaded)"),
        ("flashsale_payments_total", "Drop payments by outcome (paid, declined, unavailable)"),
        ("flashsale_holds_released_total", "Holds released, by reason (cancelled, expired)"),
        ("flashsale_drop_loads_total", "Loads of a drop from Postgres begun on a request, not loaded here yet (one however many requests wait on it)"),
    ] {
        describe_counter!(name, help);
    }
    for (name, help) in [
        ("flashsale_writer_queue_depth", "Writes queued and not yet taken by the writer"),
        ("flashsale_in_flight", "Reservations and payments holding an in-flight permit"),
        ("flashsale_in_flight_max", "In-flight permits, by kind (past them, 429)"),
        ("flashsale_db_pool_connections", "Postgres pool connections by state (in_use, idle)"),
        ("flashsale_db_pool_max", "Postgres pool size limit"),
        ("flashsale_password_hashes", "Password hashes by state (running, waiting, limit)"),
        ("flashsale_db_pool_waiting", "Requests waiting for a Postgres connection"),
        ("flashsale_redis_up", "1 when the shared Redis answered a PING during this scrape, else 0 (only with REDIS_URL)"),
    ] {
        describe_gauge!(name, help);
    }
}

/// A request's handles, cached per worker thread under the route template's address (stable: the router keeps one
/// `Arc<str>` per route), method and status; the template is compared on every hit, so an address reused by
/// another router cannot mislabel.
struct HttpHandles {
    route: Box<str>,
    count: Counter,
    seconds: Histogram,
}

thread_local! {
    static HTTP: RefCell<HashMap<(usize, u8, u16), HttpHandles>> = RefCell::new(HashMap::new());
}

/// Records one answered request.
pub fn record_request(route: Option<&str>, method: &Method, status: u16, elapsed: Duration) {
    let route = route.unwrap_or("unmatched");
    let (method_id, method_label) = method_label(method);
    let key = (route.as_ptr() as usize, method_id, status);
    HTTP.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.get(&key).is_some_and(|h| &*h.route != route) {
            cache.remove(&key);
        }
        if cache.len() >= HTTP_HANDLES_MAX && !cache.contains_key(&key) {
            cache.clear();
        }
        let handles = cache.entry(key).or_insert_with(|| {
            let labels = [
                ("route", route.to_owned()),
                ("method", method_label.to_owned()),
                ("status", status.to_string()),
            ];
            HttpHandles {
                route: route.into(),
                count: metrics::counter!("flashsale_http_requests_total", &labels),
                seconds: metrics::histogram!("flashsale_http_request_duration_seconds", &labels),
            }
        });
        handles.count.increment(1);
        handles.seconds.record(elapsed.as_secs_f64());
    });
}

/// The method's label (extension methods are one label, so clients cannot make series up).
fn method_label(method: &Method) -> (u8, &'static str) {
    match *method {
        Method::GET => (0, "GET"),
        Method::POST => (1, "POST"),
        Method::PUT => (2, "PUT"),
        Method::DELETE => (3, "DELETE"),
        Method::PATCH => (4, "PATCH"),
        Method::HEAD => (5, "HEAD"),
        Method::OPTIONS => (6, "OPTIONS"),
        _ => (7, "other"),
    }
}

/// `GET /metrics`: the exposition, with the values read at scrape time set first.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String),
        (status = 404, description = "`metrics_disabled`: `METRICS=false`", body = crate::error::ErrorBody)))]
pub async fn scrape(State(state): State<AppState>) -> Response {
    let Some(handle) = HANDLE.get() else {
        return ApiError::not_found("metrics_disabled")
            .with_message("metrics are off (METRICS=false)")
            .into_response();
    };
    let stats = state.engine.stats();
    for (outcome, counter) in [
        ("reserved", &stats.reservations),
        ("sold_out", &stats.rejected_sold_out),
        ("limit", &stats.rejected_limit),
        ("not_open", &stats.rejected_not_open),
        ("overloaded", &stats.rejected_overloaded),
    ] {
        metrics::counter!("flashsale_reservations_total", "outcome" => outcome)
            .absolute(counter.get());
    }
    for (outcome, counter) in [
        ("paid", &stats.payments),
        ("declined", &stats.payments_declined),
        ("unavailable", &stats.payments_unavailable),
        ("fenced", &stats.payments_fenced),
    ] {
        metrics::counter!("flashsale_payments_total", "outcome" => outcome).absolute(counter.get());
    }
    for (reason, counter) in [
        ("cancelled", &stats.released_cancelled),
        ("expired", &stats.released_expired),
    ] {
        metrics::counter!("flashsale_holds_released_total", "reason" => reason)
            .absolute(counter.get());
    }
    metrics::counter!("flashsale_drop_loads_total").absolute(stats.drops_loaded.get());
    let (reserving, paying) = state.engine.in_flight();
    let (reserve_max, pay_max) = state.engine.in_flight_max();
    metrics::gauge!("flashsale_in_flight", "kind" => "reserve").set(reserving as f64);
    metrics::gauge!("flashsale_in_flight", "kind" => "pay").set(paying as f64);
    metrics::gauge!("flashsale_in_flight_max", "kind" => "reserve").set(reserve_max as f64);
    metrics::gauge!("flashsale_in_flight_max", "kind" => "pay").set(pay_max as f64);
    metrics::gauge!("flashsale_writer_queue_depth").set(state.engine.writer_queue_depth() as f64);
    let pool = state.db.status();
    metrics::gauge!("flashsale_db_pool_connections", "state" => "in_use")
        .set(pool.size.saturating_sub(pool.available) as f64);
    metrics::gauge!("flashsale_db_pool_connections", "state" => "idle").set(pool.available as f64);
    metrics::gauge!("flashsale_db_pool_max").set(pool.max_size as f64);
    metrics::gauge!("flashsale_db_pool_waiting").set(pool.waiting as f64);
    if let Some(up) = state.redis_answers(REDIS_PING_TIMEOUT).await {
        metrics::gauge!("flashsale_redis_up").set(if up { 1.0 } else { 0.0 });
    }

    let hashing = crate::abuse::hashing();
    metrics::gauge!("flashsale_password_hashes", "state" => "running")
        .set(hashing.in_flight().0 as f64);
    metrics::gauge!("flashsale_password_hashes", "state" => "waiting")
        .set(hashing.waiting() as f64);
    metrics::gauge!("flashsale_password_hashes", "state" => "limit")
        .set(hashing.concurrency() as f64);
    let mut body = handle.render();
    journal_lag(&mut body, &state.engine.journal_lag());
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Appends `flashsale_journal_lag_seconds{drop="<id>"}` for each drop loaded now. Written here rather than through
/// the recorder, which never forgets a series: a drop's series must leave with the drop (unloaded once settled), so
/// a process that sells drops for weeks exports only the live ones.
fn journal_lag(body: &mut String, lags: &[(uuid::Uuid, Duration)]) {
    use std::fmt::Write as _;
    if lags.is_empty() {
        return;
    }
    if !body.is_empty() && !body.ends_with('\n') {
        body.push('\n');
    }
    body.push_str(
        "# HELP flashsale_journal_lag_seconds Per loaded drop (Redis gate): how long the oldest stream entry this \
         instance's journal has not yet written to Postgres has waited; 0 when caught up\n\
         # TYPE flashsale_journal_lag_seconds gauge\n",
    );
    for (drop, lag) in lags {
        // Writing to a String cannot fail.
        let _ = writeln!(
            body,
            "flashsale_journal_lag_seconds{{drop=\"{drop}\"}} {}",
            lag.as_secs_f64()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_lag_lines_name_each_loaded_drop() {
        let mut body = String::from("flashsale_in_flight{kind=\"pay\"} 0\n");
        journal_lag(&mut body, &[]);
        assert_eq!(
            body, "flashsale_in_flight{kind=\"pay\"} 0\n",
            "no drop, no family"
        );
        let drop = uuid::Uuid::from_u128(7);
        journal_lag(&mut body, &[(drop, Duration::from_millis(1500))]);
        assert!(
            body.contains("# TYPE flashsale_journal_lag_seconds gauge\n"),
            "{body}"
        );
        assert!(
            body.ends_with(&format!(
                "flashsale_journal_lag_seconds{{drop=\"{drop}\"}} 1.5\n"
            )),
            "{body}"
        );
    }
}
