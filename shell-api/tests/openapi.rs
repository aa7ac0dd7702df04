//! The OpenAPI document against the router: every route the router serves is in the document with the same
//! methods, and every operation of the document is served. The router cannot list its routes, so each path it
//! was given (`shell_api::routes().paths()`) and each path of the document is asked with every method: a route
//! answers anything but the router's own 404 ("no such route") and 405 (`method_not_allowed`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::routing::get;
use common::TestApp;
use http_body_util::BodyExt;
use serde_json::Value;
use shell_api::App;
use tower::ServiceExt;

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// `(METHOD, path template)` pairs.
type Operations = BTreeSet<(String, String)>;

/// A concrete path for a template: every `{param}` becomes an id (or a file name) that names nothing.
fn concrete(template: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closed brace") + start;
        let name = &rest[start + 1..end];
        out.push_str(if name == "file" {
            "page.css"
        } else {
            "0190a0a0-0000-7000-8000-000000000000"
        });
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Whether the router has a handler for `method` on `template`: anything but its fallbacks.
async fn served(router: &App, method: &str, template: &str) -> bool {
    let request = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(concrete(template))
        .body(Body::empty())
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    if status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED {
        return true;
    }
    // Only error bodies are read (an event stream that answered 200 would never end).
    let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
        .await
        .expect("an error body arrives")
        .unwrap()
        .to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let fallback = match status {
        StatusCode::METHOD_NOT_ALLOWED => body["error"]["code"] == "method_not_allowed",
        _ => body["error"]["message"] == "no such route",
    };
    !fallback
}

/// Every operation the router serves on the given paths.
async fn router_operations(router: &App, paths: &BTreeSet<String>) -> Operations {
    let mut operations = Operations::new();
    for path in paths {
        for method in METHODS {
            if served(router, method, path).await {
                operations.insert((method.to_owned(), path.clone()));
            }
        }
    }
    operations
}

fn document_operations(doc: &Value) -> Operations {
    let mut operations = Operations::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            let method = method.to_ascii_uppercase();
            if METHODS.contains(&method.as_str()) {
                operations.insert((method, path.clone()));
            }
        }
    }
    operations
}

/// The operations only the router has and those only the document has.
async fn differences(router: &App, route_paths: &[&str], doc: &Value) -> (Operations, Operations) {
    let documented = document_operations(doc);
    let mut paths: BTreeSet<String> = route_paths.iter().map(|p| (*p).to_owned()).collect();
    paths.extend(documented.iter().map(|(_, path)| path.clone()));
    let routed = router_operations(router, &paths).await;
    (
        routed.difference(&documented).cloned().collect(),
        documented.difference(&routed).cloned().collect(),
    )
}

async fn served_document(app: &TestApp) -> Value {
    let response = app.call("GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(
        response.headers["content-type"], "application/json",
        "{:?}",
        response.headers
    );
    response.body
}

#[tokio::test]
async fn every_route_of_the_router_is_in_the_openapi_document_and_nothing_else() {
    let app = TestApp::new().await;
    let doc = served_document(&app).await;
    assert_eq!(doc["openapi"], "3.1.0");
    let routes = shell_api::routes();
    let (undocumented, unrouted) = differences(&app.router, routes.paths(), &doc).await;
    assert!(
        undocumented.is_empty(),
        "served but not in the OpenAPI document: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "in the OpenAPI document but not served: {unrouted:?}"
    );
    // The contract's routes are all there (a sample from each section of API.md).
    let documented = document_operations(&doc);
    for (method, path) in [
        ("GET", "/healthz"),
        ("POST", "/api/v1/members"),
        ("POST", "/api/v1/auth/refresh"),
        ("PUT", "/api/v1/members/{id}/role"),
        ("POST", "/api/v1/products/bulk"),
        ("POST", "/api/v1/drops/{id}/reservations"),
        ("DELETE", "/api/v1/reservations/{id}"),
        ("PUT", "/api/v1/comments/{id}/like"),
        ("GET", "/api/v1/activity"),
        ("POST", "/api/v1/orders"),
        ("POST", "/api/v1/refunds/{id}/reject"),
        ("GET", "/api/v1/sellers/me/settlements"),
        ("GET", "/api/v1/search/popular"),
        ("GET", "/api/v1/drops/{id}/events"),
        ("GET", "/live/drops/{id}"),
        ("POST", "/api/v1/members/me/notifications/read"),
        ("GET", "/metrics"),
        ("GET", "/docs"),
    ] {
        assert!(
            documented.contains(&(method.to_owned(), path.to_owned())),
            "{method} {path} is not documented"
        );
    }
}

#[tokio::test]
async fn a_route_left_out_of_the_document_and_an_operation_nobody_serves_are_both_caught() {
    let app = TestApp::new().await;
    let mut doc = served_document(&app).await;
    // One route more in the router than in the document.
    let routes = shell_api::routes().route("/api/v1/undocumented", get(|| async { "hi" }));
    let router = shell_api::app_from(routes, app.state.clone());
    let paths = shell_api::routes()
        .route("/api/v1/undocumented", get(|| async { "hi" }))
        .paths()
        .to_vec();
    // One operation more in the document than in the router: DELETE on a path that only has GET.
    doc["paths"]["/api/v1/drops/{id}"]["delete"] =
        doc["paths"]["/api/v1/drops/{id}"]["get"].clone();
    let (undocumented, unrouted) = differences(&router, &paths, &doc).await;
    assert_eq!(
        undocumented,
        Operations::from([("GET".to_owned(), "/api/v1/undocumented".to_owned())])
    );
    assert_eq!(
        unrouted,
        Operations::from([("DELETE".to_owned(), "/api/v1/drops/{id}".to_owned())])
    );
}

#[tokio::test]
async fn the_contract_s_error_statuses_are_documented_with_the_error_body() {
    let app = TestApp::new().await;
    let doc = served_document(&app).await;
    let statuses = |method: &str, path: &str| -> BTreeSet<String> {
        doc["paths"][path][method]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path} has no responses"))
            .keys()
            .cloned()
            .collect()
    };
    for (method, path, wanted) in [
        ("post", "/api/v1/members", &["201", "409", "422"][..]),
        ("post", "/api/v1/auth/login", &["200", "401", "429"]),
        (
            "post",
            "/api/v1/drops/{id}/reservations",
            &["201", "401", "404", "409", "422", "429", "503"],
        ),
        (
            "post",
            "/api/v1/reservations/{id}/payment",
            &["200", "402", "403", "404", "409", "503"],
        ),
        ("post", "/api/v1/orders", &["201", "402", "409", "422"]),
        (
            "post",
            "/api/v1/refunds/{id}/accept",
            &["200", "403", "404"],
        ),
        ("post", "/api/v1/refunds/{id}/reject", &["200", "409"]),
        ("get", "/api/v1/orders/{id}", &["200", "403", "404"]),
        ("put", "/api/v1/members/{id}/follow", &["204", "422"]),
    ] {
        let documented = statuses(method, path);
        for status in wanted {
            assert!(
                documented.contains(*status),
                "{method} {path} does not document {status}: {documented:?}"
            );
        }
    }
    // Bodies are described by schemas in the document, the error body among them.
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for name in [
        "ErrorBody",
        "Drop",
        "Reservation",
        "Payment",
        "Product",
        "MemberBody",
        "TokenPair",
    ] {
        assert!(schemas.contains_key(name), "no schema {name}");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}

#[tokio::test]
async fn the_docs_page_renders_the_document() {
    let app = TestApp::new().await;
    let request = Request::builder().uri("/docs").body(Body::empty()).unwrap();
    let response = app.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let page = response.into_body().collect().await.unwrap().to_bytes();
    let page = String::from_utf8(page.to_vec()).unwrap();
    assert!(
        page.contains("/api/v1/openapi.json"),
        "the page loads the document"
    );
}
