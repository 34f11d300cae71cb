//! Reward programs, one module each: the slots program ([`slots`]) and the fraud rules every
//! program shares ([`fraud`]).

pub mod fraud;
pub mod slots;
