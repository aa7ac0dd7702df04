//! The flashsale load driver: plain tokio + reqwest scenarios that drive the HTTP API the way buyers do, measure
//! every request, then verify the engine's invariants from the API and from Postgres and write a report.
//!
//! The parts are kept apart so a later goose harness can take them over one by one: `api` (one HTTP call,
//! measured and bounded), `metrics` (samples to percentiles), `drop_funnel` (the scenario), `verify` (pure
//! invariant checks over observed numbers) and `report` (the table on stdout and the JSON file).

pub mod api;
pub mod config;
pub mod drop_funnel;
pub mod metrics;
pub mod report;
pub mod verify;
