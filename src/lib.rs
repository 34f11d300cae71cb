//! referral-rewards: recomputes referral-program rewards from a web application's
//! authoritative database state and writes the desired values back idempotently.
//!
//! The data path, one module per arrow:
//! `config` → `store` (snapshot) → `program::slots::rules` (an outcome per referred user, with the
//! shared `program::fraud` rules) → `program::slots::compute` and `rewards` (per referrer) →
//! `program::slots::plan` (desired vs current, digest) → `store` (apply) → `summary`.
//! `engine` runs that line once; the binary and the scheduler are thin callers.

pub mod audit_page;
pub mod config;
pub mod demo;
pub mod diff;
pub mod engine;
pub mod explain;
mod fault;
pub mod history;
pub mod ids;
pub mod instant;
pub mod program;
pub mod report;
pub mod serve;
pub mod snapshot;
pub mod store;
pub mod summary;
