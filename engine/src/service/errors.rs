//! Why the engine refused, as one error type for the HTTP layer to map.

use std::sync::Arc;

use crate::core::{ReleaseReason, ReserveRejection, TransitionError};
use crate::gate::GateUnavailable;
use crate::writer::WriteError;

/// Why the engine refused. Hot-path outcomes (sold out, limit) are ordinary variants, not failures.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no such drop")]
    DropNotFound,
    #[error("the drop is not open yet")]
    NotOpen,
    #[error("the drop is closed")]
    Closed,
    #[error("this drop's holds are given by its draw or its waiting room")]
    NotAdmitted,
    #[error("this drop has no waiting room")]
    NotAQueue,
    #[error("sold out")]
    SoldOut,
    #[error("per-member limit reached")]
    LimitExceeded,
    #[error("quantity must be between 1 and the per-member limit")]
    InvalidQuantity,
    #[error("too many requests in flight")]
    Overloaded,
    #[error(transparent)]
    GateUnavailable(#[from] GateUnavailable),
    #[error("no such reservation")]
    ReservationNotFound,
    #[error("not your reservation")]
    NotOwner,
    #[error("the hold expired")]
    HoldExpired,
    #[error("the hold was already released")]
    AlreadyReleased(ReleaseReason),
    #[error("the reservation is already paid")]
    AlreadyPaid,
    #[error("a payment for this reservation is in progress")]
    PaymentInFlight,
    #[error("payment declined")]
    PaymentDeclined,
    #[error("the payment gateway is unavailable")]
    PaymentUnavailable,
    #[error("the purchase could not be stored")]
    StorageUnavailable(#[source] WriteError),
    #[error("stored state of a drop does not add up: {0}")]
    Restore(#[from] crate::core::RestoreError),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// An error that several requests share: the failed load of a drop they all waited on (`Engine::spec`). Answer
    /// it as the error inside.
    #[error(transparent)]
    Shared(Arc<EngineError>),
}

impl EngineError {
    /// This request's copy of an error it shares with others: the error itself where it can be copied (so a caller
    /// can still match `DropNotFound`), else `Shared`.
    pub(super) fn shared(err: Arc<EngineError>) -> EngineError {
        err.copied().unwrap_or(EngineError::Shared(err))
    }

    /// A copy of this error, for the variants that can be copied (all but those carrying a source error).
    fn copied(&self) -> Option<EngineError> {
        use EngineError as E;
        Some(match self {
            E::DropNotFound => E::DropNotFound,
            E::NotOpen => E::NotOpen,
            E::Closed => E::Closed,
            E::NotAdmitted => E::NotAdmitted,
            E::NotAQueue => E::NotAQueue,
            E::SoldOut => E::SoldOut,
            E::LimitExceeded => E::LimitExceeded,
            E::InvalidQuantity => E::InvalidQuantity,
            E::Overloaded => E::Overloaded,
            E::GateUnavailable(unavailable) => E::GateUnavailable(unavailable.clone()),
            E::ReservationNotFound => E::ReservationNotFound,
            E::NotOwner => E::NotOwner,
            E::HoldExpired => E::HoldExpired,
            E::AlreadyReleased(reason) => E::AlreadyReleased(*reason),
            E::AlreadyPaid => E::AlreadyPaid,
            E::PaymentInFlight => E::PaymentInFlight,
            E::PaymentDeclined => E::PaymentDeclined,
            E::PaymentUnavailable => E::PaymentUnavailable,
            E::StorageUnavailable(_) | E::Restore(_) | E::Db(_) | E::Pool(_) | E::Shared(_) => {
                return None
            }
        })
    }
}

impl From<ReserveRejection> for EngineError {
    fn from(rejection: ReserveRejection) -> Self {
        match rejection {
            ReserveRejection::SoldOut => EngineError::SoldOut,
            ReserveRejection::LimitExceeded => EngineError::LimitExceeded,
            ReserveRejection::InvalidQuantity => EngineError::InvalidQuantity,
        }
    }
}

impl From<TransitionError> for EngineError {
    fn from(err: TransitionError) -> Self {
        match err {
            TransitionError::NotFound => EngineError::ReservationNotFound,
            TransitionError::NotOwner => EngineError::NotOwner,
            TransitionError::Expired => EngineError::HoldExpired,
            TransitionError::AlreadyReleased(reason) => EngineError::AlreadyReleased(reason),
            TransitionError::AlreadyPaid => EngineError::AlreadyPaid,
            TransitionError::PaymentInFlight | TransitionError::NotPaying => {
                EngineError::PaymentInFlight
            }
        }
    }
}
