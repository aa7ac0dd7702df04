//! Operations: tools for the people who run flashsale (today `flashsale reconcile`).

pub mod reconcile;
