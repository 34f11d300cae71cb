//! Reward programs. The fraud rules every program shares live in [`fraud`]; the slots program's
//! own rules are in `crate::rules` (SPEC section 3), to move beside it as `program::slots`.

pub mod fraud;
