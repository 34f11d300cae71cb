//! Faults tests inject into the real binary, named in `REFERRAL_REWARDS_FAULT` (comma-separated,
//! `name` or `name=value`): `panic-compute-referrer=ID` (a one-referrer run for ID panics while
//! computing), `panic-in-write` (inside the write transaction), `panic-before-run` (an applying
//! run panics before it takes the lock), `panic-decoding-referrer=ID` (PostgreSQL: decoding the
//! snapshot read with the run's start panics). They show that a panic fails one run, never the
//! process, and never leaves a run `running`.

/// The variable, read once: a one-referrer run asks on its decode path, which should not pay
/// for a lookup of the environment each time.
static FAULTS: std::sync::LazyLock<Option<String>> =
    std::sync::LazyLock::new(|| std::env::var("REFERRAL_REWARDS_FAULT").ok());

/// The value of fault `name` if it is injected (`""` for a fault named without a value).
pub(crate) fn fault(name: &str) -> Option<&'static str> {
    FAULTS.as_deref()?.split(',').find_map(|f| {
        let (n, v) = f.trim().split_once('=').unwrap_or((f.trim(), ""));
        (n == name).then_some(v)
    })
}

/// Whether fault `name` is injected for referrer `id`.
pub(crate) fn for_referrer(name: &str, id: i64) -> bool {
    fault(name).is_some_and(|v| v.trim().parse() == Ok(id))
}
