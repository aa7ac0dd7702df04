//! HTTP hardening (`guard`): keep-alive survives answers given before the body was read, bodies over the limit
//! are refused with `Connection: close`, request ids are echoed, and a request past its deadline is answered 503
//! while the payment it started still finishes; a payment whose client goes away is never left `paying`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{drop_state, pay, purchase_rows, read_reservation, reserve, TestApp};
use serde_json::{json, Value};
use shell_api::auth::Role;
use shell_api::config::EngineArgs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Serves `router` on a loopback port; its address.
async fn serve(router: shell_api::App) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            axum::ServiceExt::<axum::extract::Request>::into_make_service(router),
        )
        .await
    });
    addr
}

/// One HTTP/1.1 response read off a kept-alive connection: status, lower-cased head, body.
async fn read_response(stream: &mut TcpStream) -> Option<(u16, String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let status = head[9..12].parse().unwrap();
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned();
            return Some((status, head, body));
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("an answer within 10 s")
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn post(path: &str, body: &[u8], extra: &str) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";

/// After `first` is answered `status`, the same connection serves `/healthz` (or the answer said it would close).
async fn connection_survives(addr: std::net::SocketAddr, first: &[u8], status: u16) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // Headers first, then the body in pieces: the handler can answer before it has all of it.
    let split = first.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    stream.write_all(&first[..split]).await.unwrap();
    for piece in first[split..].chunks(16 * 1024) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        stream.write_all(piece).await.unwrap();
    }
    let (got, head, body) = read_response(&mut stream).await.expect("an answer");
    assert_eq!(got, status, "{head}\n{body}");
    assert!(
        !head.contains("connection: close"),
        "a bounded body is read, not a reason to close: {head}"
    );
    stream.write_all(HEALTHZ).await.unwrap();
    let (next, head, _) = read_response(&mut stream)
        .await
        .expect("the same connection serves the next request");
    assert_eq!(next, 200, "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_survives_answers_given_before_the_body_was_read() {
    let app = TestApp::new().await;
    let addr = serve(app.router.clone()).await;
    let big = vec![b' '; 70 * 1024];
    let drop = uuid::Uuid::new_v4();

    // 401: no token, on a POST with a 70 KB body.
    connection_survives(
        addr,
        &post(&format!("/api/v1/drops/{drop}/reservations"), &big, ""),
        401,
    )
    .await;
    // 404: no such route.
    connection_survives(addr, &post("/api/v1/nowhere", &big, ""), 404).await;
    // 405 on a known path.
    connection_survives(addr, &post("/healthz", &big, ""), 405).await;
    // 404 for a drop that does not exist, signed in: the handler never reads the body.
    let member = app.member(Role::Customer).await;
    connection_survives(
        addr,
        &post(
            &format!("/api/v1/drops/{drop}/reservations"),
            &big,
            &format!("authorization: Bearer {}\r\n", member.token),
        ),
        404,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_refused_413_with_connection_close() {
    let app = TestApp::new().await;
    let addr = serve(app.router.clone()).await;

    // Declared over the limit: refused from the headers, the connection announced closed.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = "POST /api/v1/members HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                content-length: 2000000\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let (status, head, body) = read_response(&mut stream).await.unwrap();
    assert_eq!(status, 413, "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the server closes"
    );

    // Chunked, with no length: refused once it passes the limit.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /api/v1/members HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              transfer-encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
    let chunk = vec![b' '; 256 * 1024];
    for _ in 0..8 {
        let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
        frame.extend_from_slice(&chunk);
        frame.extend_from_slice(b"\r\n");
        if stream.write_all(&frame).await.is_err() {
            break;
        }
    }
    let (status, head, _) = read_response(&mut stream)
        .await
        .expect("an answer to the chunked body");
    assert_eq!(status, 413, "{head}");
    assert!(head.contains("connection: close"), "{head}");

    // Just under the limit is read and answered on its merits, keep-alive kept (422: not a member's fields).
    let under = format!("{{\"pad\":\"{}\"}}", " ".repeat(1_048_576 - 20));
    connection_survives(addr, &post("/api/v1/members", under.as_bytes(), ""), 422).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_or_made() {
    let app = TestApp::new().await;
    let with_id = |id: &str| {
        axum::http::Request::builder()
            .uri("/healthz")
            .header("x-request-id", id)
            .body(axum::body::Body::empty())
            .unwrap()
    };
    let given = app.send(with_id("abc-123")).await;
    assert_eq!(given.headers["x-request-id"], "abc-123");
    let made = app.call("GET", "/api/v1/nowhere", None, None).await;
    assert_eq!(made.status, 404);
    let id = made.headers["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    // Too long, or not printable: replaced.
    let replaced = app.send(with_id(&"x".repeat(129))).await;
    assert_eq!(replaced.headers["x-request-id"].len(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_past_the_deadline_answers_503_and_still_completes() {
    let app = TestApp::with_engine_args(EngineArgs {
        payment_latency_ms: 600,
        ..EngineArgs::default()
    })
    .await;
    // The same engine behind a router whose requests may take 150 ms.
    let settings = shell_api::Settings {
        request_timeout: Duration::from_millis(150),
        ..shell_api::Settings::for_tests()
    };
    let state = shell_api::AppState::new(
        app.state.db.clone(),
        settings,
        Arc::clone(&app.state.engine),
        None,
    );
    let hurried = shell_api::app(state);
    let (_, drop) = app.open_drop(5, 10_000, json!({})).await;
    let buyer = app.member(Role::Customer).await;
    let held = reserve(&app, &buyer, &drop, 1).await;
    let id = held.body["id"].as_str().unwrap().to_owned();

    let request = axum::http::Request::builder()
        .method("POST")
        .uri(format!("/api/v1/reservations/{id}/payment"))
        .header("authorization", format!("Bearer {}", buyer.token))
        .header("content-type", "application/json")
        .body(axum::body::Body::from(
            json!({ "payment_token": "tok_ok" }).to_string(),
        ))
        .unwrap();
    let response = tower::ServiceExt::oneshot(hurried, request).await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = serde_json::from_slice(
        &http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes(),
    )
    .unwrap();
    assert_eq!(body["error"]["code"], "request_timeout");

    // The payment went on without its caller: paid, one purchase, the drop's counts conserved.
    settled_paid(&app, &buyer, &id).await;
    let state = drop_state(&app, &drop).await;
    assert_eq!(state["sold"], 1);
    assert_eq!(state["held"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_whose_client_goes_away_is_never_left_paying() {
    let app = TestApp::with_engine_args(EngineArgs {
        payment_latency_ms: 400,
        ..EngineArgs::default()
    })
    .await;
    let (_, drop) = app.open_drop(5, 10_000, json!({})).await;
    let buyer = app.member(Role::Customer).await;
    let held = reserve(&app, &buyer, &drop, 1).await;
    let id = held.body["id"].as_str().unwrap().to_owned();
    // The client gives up 50 ms in, while the gateway is still charging: its request future is dropped.
    let gave_up =
        tokio::time::timeout(Duration::from_millis(50), pay(&app, &buyer, &id, "tok_ok")).await;
    assert!(
        gave_up.is_err(),
        "the payment answered before the client left"
    );
    settled_paid(&app, &buyer, &id).await;
    // Paying again answers the same purchase.
    let again = pay(&app, &buyer, &id, "tok_ok").await;
    assert_eq!(again.status, 200, "{}", again.body);
}

/// Waits until the reservation reads `paid` with exactly one purchase row.
async fn settled_paid(app: &TestApp, buyer: &common::TestMember, id: &str) {
    let started = std::time::Instant::now();
    loop {
        let read = read_reservation(app, buyer, id).await;
        if read.body["status"] == "paid" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the payment never finished: {}",
            read.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(purchase_rows(app, id).await, 1);
}
