//! The flashsale load harness, on goose: scenarios that drive the HTTP API the way buyers, shoppers and readers
//! do, with goose measuring every request, writing its HTML/JSON report and judging `--threshold` rules; after a
//! drop run the engine's invariants are verified from the API and from Postgres. Beside goose, `rate` offers a
//! constant arrival rate over raw hyper connections, for latency without coordinated omission.
//!
//! `client` (one API call through a goose user), `setup` (members, products, drops, before anything is
//! measured), the scenarios `drop_funnel`, `browse`, `feed`,
//! `shopping` (with the shop's own checks), `launch` (the fair launches, `queue` and `draw`, with theirs),
//! `subscribe` (renewals through `flashsale renew` during the run) and `campaign` (one campaign funded and one
//! refunded, with their checks in Postgres and the gateway's ledger), `attack` (goose's options and run), `verify`
//! (pure invariant checks), `summary` (what we print after goose's report), `report` (goose's HTML report made to
//! draw offline, with the vendored ECharts inline), `rate`, and `run` (one function per
//! subcommand). `chaos` is a world of its own: it starts the servers it tests, injects faults on a seeded
//! schedule, records a history of every call and judges it.

pub mod attack;
pub mod browse;
pub mod burst;
pub mod campaign;
pub mod chaos;
pub mod client;
pub mod config;
pub mod drop_funnel;
pub mod feed;
pub mod launch;
pub mod rate;
pub mod report;
pub mod run;
pub mod setup;
pub mod shopping;
pub mod subscribe;
pub mod summary;
pub mod verify;

/// Locks a harness tally. Only pushes, pops and counts run under these locks, so a poisoned one (a user task that
/// panicked) still holds usable records: the run goes on and reports them.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
