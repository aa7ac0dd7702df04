//! The service as served: the router, with the drop's hot route answered in front of it.
//!
//! `POST /api/v1/drops/{id}/reservations` is what every buyer sends in the second a drop opens, and keeps sending
//! once it is sold out; everything else is ordinary traffic. Routing it through axum costs more than the engine's
//! answer: the route match and its parameters, the boxed services of the route and the method router, the
//! extractors one by one. `App` recognises that one route by its path and answers it directly, with the same
//! pieces the router's path uses: the guard's request id, body bound, deadline and metrics (`guard::Call`), the
//! handler's checks in the handler's order (the member, the `Idempotency-Key`, the body) and the handler's own
//! answer (`drops::reserve_answer`). So both paths answer alike by construction, and the route's handler still
//! serves what the hot path leaves to it: an id that is not a UUID (404 after the member check, as the router
//! does it).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::future::RouteFuture;
use axum::Router;
use futures_util::future::Either;
use tower::Service;
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::AuthMember;
use crate::drops::{self, ReserveBody, RESERVE_PREFIX, RESERVE_ROUTE, RESERVE_SUFFIX};
use crate::error::ApiError;
use crate::extract::optional_json;
use crate::guard::{self, Call};
use crate::AppState;

type HotFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

/// The whole HTTP service (built by the composition root, `app.rs`): a `tower::Service` over requests, in-process
/// as over a socket.
#[derive(Clone)]
pub struct App {
    router: Router,
    state: AppState,
}

impl App {
    pub fn new(router: Router, state: AppState) -> Self {
        Self { router, state }
    }

    /// The router alone, without the hot path in front (tests hold the two answering alike).
    pub fn router(&self) -> &Router {
        &self.router
    }
}

impl Service<Request<Body>> for App {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<RouteFuture<Infallible>, HotFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        <Router as Service<Request<Body>>>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        match reservation_target(&request) {
            Some(drop_id) => Either::Right(Box::pin(reserve(self.state.clone(), drop_id, request))),
            None => Either::Left(self.router.call(request)),
        }
    }
}

/// The drop of `POST /api/v1/drops/{id}/reservations` with a UUID for `{id}` (any form the router's `Uuid` takes).
fn reservation_target(request: &Request<Body>) -> Option<Uuid> {
    if request.method() != Method::POST {
        return None;
    }
    let id = request
        .uri()
        .path()
        .strip_prefix(RESERVE_PREFIX)?
        .strip_suffix(RESERVE_SUFFIX)?;
    Uuid::try_parse(id).ok()
}

/// The route's answer, wrapped as the guard wraps every routed request.
async fn reserve(
    state: AppState,
    drop_id: Uuid,
    request: Request<Body>,
) -> Result<Response, Infallible> {
    let call = Call::begin(&request);
    let span = call.span();
    let response = async {
        let settings = &state.settings;
        let (parts, body) = request.into_parts();
        let length = guard::content_length(&parts.headers);
        let body = match guard::body_bytes(length, body, settings.max_body_bytes).await {
            Ok(body) => body,
            Err(refusal) => return refusal,
        };
        let answer = async {
            answer(&state, &parts.headers, drop_id, &body)
                .await
                .unwrap_or_else(IntoResponse::into_response)
        };
        guard::within(settings.request_timeout, answer).await
    }
    .instrument(span)
    .await;
    Ok(call.end(response, Some(RESERVE_ROUTE)))
}

/// The handler's extractors in the handler's order, then the handler's answer.
async fn answer(
    state: &AppState,
    headers: &HeaderMap,
    drop_id: Uuid,
    body: &[u8],
) -> Result<Response, ApiError> {
    let member = AuthMember::from_headers(headers, state).await?;
    let key = crate::idempotency::key_from(headers)?;
    let body: ReserveBody = optional_json(body)?;
    let pass = drops::queue::pass_of(headers);
    drops::reserve_answer(state, member.id, drop_id, key, pass, body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(method: Method, path: &str) -> Option<Uuid> {
        reservation_target(
            &Request::builder()
                .method(method)
                .uri(path)
                .body(Body::empty())
                .unwrap(),
        )
    }

    #[test]
    fn only_a_post_to_a_drops_reservations_with_a_uuid_is_taken() {
        let id = Uuid::now_v7();
        assert_eq!(
            target(Method::POST, &format!("/api/v1/drops/{id}/reservations")),
            Some(id)
        );
        assert_eq!(
            target(
                Method::POST,
                &format!("/api/v1/drops/{}/reservations?x=1", id.simple())
            ),
            Some(id)
        );
        assert_eq!(
            RESERVE_ROUTE,
            format!("{RESERVE_PREFIX}{{id}}{RESERVE_SUFFIX}")
        );
        for (method, path) in [
            (Method::GET, format!("/api/v1/drops/{id}/reservations")),
            (Method::POST, format!("/api/v1/drops/{id}/reservations/")),
            (Method::POST, format!("/api/v1/drops/{id}")),
            (
                Method::POST,
                "/api/v1/drops/not-a-uuid/reservations".to_owned(),
            ),
            (Method::POST, format!("/api/v1/drops/{id}/x/reservations")),
            (Method::POST, format!("/api/v2/drops/{id}/reservations")),
        ] {
            assert_eq!(target(method.clone(), &path), None, "{method} {path}");
        }
    }
}
