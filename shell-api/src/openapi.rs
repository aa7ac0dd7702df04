//! The OpenAPI 3.1 document of the whole service (`GET /api/v1/openapi.json`), generated from the code, and the
//! page that renders it (`GET /docs`).
//!
//! Every handler carries a `#[utoipa::path]` attribute naming its route, parameters, request body, success body
//! and the error statuses it answers itself; every body type derives `ToSchema`. Each module lists its handlers in
//! a `Doc` of its own, merged here. What every route of a kind can answer is added once, by `CommonResponses`:
//! 413 and 503 anywhere (the guard's body limit and request timeout, a database that is down), 400 and 422 where
//! there is a body, 422 where there is a query, 404 where there is a path id and 401 where a token is required.
//! `tests/openapi.rs` fails when a route of the router is missing from the document or the other way round.

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use utoipa::openapi::path::{HttpMethod, Operation};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::error::{ErrorBody, ErrorDetail};

/// The base of the document: what the service is, the error body every answer shares, and this page. It names no
/// area: the composition root merges its routes' and every area's `Doc` into it (`assemble`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "flashsale",
        description = "A high-concurrency preorder / flash-sale engine with a thin commerce shell. \
Errors always carry a real HTTP status and the `ErrorBody`; lists are keyset-paginated (`limit`, `cursor`).",
    ),
    paths(docs_page),
    components(schemas(ErrorBody, ErrorDetail))
)]
struct BaseDoc;

/// The whole document: the base, then `parts` merged in order, then the answers every route of a kind shares.
pub fn assemble(parts: impl IntoIterator<Item = Document>) -> Document {
    let mut doc = BaseDoc::openapi();
    for part in parts {
        doc.merge(part);
    }
    CommonResponses.modify(&mut doc);
    doc
}

/// `json` (a whole document, serialized) as the answer to `GET /api/v1/openapi.json`.
pub fn json_response(json: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], json).into_response()
}

const DOCS_HTML: &str = include_str!("openapi/docs.html");

/// A page that renders the OpenAPI document: every operation by tag, its parameters, bodies and answers.
#[utoipa::path(get, path = "/docs", tag = "operations",
    responses((status = 200, description = "HTML", content_type = "text/html", body = String)))]
pub async fn docs_page() -> Html<&'static str> {
    Html(DOCS_HTML)
}

/// Adds the bearer scheme and the answers every route of a kind can give (see the module's docs).
struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        for (path, item) in doc.paths.paths.iter_mut() {
            let has_path_id = path.contains('{');
            for method in [
                HttpMethod::Get,
                HttpMethod::Post,
                HttpMethod::Put,
                HttpMethod::Patch,
                HttpMethod::Delete,
            ] {
                let operation = match method {
                    HttpMethod::Get => item.get.as_mut(),
                    HttpMethod::Post => item.post.as_mut(),
                    HttpMethod::Put => item.put.as_mut(),
                    HttpMethod::Patch => item.patch.as_mut(),
                    HttpMethod::Delete => item.delete.as_mut(),
                    _ => None,
                };
                if let Some(operation) = operation {
                    add_common(operation, has_path_id);
                }
            }
        }
    }
}

fn add_common(operation: &mut Operation, has_path_id: bool) {
    let has_body = operation.request_body.is_some();
    let has_query = operation.parameters.iter().flatten().any(|parameter| {
        matches!(
            parameter,
            RefOr::T(parameter) if matches!(parameter.parameter_in, utoipa::openapi::path::ParameterIn::Query)
        )
    });
    // Signed in when every alternative names a scheme; `security((), ("bearer" = []))` marks a token as optional.
    let signed_in = operation.security.as_ref().is_some_and(|alternatives| {
        !alternatives.is_empty()
            && alternatives
                .iter()
                .all(|requirement| !requirement_is_empty(requirement))
    });
    let mut add = |status: &str, description: &str| {
        if !operation.responses.responses.contains_key(status) {
            operation
                .responses
                .responses
                .insert(status.to_owned(), error_response(description));
        }
    };
    if has_body {
        add(
            "400",
            "`bad_request`: malformed JSON, or no `Content-Type: application/json`",
        );
        add(
            "422",
            "`validation`: the body is not of the right shape; `fields` names what is wrong",
        );
    }
    if has_query {
        add(
            "422",
            "`validation`: a query parameter is not of the right type or range",
        );
    }
    if has_path_id {
        add(
            "404",
            "No such resource (an id that is not a UUID names none either)",
        );
    }
    if signed_in {
        add("401", "`unauthorized`: a missing, invalid or expired token");
    }
    add(
        "413",
        "`payload_too_large`: the body is over `MAX_BODY_BYTES`",
    );
    add(
        "503",
        "`request_timeout`, `database_unavailable` or another dependency down; see `Retry-After`",
    );
}

fn requirement_is_empty(requirement: &utoipa::openapi::security::SecurityRequirement) -> bool {
    serde_json::to_value(requirement)
        .ok()
        .and_then(|value| value.as_object().map(|map| map.is_empty()))
        .unwrap_or(true)
}

fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}

#[cfg(test)]
mod tests {
    // The whole document, as the composition root assembles it.
    use crate::document;

    #[test]
    fn the_document_is_openapi_3_1_and_every_operation_answers_errors_with_the_error_body() {
        let doc = serde_json::to_value(document()).expect("serializes");
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().expect("paths");
        assert!(paths.len() > 50, "{} paths", paths.len());
        for (path, item) in paths {
            for (method, operation) in item.as_object().expect("path item") {
                let responses = operation["responses"].as_object().expect("responses");
                assert!(
                    responses.keys().any(|status| status.starts_with('2')),
                    "{method} {path} has no success answer"
                );
                for (status, response) in responses {
                    if !(status.starts_with('4') || status.starts_with('5')) {
                        continue;
                    }
                    let json = &response["content"]["application/json"];
                    if json.is_null() {
                        // Only the pages for browsers answer an error with HTML.
                        assert!(!path.starts_with("/api/"), "{method} {path} {status}");
                        assert!(
                            !response["content"]["text/html"].is_null(),
                            "{method} {path} {status}"
                        );
                    } else {
                        assert_eq!(
                            json["schema"]["$ref"], "#/components/schemas/ErrorBody",
                            "{method} {path} {status}"
                        );
                    }
                }
                assert!(responses.contains_key("503"), "{method} {path}");
            }
        }
    }
}
