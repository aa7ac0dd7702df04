//! Stores (API.md, "Stores"): a seller's storefront. Sellers create, edit and delete their stores and put their
//! products in them (`store_id`, checked in `catalog/products.rs`); anyone searches active stores and browses one
//! store's products; members follow stores and are told of their drops; admins suspend and restore them.
//!
//! - `storefront.rs`: create, read, search, edit and delete a store, and a store's products.
//! - `follows.rs`: follow and unfollow (idempotent, `follower_count` exact) and the stores I follow.
//! - `suspension.rs`: an admin's suspension and restoration.
//!
//! What a store means elsewhere is said in SQL where the other area reads its own rows, so no area imports this one:
//! the catalogue hides a suspended store's products and answers `store_suspended` to drops and the shop
//! (`catalog::products::IN_SUSPENDED_STORE`), the notifier adds a store's followers to a drop's recipients
//! (`live/notifications.rs`), and migration 0016's triggers keep `product_count` exact whichever statement moves a
//! product. This area imports `catalog` for the product body of a store's product list.

pub mod follows;
pub mod storefront;
pub mod suspension;

use axum::routing::{get, put};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::auth::AuthMember;
use crate::error::ApiError;

/// This area's part of the OpenAPI document: every handler the router names.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(storefront::create, storefront::search, storefront::get, storefront::update, storefront::delete,
        storefront::products, follows::follow, follows::unfollow, follows::my_stores, suspension::set_status),
    tags((name = "stores", description = "Sellers' storefronts: search, follows, suspension"))
)]
pub struct Doc;

pub fn router() -> crate::Routes {
    crate::Routes::new()
        .route(
            api!("/stores"),
            get(storefront::search).post(storefront::create),
        )
        .route(
            api!("/stores/{id}"),
            get(storefront::get)
                .patch(storefront::update)
                .delete(storefront::delete),
        )
        .route(api!("/stores/{id}/products"), get(storefront::products))
        .route(
            api!("/stores/{id}/follow"),
            put(follows::follow).delete(follows::unfollow),
        )
        .route(api!("/members/me/stores"), get(follows::my_stores))
        .route(
            api!("/admin/stores/{id}/status"),
            put(suspension::set_status),
        )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StoreStatus {
    Active,
    Suspended,
}

impl StoreStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreStatus::Active => "active",
            StoreStatus::Suspended => "suspended",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(StoreStatus::Active),
            "suspended" => Some(StoreStatus::Suspended),
            _ => None,
        }
    }
}

/// A store as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Store)]
pub struct StoreBody {
    pub id: Uuid,
    pub seller_id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub status: StoreStatus,
    /// Members who follow it, exact (moved in the follow's transaction).
    pub follower_count: i32,
    /// Its live products, exact (moved by migration 0016's triggers in the statement that moves a product).
    pub product_count: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Every column `StoreBody::from_row` reads, in its order.
pub(crate) const STORE_COLUMNS: &str =
    "id, seller_id, name, description, status, follower_count, product_count, created_at, updated_at";

impl StoreBody {
    /// From a row selected with `STORE_COLUMNS`.
    pub(crate) fn from_row(row: &Row) -> Result<Self, ApiError> {
        let status: &str = row.get(4);
        Ok(Self {
            id: row.get(0),
            seller_id: row.get(1),
            name: row.get(2),
            description: row.get(3),
            status: StoreStatus::parse(status).ok_or_else(|| {
                ApiError::internal(anyhow::anyhow!("unknown store status {status:?}"))
            })?,
            follower_count: row.get(5),
            product_count: row.get(6),
            created_at: row.get(7),
            updated_at: row.get(8),
        })
    }

    /// Whether `caller` may see it: an active store is public, a suspended one only its seller's and admins'.
    pub(crate) fn visible_to(&self, caller: Option<&AuthMember>) -> bool {
        self.status == StoreStatus::Active
            || caller.is_some_and(|caller| caller.id == self.seller_id || caller.is_admin())
    }
}

pub(crate) fn store_not_found() -> ApiError {
    ApiError::not_found("store_not_found").with_message("no such store")
}
