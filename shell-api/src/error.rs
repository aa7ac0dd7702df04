//! The one place where failures become HTTP statuses and JSON error bodies.
//!
//! Handlers return `Result<_, ApiError>`. Client mistakes carry a status and a snake_case code; internal
//! failures are logged here with their detail and answered with a generic 500, so nothing internal leaks.

use std::borrow::Cow;
use std::collections::BTreeMap;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// An error answer: status, machine code, human message, and optional per-field reasons.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: Cow<'static, str>,
    message: Cow<'static, str>,
    fields: Option<BTreeMap<String, String>>,
    retry_after_seconds: Option<u32>,
    source: Option<anyhow::Error>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            fields: None,
            retry_after_seconds: None,
            source: None,
        }
    }

    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn unauthorized(
        code: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "you may not do this to this resource",
        )
    }

    pub fn not_found(code: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, "not found")
    }

    pub fn conflict(
        code: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 422 with one reason per offending field.
    pub fn validation(fields: BTreeMap<String, String>) -> Self {
        let mut err = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            "validation failed",
        );
        err.fields = Some(fields);
        err
    }

    /// 422 for a single field.
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::validation(BTreeMap::from([(field.to_owned(), reason.into())]))
    }

    /// 429: the caller should come back after `retry_after_seconds`.
    pub fn too_many_requests(retry_after_seconds: u32) -> Self {
        let mut err = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            "too many requests in flight, retry shortly",
        );
        err.retry_after_seconds = Some(retry_after_seconds);
        err
    }

    /// 503: a dependency or the service itself cannot take this now.
    pub fn unavailable(code: impl Into<Cow<'static, str>>, retry_after_seconds: u32) -> Self {
        let mut err = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code,
            "temporarily unavailable, retry shortly",
        );
        err.retry_after_seconds = Some(retry_after_seconds);
        err
    }

    /// 500. The detail is logged, never sent.
    pub fn internal(source: impl Into<anyhow::Error>) -> Self {
        let mut err = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal server error",
        );
        err.source = Some(source.into());
        err
    }

    /// Names the fields (or ids) an error is about, as a 409 `out_of_stock` names the products short of stock.
    pub fn with_fields(mut self, fields: BTreeMap<String, String>) -> Self {
        self.fields = Some(fields);
        self
    }

    pub fn with_message(mut self, message: impl Into<Cow<'static, str>>) -> Self {
        self.message = message.into();
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The JSON body. Refusals such as `sold_out` are the hot path's common answer: a code and message that need
    /// no escaping (every one the service writes) are copied in as they are, the same bytes serde writes for them
    /// (a test holds the two equal); anything else goes through serde.
    fn body(&self) -> Vec<u8> {
        // serde_json escapes only `"`, `\` and control characters.
        let plain = |text: &str| text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
        if self.fields.is_none() && plain(&self.code) && plain(&self.message) {
            let mut out = Vec::with_capacity(36 + self.code.len() + self.message.len());
            out.extend_from_slice(br#"{"error":{"code":""#);
            out.extend_from_slice(self.code.as_bytes());
            out.extend_from_slice(br#"","message":""#);
            out.extend_from_slice(self.message.as_bytes());
            out.extend_from_slice(br#""}}"#);
            return out;
        }
        self.serde_body()
    }

    /// The JSON body as serde writes it: the `ErrorBody` the OpenAPI document shows (only errors with fields or text to
    /// escape come here, so its copies are off the hot path).
    fn serde_body(&self) -> Vec<u8> {
        serde_json::to_vec(&ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.to_string(),
                fields: self.fields.clone(),
            },
        })
        .unwrap_or_else(|_| {
            br#"{"error":{"code":"internal","message":"internal server error"}}"#.to_vec()
        })
    }

    pub fn code(&self) -> &str {
        &self.code
    }

    /// Replaces the code (for an error built by a constructor of the right status, such as a 429 with its
    /// `Retry-After`).
    pub fn set_code(&mut self, code: impl Into<Cow<'static, str>>) {
        self.code = code.into();
    }
}

/// The error body of every 4xx and 5xx answer: `{"error": {"code", "message", "fields"?}}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong, for programs (`code`) and for people (`message`).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A snake_case code such as `sold_out` or `validation`.
    #[schema(example = "sold_out")]
    pub code: String,
    pub message: String,
    /// For `validation` (and a few conflicts): one reason per offending field or id.
    #[schema(required = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<BTreeMap<String, String>>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Some(source) = &self.source {
            tracing::error!(error = ?source, "internal error");
        }
        let body = self.body();
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if let Some(seconds) = self.retry_after_seconds {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// An exhausted pool or a refused connection: the database is the problem, not the request.
impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        tracing::warn!(error = %err, "database pool unavailable");
        Self::unavailable("database_unavailable", 1)
    }
}

/// Postgres `text` cannot hold NUL (U+0000): a field that carries one is refused with this reason, 422 here
/// rather than a 500 from Postgres.
pub const NUL_REASON: &str = "must not contain NUL characters";

/// Whether `text` can be stored in a Postgres `text` column.
pub fn storable(text: &str) -> bool {
    !text.contains('\0')
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(err: tokio_postgres::Error) -> Self {
        Self::of_db_error(&err).unwrap_or_else(|| Self::internal(err))
    }
}

impl ApiError {
    /// A Postgres error that is not a server fault: an outage (503) or text it cannot store (422); `None` for the
    /// rest, which are internal.
    fn of_db_error(err: &tokio_postgres::Error) -> Option<Self> {
        if err.is_closed() || err.as_db_error().is_none() && err.code().is_none() {
            // Connection-level failures (server gone, socket closed) are a dependency outage.
            tracing::warn!(error = %err, "database connection failed");
            return Some(Self::unavailable("database_unavailable", 1));
        }
        if err.code() == Some(&tokio_postgres::error::SqlState::CHARACTER_NOT_IN_REPERTOIRE) {
            // The backstop of the checks at the edge: text Postgres cannot store (NUL) is the client's input,
            // never a server fault. The field is unknown here, so the body names it `body`.
            tracing::warn!(error = %err, "text with NUL reached Postgres; a field check is missing");
            return Some(Self::invalid("body", NUL_REASON));
        }
        None
    }

    /// The answer to an engine error several requests share (the failed load of a drop they all waited on): the
    /// one the error inside would have, its source kept as text where it is not the request's own.
    fn of_shared(err: std::sync::Arc<engine::EngineError>) -> Self {
        use engine::EngineError as E;
        match std::sync::Arc::try_unwrap(err) {
            Ok(err) => err.into(),
            Err(shared) => match &*shared {
                E::Pool(err) => {
                    tracing::warn!(error = %err, "database pool unavailable");
                    Self::unavailable("database_unavailable", 1)
                }
                E::Db(err) => Self::of_db_error(err)
                    .unwrap_or_else(|| Self::internal(anyhow::anyhow!("{err}"))),
                E::StorageUnavailable(_) => Self::unavailable("storage_unavailable", 1)
                    .with_message("the purchase could not be stored; nothing was charged, retry"),
                E::Shared(inner) => Self::of_shared(std::sync::Arc::clone(inner)),
                // The rest are copied, not shared (`EngineError::shared`); a restore that does not add up is ours.
                other => Self::internal(anyhow::anyhow!("{other}")),
            },
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        Self::internal(err)
    }
}

/// Maps a unique/foreign-key/check violation to a client error by the constraint's name, so the database stays
/// the single judge of uniqueness (no check-then-insert races).
pub trait OnConstraint<T> {
    fn on_constraint(
        self,
        name: &str,
        map: impl FnOnce() -> ApiError,
    ) -> Result<T, OnConstraintError>;
}

/// Either the mapped client error or the original database error, to be mapped further or converted.
#[derive(Debug)]
pub enum OnConstraintError {
    Mapped(ApiError),
    Db(tokio_postgres::Error),
}

impl From<OnConstraintError> for ApiError {
    fn from(err: OnConstraintError) -> Self {
        match err {
            OnConstraintError::Mapped(api) => api,
            OnConstraintError::Db(db) => db.into(),
        }
    }
}

impl<T> OnConstraint<T> for Result<T, tokio_postgres::Error> {
    fn on_constraint(
        self,
        name: &str,
        map: impl FnOnce() -> ApiError,
    ) -> Result<T, OnConstraintError> {
        self.map_err(|err| {
            let matches = err
                .as_db_error()
                .and_then(|db| db.constraint())
                .is_some_and(|constraint| constraint == name);
            if matches {
                OnConstraintError::Mapped(map())
            } else {
                OnConstraintError::Db(err)
            }
        })
    }
}

impl<T> OnConstraint<T> for Result<T, OnConstraintError> {
    fn on_constraint(
        self,
        name: &str,
        map: impl FnOnce() -> ApiError,
    ) -> Result<T, OnConstraintError> {
        match self {
            Err(OnConstraintError::Db(err)) => Err(err).on_constraint(name, map),
            other => other,
        }
    }
}

/// Collects per-field reasons, then fails once with all of them.
#[derive(Debug, Default)]
pub struct Fields(BTreeMap<String, String>);

impl Fields {
    pub fn check(&mut self, ok: bool, field: &str, reason: &str) -> &mut Self {
        if !ok && !self.0.contains_key(field) {
            self.0.insert(field.to_owned(), reason.to_owned());
        }
        self
    }

    pub fn add(&mut self, field: &str, reason: impl Into<String>) -> &mut Self {
        self.0.entry(field.to_owned()).or_insert(reason.into());
        self
    }

    /// The value of one field's check, or `None` after recording why it failed. Check every field before
    /// combining the values, so one answer names all the bad fields.
    pub fn take<T>(&mut self, field: &str, checked: Result<T, &'static str>) -> Option<T> {
        checked.map_err(|reason| self.add(field, reason)).ok()
    }

    /// Fails with every recorded reason, or returns `value`, built from the checked fields with `?`.
    pub fn into_result<T>(mut self, value: Option<T>) -> Result<T, ApiError> {
        self.finish()?;
        value.ok_or_else(|| {
            ApiError::internal(anyhow::anyhow!("every field passed but no value was built"))
        })
    }

    pub fn finish(&mut self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::validation(std::mem::take(&mut self.0)))
        }
    }
}

/// The engine's refusals, in the API's words.
impl From<engine::EngineError> for ApiError {
    fn from(err: engine::EngineError) -> Self {
        use engine::EngineError as E;
        match err {
            E::DropNotFound => Self::not_found("drop_not_found").with_message("no such drop"),
            E::NotOpen => Self::conflict("not_open", "the drop is not open yet"),
            E::Closed => Self::conflict("closed", "the drop is closed"),
            E::SoldOut => Self::conflict("sold_out", "sold out"),
            E::NotAdmitted => Self::new(
                StatusCode::FORBIDDEN,
                "not_admitted",
                "this drop's holds are given by its draw (enter it: POST .../entries) or its waiting room (join it: \
                 POST .../queue, then reserve with the Admission-Pass it gives)",
            ),
            E::NotAQueue => Self::conflict(
                "not_a_queue",
                "this drop has no waiting room; reserve it with POST .../reservations",
            ),
            E::LimitExceeded => {
                Self::conflict("limit_exceeded", "per-member limit reached for this drop")
            }
            E::InvalidQuantity => Self::invalid(
                "quantity",
                "must be between 1 and the drop's per-member limit",
            ),
            E::Overloaded => Self::too_many_requests(1),
            E::GateUnavailable(_) => Self::unavailable("gate_unavailable", 1)
                .with_message("the stock authority cannot be reached; nothing was reserved"),
            E::ReservationNotFound => {
                Self::not_found("reservation_not_found").with_message("no such reservation")
            }
            E::NotOwner => Self::forbidden(),
            E::HoldExpired => Self::conflict("hold_expired", "the hold expired before payment"),
            E::AlreadyReleased(reason) => Self::conflict(
                "already_released",
                format!(
                    "the hold was already released ({})",
                    engine::types::reason_name(reason)
                ),
            ),
            E::AlreadyPaid => Self::conflict("already_paid", "the reservation is already paid"),
            E::PaymentInFlight => Self::conflict(
                "payment_in_progress",
                "a payment for this reservation is in progress",
            ),
            E::PaymentDeclined => Self::new(
                StatusCode::PAYMENT_REQUIRED,
                "payment_declined",
                "the payment was declined; the hold is released",
            ),
            E::PaymentUnavailable => Self::unavailable("payment_unavailable", 1)
                .with_message("the payment gateway is unavailable; the hold is kept, retry"),
            E::StorageUnavailable(_) => Self::unavailable("storage_unavailable", 1)
                .with_message("the purchase could not be stored; nothing was charged, retry"),
            E::Pool(err) => err.into(),
            E::Db(err) => err.into(),
            E::Shared(err) => Self::of_shared(err),
            err @ E::Restore(_) => Self::internal(err),
        }
    }
}

/// Checks one text field: present when `required`, not blank, at most `chars_max` characters, and free of NUL
/// (which Postgres text cannot store, so it must be a 422 here rather than a 500 there).
pub(crate) fn check_text(
    fields: &mut Fields,
    field: &str,
    value: Option<&str>,
    required: bool,
    chars_max: usize,
) {
    match value {
        None if required => {
            fields.add(field, "is required");
        }
        None => {}
        Some(text) => {
            fields
                .check(!text.trim().is_empty(), field, "must not be empty")
                .check(
                    text.chars().count() <= chars_max,
                    field,
                    &format!("must be at most {chars_max} characters"),
                )
                .check(storable(text), field, NUL_REASON);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reasons(value: Option<&str>, required: bool, max: usize) -> Option<String> {
        let mut fields = Fields::default();
        check_text(&mut fields, "f", value, required, max);
        fields.finish().err().map(|err| err.code().to_owned())
    }

    #[test]
    fn text_rules() {
        assert_eq!(reasons(Some("ok"), true, 5), None);
        assert_eq!(reasons(None, false, 5), None);
        assert_eq!(reasons(None, true, 5).as_deref(), Some("validation"));
        assert_eq!(
            reasons(Some("  \n"), true, 5).as_deref(),
            Some("validation")
        );
        assert_eq!(
            reasons(Some("123456"), true, 5).as_deref(),
            Some("validation")
        );
        assert_eq!(
            reasons(Some("a\0b"), true, 5).as_deref(),
            Some("validation")
        );
        // Characters, not bytes: five Hangul syllables are 15 bytes and still fit.
        assert_eq!(reasons(Some("안녕하세요"), true, 5), None);
    }

    /// A failed load that many requests waited on answers each of them as the failure itself would: Postgres away
    /// is a 503 `database_unavailable` for every one, not a 500 for those that did not run the load.
    #[test]
    fn a_shared_engine_error_answers_as_the_error_inside() {
        use deadpool_postgres::{PoolError, TimeoutType};
        use engine::EngineError;
        let direct = ApiError::from(EngineError::Pool(PoolError::Timeout(TimeoutType::Wait)));
        let shared = std::sync::Arc::new(EngineError::Pool(PoolError::Timeout(TimeoutType::Wait)));
        let held_by_others = std::sync::Arc::clone(&shared);
        let one_of_many = ApiError::from(EngineError::Shared(shared));
        let last = ApiError::from(EngineError::Shared(held_by_others));
        for answer in [&one_of_many, &last] {
            assert_eq!(
                (answer.status(), answer.code()),
                (direct.status(), direct.code())
            );
        }
        assert_eq!(direct.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(direct.code(), "database_unavailable");
        // Held by another request too: answered from a reference.
        let restore = std::sync::Arc::new(EngineError::Restore(
            engine::core::RestoreError::ZeroQuantity(uuid::Uuid::nil()),
        ));
        let answer = ApiError::from(EngineError::Shared(std::sync::Arc::clone(&restore)));
        assert_eq!(answer.status(), StatusCode::INTERNAL_SERVER_ERROR);
        drop(restore);
    }

    #[test]
    fn an_error_body_is_the_bytes_serde_writes() {
        let fields = BTreeMap::from([("quantity".to_owned(), "must be \"1\"".to_owned())]);
        let errors = [
            ApiError::new(StatusCode::CONFLICT, "sold_out", "the drop is sold out"),
            ApiError::unavailable("gate_unavailable", 1),
            ApiError::invalid("quantity", "must be a positive whole number"),
            ApiError::new(StatusCode::BAD_REQUEST, "bad", "a \"quoted\" word"),
            ApiError::new(StatusCode::BAD_REQUEST, "bad", "a back\\slash"),
            ApiError::new(StatusCode::BAD_REQUEST, "bad", "two\nlines\tand\u{1}"),
            ApiError::new(StatusCode::BAD_REQUEST, "bad", "non-ASCII é ✓ and \u{7f}"),
            ApiError::new(StatusCode::BAD_REQUEST, "bad\"code", "plain"),
            ApiError::new(StatusCode::BAD_REQUEST, "", ""),
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", "bad").with_fields(fields),
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad",
                format!("id {}", uuid::Uuid::nil()),
            ),
        ];
        for err in &errors {
            assert_eq!(
                String::from_utf8(err.body()).unwrap(),
                String::from_utf8(err.serde_body()).unwrap()
            );
        }
    }
}
