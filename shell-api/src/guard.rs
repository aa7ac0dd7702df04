//! The layer around every route: a request id, the body read (bounded) before any handler can answer, and a
//! deadline for the answer.
//!
//! - **Request id**: `x-request-id` is taken from the request when it is 1..=128 visible ASCII characters, made
//!   otherwise (a UUIDv7), echoed on the response, and recorded on the request's span, so every log line written
//!   while the request runs carries it.
//! - **Keep-alive survives every error.** A handler may answer before reading the body (401 for a missing token,
//!   404, 409): hyper then cannot reuse the connection, and closes it after the response without saying so, so a
//!   pooled client's next request on it fails. Here the body is read to its end first (it is bounded by
//!   `MAX_BODY_BYTES`, so this is what the JSON extractors would read anyway), and a body over the bound is answered
//!   413 with `Connection: close` at once, without reading it.
//! - **Deadline**: a response head not ready within `REQUEST_TIMEOUT_MS` is answered 503 `request_timeout` with
//!   `Retry-After`. Only the head: event streams go on. Work that must not stop halfway (a payment, an order) moves
//!   to a task of its own when it is dropped unfinished (`run_to_completion`), so neither a deadline nor a client
//!   that goes away cuts it short.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::MatchedPath;
use axum::http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use http_body_util::{BodyExt, Limited};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::error::ApiError;

pub const REQUEST_ID: &str = "x-request-id";
/// Longest request id taken from a client.
pub const REQUEST_ID_CHARS_MAX: usize = 128;

#[derive(Debug, Clone, Copy)]
pub struct GuardConfig {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct GuardLayer(Arc<GuardConfig>);

impl GuardLayer {
    pub fn new(config: GuardConfig) -> Self {
        Self(Arc::new(config))
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            config: Arc::clone(&self.0),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Guard<S> {
    inner: S,
    config: Arc<GuardConfig>,
}

impl<S> Service<Request<Body>> for Guard<S>
where
    S: Service<Request<Body>, Response = Response, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The clone that was made ready serves this request; the fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = Arc::clone(&self.config);
        let route = request.extensions().get::<MatchedPath>().cloned();
        let call = Call::begin(&request);
        let span = call.span();
        Box::pin(
            async move {
                let response = match read_body(request, config.max_body_bytes).await {
                    Ok(request) => {
                        let answer = async {
                            inner
                                .call(request)
                                .await
                                .unwrap_or_else(|never| match never {})
                        };
                        within(config.request_timeout, answer).await
                    }
                    Err(refusal) => refusal,
                };
                Ok(call.end(response, route.as_ref().map(MatchedPath::as_str)))
            }
            .instrument(span),
        )
    }
}

/// What the guard keeps of a request while it is served: its id (echoed on the answer) and, when metrics are on,
/// when it came and its method. Shared with the hot path (`hot.rs`), which answers its route before routing.
pub(crate) struct Call {
    id: HeaderValue,
    timed: Option<(Instant, Method)>,
}

impl Call {
    pub(crate) fn begin(request: &Request<Body>) -> Self {
        Self {
            id: request_id(request),
            // Timed only when metrics are on; the method is taken before the request moves on.
            timed: crate::metrics::enabled().then(|| (Instant::now(), request.method().clone())),
        }
    }

    /// The request's span. Only the id: fields are formatted when the span opens, on every request.
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::info_span!("request", id = %self.id.to_str().unwrap_or_default())
    }

    /// The answer with the request id on it, counted under its route template.
    pub(crate) fn end(self, mut response: Response, route: Option<&str>) -> Response {
        if let Some((started, method)) = self.timed {
            crate::metrics::record_request(
                route,
                &method,
                response.status().as_u16(),
                started.elapsed(),
            );
        }
        response.headers_mut().insert(REQUEST_ID, self.id);
        response
    }
}

/// `work`'s answer, or 503 `request_timeout` when its head is not ready within `timeout`.
pub(crate) async fn within(timeout: Duration, work: impl Future<Output = Response>) -> Response {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            tracing::warn!("no answer within the request timeout");
            ApiError::unavailable("request_timeout", 1)
                .with_message("the request took too long; try again")
                .into_response()
        })
}

/// The client's request id when it is usable, a new one otherwise.
fn request_id(request: &Request<Body>) -> HeaderValue {
    if let Some(id) = request.headers().get(REQUEST_ID) {
        let bytes = id.as_bytes();
        if (1..=REQUEST_ID_CHARS_MAX).contains(&bytes.len())
            && bytes.iter().all(|b| b.is_ascii_graphic())
        {
            return id.clone();
        }
    }
    let mut buf = uuid::Uuid::encode_buffer();
    let text = uuid::Uuid::now_v7().simple().encode_lower(&mut buf);
    // A UUID's hex digits are always a valid header value.
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// The request with its body read to the end, or the answer that refuses it (with `Connection: close`, since the
/// rest of the body is left unread on the connection).
async fn read_body(request: Request<Body>, max_bytes: usize) -> Result<Request<Body>, Response> {
    let headers = request.headers();
    let length = content_length(headers);
    let chunked = headers.contains_key(TRANSFER_ENCODING);
    if matches!(length, Some(0) | None) && !chunked {
        return Ok(request);
    }
    let (parts, body) = request.into_parts();
    let bytes = body_bytes(length, body, max_bytes).await?;
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// A body read to its end within `max_bytes`, or the answer that refuses it, as `read_body`.
pub(crate) async fn body_bytes(
    length: Option<u64>,
    body: Body,
    max_bytes: usize,
) -> Result<Bytes, Response> {
    if length.is_some_and(|n| n > max_bytes as u64) {
        return Err(closing(too_large()));
    }
    match Limited::new(body, max_bytes).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(closing(too_large())),
        Err(_) => Err(closing(
            ApiError::bad_request("the request body could not be read").into_response(),
        )),
    }
}

fn too_large() -> Response {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "request body too large",
    )
    .into_response()
}

fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Runs `work` to its end even if the caller stops waiting (the client went away, the request's deadline passed),
/// so a charge is never left without its order or refund, nor a hold left `paying`. The work runs in the caller's
/// task, polled in place, and moves to a task of its own only if the caller drops it unfinished: a payment that
/// ends normally costs no spawn and no second wake-up (the writer's commit wakes the connection's task itself). A
/// panic in the work answers 500, as a panicking task's `JoinError` did.
pub async fn run_to_completion<T, F>(work: F) -> Result<T, ApiError>
where
    F: Future<Output = Result<T, ApiError>> + Send + 'static,
    T: Send + 'static,
{
    let work = std::panic::AssertUnwindSafe(work.in_current_span()).catch_unwind();
    match (Finishing(Some(Box::pin(work)))).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::internal(anyhow::anyhow!(
            "a task that had to finish panicked"
        ))),
    }
}

/// A future polled in place that, dropped before its end, is spawned to finish on the current runtime (if there is
/// one: at runtime shutdown nothing could run it anyway).
struct Finishing<F>(Option<Pin<Box<F>>>)
where
    F: Future + Send + 'static,
    F::Output: Send + 'static;

impl<F> Future for Finishing<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(work) = self.0.as_mut() else {
            // Polled again after its end: like a finished task's handle, it has nothing more to give.
            return Poll::Pending;
        };
        let output = std::task::ready!(work.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(output)
    }
}

impl<F> Drop for Finishing<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let Some(work) = self.0.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(work);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_dropped_unfinished_finishes_in_a_task_of_its_own() {
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let work = run_to_completion(async move {
            go_rx.await.expect("go");
            done_tx.send(()).expect("done");
            Ok::<_, ApiError>(())
        });
        // Polled once (it waits for `go`), then dropped, as a deadline or a client going away drops it.
        assert!(work.now_or_never().is_none());
        go_tx.send(()).unwrap();
        done_rx
            .await
            .expect("the work finished after its caller stopped waiting");
    }

    #[tokio::test]
    async fn a_panic_in_the_work_answers_500() {
        let answer = run_to_completion(async {
            if std::hint::black_box(true) {
                panic!("a bug in the work");
            }
            Ok::<_, ApiError>(())
        })
        .await;
        let status = answer.unwrap_err().into_response().status();
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
