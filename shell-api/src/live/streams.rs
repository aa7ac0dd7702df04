//! What every event stream shares: a permit under the instance's and the member's cap on open streams (429 with
//! `Retry-After` past either), and sign-in by `?access_token=`, because a browser's EventSource cannot send an
//! `Authorization` header.
//!
//! A token in a URL can end up in access logs; the access token is short-lived (`ACCESS_TOKEN_SECONDS`) and a
//! stream lives at most `LIVE_STREAM_MAX_SECONDS`, after which the reconnect checks the token again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::HeaderValue;
use dashmap::DashMap;
use uuid::Uuid;

use crate::auth::AuthMember;
use crate::error::ApiError;
use crate::AppState;

/// Seconds a refused stream is told to wait before it tries again.
const RETRY_AFTER_SECONDS: u32 = 5;

/// Open streams on this instance, in total and per member.
#[derive(Debug)]
pub struct StreamCounter {
    open: AtomicUsize,
    per_member: DashMap<Uuid, usize>,
    max: usize,
    per_member_max: usize,
}

impl StreamCounter {
    pub fn new(max: usize, per_member_max: usize) -> Self {
        Self {
            open: AtomicUsize::new(0),
            per_member: DashMap::new(),
            max,
            per_member_max,
        }
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A permit for one more stream, or 429 when this instance or this member has as many open as allowed.
    pub fn acquire(self: &Arc<Self>, member: Option<Uuid>) -> Result<StreamPermit, ApiError> {
        let refused = || {
            ApiError::too_many_requests(RETRY_AFTER_SECONDS)
                .with_message("too many open event streams; retry later")
        };
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(refused());
        }
        if let Some(member) = member {
            let mut count = self.per_member.entry(member).or_insert(0);
            if *count >= self.per_member_max {
                drop(count);
                self.open.fetch_sub(1, Ordering::AcqRel);
                self.per_member.remove_if(&member, |_, count| *count == 0);
                return Err(refused());
            }
            *count += 1;
        }
        Ok(StreamPermit {
            counter: Arc::clone(self),
            member,
        })
    }
}

/// One open stream; dropping it (the stream ended or the client went away) gives the place back.
#[derive(Debug)]
pub struct StreamPermit {
    counter: Arc<StreamCounter>,
    member: Option<Uuid>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if let Some(member) = self.member {
            if let Some(mut count) = self.counter.per_member.get_mut(&member) {
                *count = count.saturating_sub(1);
            }
            self.counter
                .per_member
                .remove_if(&member, |_, count| *count == 0);
        }
        self.counter.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The caller of a stream route, signed in by `Authorization: Bearer` or `?access_token=`; `None` when neither is
/// given. A token that is given but invalid is a 401, as anywhere else.
#[derive(Debug, Clone, Copy)]
pub struct StreamCaller(pub Option<AuthMember>);

impl FromRequestParts<AppState> for StreamCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if !parts.headers.contains_key(AUTHORIZATION) {
            let Some(token) = query_token(parts.uri.query()) else {
                return Ok(Self(None));
            };
            let value = HeaderValue::try_from(format!("Bearer {token}"))
                .map_err(|_| ApiError::unauthorized("invalid_token", "invalid access token"))?;
            parts.headers.insert(AUTHORIZATION, value);
        }
        AuthMember::from_request_parts(parts, state)
            .await
            .map(|member| Self(Some(member)))
    }
}

/// The `access_token` query parameter (a JWT: URL-safe characters only, so no percent-decoding is needed).
fn query_token(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("access_token="))
        .filter(|token| !token.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_capped_per_instance_and_per_member_and_given_back() {
        let counter = Arc::new(StreamCounter::new(3, 2));
        let member = Uuid::now_v7();
        let a = counter.acquire(Some(member)).unwrap();
        let b = counter.acquire(Some(member)).unwrap();
        let refused = counter.acquire(Some(member)).unwrap_err();
        assert_eq!(refused.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        let anonymous = counter.acquire(None).unwrap();
        assert!(counter.acquire(None).is_err(), "instance cap");
        assert_eq!(counter.open(), 3);
        drop((a, b, anonymous));
        assert_eq!(counter.open(), 0);
        assert!(counter.per_member.is_empty(), "no entry left behind");
        assert!(counter.acquire(Some(member)).is_ok());
    }

    #[test]
    fn the_token_comes_from_the_query() {
        assert_eq!(query_token(Some("a=1&access_token=x.y.z")), Some("x.y.z"));
        assert_eq!(query_token(Some("access_token=")), None);
        assert_eq!(query_token(None), None);
    }
}
