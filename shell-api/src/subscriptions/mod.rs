//! Subscriptions (API.md, "Subscriptions"; DESIGN.md guarantee 14): subscribing to a product of kind
//! `subscription`, renewals charged exactly once per period, dunning, the member's controls, price changes that
//! need the member's consent, and the seller's list of subscribers (the dashboard's figures and the sales are
//! `shop/`'s, read from these tables).
//!
//! One charge per period: every charge attempt has an id derived from (subscription, period start, attempt), which
//! is also the gateway's idempotency key, and Postgres stores at most one paid charge per subscription and period
//! (a partial unique index). Renewers claim due subscriptions with `FOR NO KEY UPDATE SKIP LOCKED` and hold the
//! claim until the transaction that records the outcome commits; a card attempt is written `pending` and committed
//! before the gateway is asked, so a renewer that dies after the gateway's approval leaves the attempt behind and
//! the next renewer asks again with the same key, which the gateway answers with its first answer.
//!
//! - `model.rs`: the rows and wire types, periods and charge ids.
//! - `gateway.rs`: card charges through the engine's gateway, recorded by idempotency key in Postgres.
//! - `subscribe.rs`: subscribing (the first period charged at once).
//! - `renew.rs`: renewals and dunning (`flashsale renew`, and every minute in `serve`).
//! - `member.rs`: reading, cancelling, pausing, resuming, changing the payment, accepting a price.
//! - `seller.rs`: a seller's subscribers.

pub mod gateway;
pub mod member;
pub mod model;
pub mod renew;
pub mod seller;
pub mod subscribe;

use axum::routing::{get, post, put};

/// This module's part of the OpenAPI document (`crate::openapi`): every handler the router names.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        subscribe::create_subscription,
        member::list_mine,
        member::get_subscription,
        member::cancel,
        member::pause,
        member::resume,
        member::change_payment,
        member::charges,
        member::accept_price,
        seller::subscribers,
    ),
    tags((name = "subscriptions", description = "Subscriptions: periods charged once, dunning, pause, price consent"))
)]
pub struct Doc;

pub fn router() -> crate::Routes {
    crate::Routes::new()
        .route(api!("/subscriptions"), post(subscribe::create_subscription))
        .route(api!("/members/me/subscriptions"), get(member::list_mine))
        .route(api!("/subscriptions/{id}"), get(member::get_subscription))
        .route(api!("/subscriptions/{id}/cancel"), post(member::cancel))
        .route(api!("/subscriptions/{id}/pause"), post(member::pause))
        .route(api!("/subscriptions/{id}/resume"), post(member::resume))
        .route(
            api!("/subscriptions/{id}/payment"),
            put(member::change_payment),
        )
        .route(api!("/subscriptions/{id}/charges"), get(member::charges))
        .route(
            api!("/subscriptions/{id}/accept-price"),
            post(member::accept_price),
        )
        .route(api!("/sellers/me/subscriptions"), get(seller::subscribers))
}
