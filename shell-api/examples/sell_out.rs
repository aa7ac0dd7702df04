//! End-to-end time to sell a drop: buyers reserve and pay, concurrently, until every unit is sold.
//! `sell_out BASE_URL DROP_ID TOKENS_FILE [CONCURRENCY]`; prints the units sold, the seconds from the first request
//! to the last payment, and units per second. Each buyer loops reserve -> pay (`tok_ok`) until the drop answers
//! `sold_out`; a member at its per-member limit moves on to the next token. Used by `scripts/wire.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::too_many_lines,
    reason = "an example is one measurement read top to bottom: its setup, the load and the report"
)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, base, drop, tokens, rest @ ..] = &args[..] else {
        eprintln!("usage: sell_out BASE_URL DROP_ID TOKENS_FILE [CONCURRENCY]");
        std::process::exit(2);
    };
    let concurrency: usize = rest
        .first()
        .map_or(128, |n| n.parse().expect("concurrency"));
    let tokens: Arc<Vec<String>> = Arc::new(
        std::fs::read_to_string(tokens)
            .expect("tokens file")
            .lines()
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect(),
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let reserve_url = format!("{base}/api/v1/drops/{drop}/reservations");
    let next_token = Arc::new(AtomicUsize::new(0));
    let sold = Arc::new(AtomicU64::new(0));
    let unexpected = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let buyers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, tokens, next_token, sold, unexpected) = (
                http.clone(),
                tokens.clone(),
                next_token.clone(),
                sold.clone(),
                unexpected.clone(),
            );
            let (base, reserve_url) = (base.clone(), reserve_url.clone());
            tokio::spawn(async move {
                let mut token = next_token.fetch_add(1, Ordering::Relaxed) % tokens.len();
                loop {
                    let held = http
                        .post(&reserve_url)
                        .bearer_auth(&tokens[token])
                        .json(&json!({}))
                        .send()
                        .await
                        .expect("reserve");
                    let status = held.status().as_u16();
                    let body: Value = held.json().await.unwrap_or(Value::Null);
                    match (status, body["error"]["code"].as_str()) {
                        (201, _) => {}
                        (409, Some("sold_out")) => return,
                        (409, Some("limit_exceeded")) => {
                            token = next_token.fetch_add(1, Ordering::Relaxed) % tokens.len();
                            continue;
                        }
                        _ => {
                            unexpected.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                    let id = body["id"].as_str().expect("reservation id");
                    let paid = http
                        .post(format!("{base}/api/v1/reservations/{id}/payment"))
                        .bearer_auth(&tokens[token])
                        .json(&json!({ "payment_token": "tok_ok" }))
                        .send()
                        .await
                        .expect("pay");
                    if paid.status().as_u16() == 200 {
                        sold.fetch_add(1, Ordering::Relaxed);
                    } else {
                        unexpected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for buyer in buyers {
        buyer.await.expect("buyer");
    }
    let seconds = started.elapsed().as_secs_f64();
    let sold = sold.load(Ordering::Relaxed);
    println!(
        "sold {sold} units in {seconds:.2} s ({:.0} units/s), {} unexpected answers",
        sold as f64 / seconds,
        unexpected.load(Ordering::Relaxed)
    );
}
