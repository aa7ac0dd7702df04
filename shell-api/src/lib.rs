//! The flashsale HTTP service: auth, members, products, feeds and thin handlers over the engine.
//!
//! Only this crate knows HTTP and JSON. `app(state)` builds the whole service, so tests call it in-process as
//! well as over a real socket (`server::serve`).

/// A route path under the API's base path, `/api/v1`. Routes are declared with their full path rather than nested
/// under the base, because a nested router rebuilds every request's URI and adds a routing layer to the hot path.
macro_rules! api {
    ($path:literal) => {
        concat!("/api/v1", $path)
    };
}

pub mod abuse;
pub mod admin;
pub mod app;
pub mod auth;
pub mod campaigns;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod db;
pub mod drops;
pub mod error;
pub mod extract;
pub mod feeds;
pub mod guard;
pub mod idempotency;
#[cfg(test)]
mod layering;
pub mod live;
pub mod members;
pub mod metrics;
pub mod notify;
pub mod openapi;
pub mod ops;
pub mod pagination;
pub mod server;
pub mod shop;
pub mod stores;
pub mod subscriptions;

pub use app::{
    app, app_from, document, openapi_json, routes, start_engine, start_engine_with_gate, AppInner,
    AppState, Redis, Routes, Settings, Started,
};
pub use catalog::products;
pub use drops::hot::App;
pub use ops::health::{healthz, readyz};
