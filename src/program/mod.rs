//! Reward programs, one module each: the slots program ([`slots`]), the grant programs
//! ([`grants`]) and the fraud rules every program shares ([`fraud`]).

pub mod fraud;
pub mod grants;
pub mod slots;

/// Maps keyed by user id, hundreds of thousands of entries per run: foldhash, not SipHash
/// (the keys are ids from the run's own snapshot, not attacker-chosen).
pub type Fast<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The set form of [`Fast`].
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
