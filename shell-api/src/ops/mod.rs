//! Operations: the health and metrics routes, and tools for the people who run flashsale (`flashsale reconcile`).

pub mod health;
pub mod reconcile;

use axum::routing::get;

use crate::Routes;

/// Health and metrics.
pub fn router() -> Routes {
    Routes::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(crate::metrics::scrape))
}

/// Health and metrics in the document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(health::healthz, health::readyz, crate::metrics::scrape))]
pub struct Doc;
