//! `GET /live/drops/{id}`: the live drop page for buyers and the shop's staff (countdown to `opens_at`, available /
//! held / sold, units per second, time to sell out), plain HTML, CSS and a little JavaScript compiled into the
//! binary (`assets/`), no build step. The page carries the drop's current state in its HTML, so it reads right
//! before the script runs, and then follows the drop's event stream with an EventSource.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use uuid::Uuid;

use crate::drops::DropJson;
use crate::error::ApiError;
use crate::AppState;

const PAGE_HTML: &str = include_str!("assets/page.html");
const PAGE_CSS: &str = include_str!("assets/page.css");
const PAGE_JS: &str = include_str!("assets/page.js");

pub(super) const NOT_FOUND_HTML: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>No such drop</title></head>\
<body style=\"font-family:system-ui,sans-serif;max-width:30rem;margin:3rem auto;padding:0 1rem\">\
<h1>No such drop</h1><p>This drop does not exist. Check the link you were given.</p></body></html>";

#[utoipa::path(get, path = "/live/drops/{id}", tag = "live",
    params(("id" = Uuid, Path, description = "The drop")),
    responses((status = 200, description = "The live drop page: countdown, available / held / sold, units per \
second, time to sell out, kept current from the event stream", content_type = "text/html", body = String),
        (status = 404, description = "An HTML page saying there is no such drop (an id that is not a UUID names none)",
            content_type = "text/html", body = String)))]
pub async fn live_page(
    State(state): State<AppState>,
    axum::extract::Path(drop): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    // A mistyped link is a page for a person too, not the API's JSON 404.
    let not_found = || Ok((StatusCode::NOT_FOUND, Html(NOT_FOUND_HTML)).into_response());
    let Ok(drop) = Uuid::parse_str(&drop) else {
        return not_found();
    };
    let info = match state.engine.drop_info(drop).await {
        Ok(info) => info,
        Err(engine::EngineError::DropNotFound) => return not_found(),
        Err(err) => return Err(err.into()),
    };
    let json = serde_json::to_string(&DropJson::from(info)).map_err(ApiError::internal)?;
    // Ids, numbers, times and fixed words only: nothing in the JSON can close the script element it sits in.
    debug_assert!(!json.contains('<'));
    let page = PAGE_HTML.replace("__DROP_JSON__", &json);
    Ok(([(header::CACHE_CONTROL, "no-store")], Html(page)).into_response())
}

/// The page's stylesheet and script.
#[utoipa::path(get, path = "/live/assets/{file}", tag = "live",
    params(("file" = String, Path, description = "`page.css` or `page.js`")),
    responses((status = 200, description = "The file", content_type = "text/css", body = String),
        (status = 404, description = "`not_found`: another file", body = crate::error::ErrorBody)))]
pub async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let (body, content_type) = match file.as_str() {
        "page.css" => (PAGE_CSS, "text/css; charset=utf-8"),
        "page.js" => (PAGE_JS, "text/javascript; charset=utf-8"),
        _ => return ApiError::not_found("not_found").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}
