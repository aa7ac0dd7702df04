//! The flash-sale engine: drops, holds, payments and the stock authority. It knows nothing of HTTP or JSON.
//!
//! `core` is plain code with no I/O (the sharded stock and hold state machine); `gate` puts a stock authority
//! behind a trait; `payment`, `writer` and `store` are the adapters to the outside; `service::Engine` ties them
//! together for the HTTP layer.

pub mod clock;
pub mod core;
pub mod gate;
#[cfg(test)]
mod layering;
pub mod payment;
pub mod service;
pub mod store;
pub mod types;
pub mod writer;

pub use service::{Engine, EngineConfig, EngineError, QueueStatus, Standing, QUEUE_TICK};
pub use types::{QueueCounts, QueueTerms};
