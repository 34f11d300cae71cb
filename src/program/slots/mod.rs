//! The slots program (docs/rules.md §3 and §4): bonus slots and a badge per referrer, following
//! the state up and down. Its rules (candidacy, cooldown, the outcome of each referred user), its
//! desired-state computation (polars, per referrer), its rewards and its plan.

pub mod compute;
pub mod facts;
pub mod plan;
pub mod rewards;
pub mod rules;
