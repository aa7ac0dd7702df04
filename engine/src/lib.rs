//! The flash-sale engine: drops, holds, payments and the stock authority. It knows nothing of HTTP or JSON.

pub mod core;
