//! Reward programs, one module each: the slots program ([`slots`]), the grant programs
//! ([`grants`]) and the fraud rules every program shares ([`fraud`]).

pub mod fraud;
pub mod grants;
pub mod slots;
