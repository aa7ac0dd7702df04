//! The catalogue: products, regular (shelf) and preorder (drop), seller-owned (`products.rs`), and the search terms
//! members' product searches leave behind (`search.rs`), and restock alerts on sold-out shelf products
//! (`restock.rs`).

pub mod products;
pub mod restock;
pub mod search;

/// The catalogue's part of the OpenAPI document (its search routes are listed with the products).
pub use products::Doc;

/// The catalogue's routes: products and search terms.
pub fn router() -> crate::Routes {
    products::router()
}
