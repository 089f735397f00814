//! The pure domain: payments and their idempotency rules, settlement
//! batches, merchants and ids. Nothing here knows about HTTP, storage or
//! threads; every rule returns its own typed error, which the HTTP layer
//! (its `error` module) alone turns into a status code.

pub mod ids;
pub mod merchants;
pub mod payment;
pub mod settlement;
