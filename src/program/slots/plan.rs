//! Desired vs current: what a run would write, and the digest of its results.
//!
//! The plan holds one entry per referrer in scope (and per non-referrer who still holds a
//! reward, to be revoked); the writes are derived from the entries that differ.

use serde::Serialize;

use crate::program::slots::rewards::RewardResult;
use crate::snapshot::Scope;

/// The ledger's field name for the host column.
pub const HOST_FIELD: &str = "subscriptions.referral_bonus_domains";

/// The host column as the snapshot read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HostBonus {
    /// The user has no subscription row.
    NoSubscription,
    Value(i64),
}

/// A write to the host column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostChange {
    /// Compare-and-set: applies only where the column still holds `old`.
    Update { old: i64, new: i64 },
    /// A new subscription row (tier and status from config), only for a bonus above zero.
    Insert { new: i64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlanEntry {
    pub desired: RewardResult,
    /// The `referral_rewards` row, if any.
    pub stored: Option<RewardResult>,
    pub host: HostBonus,
}

impl PlanEntry {
    pub fn referrer_user_id(&self) -> i64 {
        self.desired.referrer_user_id
    }

    /// SPEC section 5's `current_bonus_slots`: the host column, 0 without a subscription.
    pub fn current_bonus_slots(&self) -> i64 {
        match self.host {
            HostBonus::Value(v) => v,
            HostBonus::NoSubscription => 0,
        }
    }

    /// The stored row, or what a missing row reads as.
    pub fn stored_or_zero(&self) -> RewardResult {
        self.stored
            .clone()
            .unwrap_or_else(|| RewardResult::zero(self.referrer_user_id()))
    }

    pub fn reward_changes(&self) -> bool {
        match &self.stored {
            Some(s) => *s != self.desired,
            None => self.desired != RewardResult::zero(self.referrer_user_id()),
        }
    }

    pub fn host_change(&self) -> Option<HostChange> {
        let new = self.desired.bonus_slots;
        match self.host {
            HostBonus::Value(old) if old != new => Some(HostChange::Update { old, new }),
            HostBonus::NoSubscription if new > 0 => Some(HostChange::Insert { new }),
            _ => None,
        }
    }

    pub fn changes_anything(&self) -> bool {
        self.reward_changes() || self.host_change().is_some()
    }

    /// Why this referrer's writes cannot be made, if they cannot: the host column is INTEGER,
    /// and a desired bonus outside its range would fail the whole transaction. Such a referrer
    /// is left unwritten (reward row and host value alike, so the two stay consistent) and
    /// reported, while every other referrer is written. Only the new value matters: an old
    /// value out of range is only compared, which works at any size.
    pub fn write_error(&self) -> Option<String> {
        let new = match self.host_change()? {
            HostChange::Update { new, .. } | HostChange::Insert { new } => new,
        };
        (!(0..=HOST_MAX).contains(&new)).then(|| {
            format!(
                "bonus_slots {new} does not fit {HOST_FIELD} (INTEGER, 0 to {HOST_MAX}); nothing written for this referrer"
            )
        })
    }

    /// Whether a run writes this entry's changes.
    fn writable(&self) -> bool {
        self.write_error().is_none()
    }
}

/// The largest value of the host column (SQL INTEGER).
pub const HOST_MAX: i64 = i32::MAX as i64;

/// One row of the append-only `reward_changes` ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub referrer_user_id: i64,
    pub field: &'static str,
    pub old_value: Option<String>,
    pub new_value: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Ascending by referrer id.
    pub entries: Vec<PlanEntry>,
    pub digest: String,
}

impl Plan {
    /// Joins the computed results with the current state read in the snapshot.
    ///
    /// Users who are not referrers are owed zeros: in a full run every such user with a
    /// non-zero `referral_rewards` row or host column gets an entry (revocation); in a
    /// one-referrer run the named user always gets one.
    pub fn build(
        mut results: Vec<RewardResult>,
        mut stored: Vec<RewardResult>,
        host_bonus: &[(i64, i64)],
        scope: Scope,
    ) -> Plan {
        // A merge of the three lists sorted by user id, rather than maps of the stored rows
        // and host values to look each referrer up in: at 10M users the maps (944k and 832k
        // entries) missed the cache on every insert and lookup (the join 1.3-2.1 s, merged
        // 0.5-0.7 s). The lists
        // come mostly in id order (each the order of its table), which the sorts check in a
        // pass. Each id appears once in each list: the snapshot's primary keys, and the
        // duplicate-subscription check before a plan.
        results.sort_by_key(|r| r.referrer_user_id);
        stored.sort_unstable_by_key(|r| r.referrer_user_id);
        let mut host = host_bonus.to_vec();
        host.sort_unstable();
        let mut results = results.into_iter().peekable();
        let mut stored = stored.into_iter().peekable();
        let mut host = host.into_iter().peekable();
        // The named user of a one-referrer run always gets an entry.
        let mut named = scope.referrer();

        let mut entries = Vec::with_capacity(results.len());
        loop {
            let next = [
                results.peek().map(|r| r.referrer_user_id),
                stored.peek().map(|r| r.referrer_user_id),
                host.peek().map(|h| h.0),
                named,
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(id) = next else { break };
            let desired = results.next_if(|r| r.referrer_user_id == id);
            let computed = desired.is_some();
            let entry = PlanEntry {
                stored: stored.next_if(|r| r.referrer_user_id == id),
                host: host
                    .next_if(|h| h.0 == id)
                    .map_or(HostBonus::NoSubscription, |h| HostBonus::Value(h.1)),
                desired: desired.unwrap_or_else(|| RewardResult::zero(id)),
            };
            let is_named = named == Some(id);
            if is_named {
                named = None;
            }
            // A computed referrer always has an entry; anyone else (not a referrer in this
            // scope) only if it is in scope and holds something to revoke, or is the named user.
            if computed || is_named || (scope.covers(id) && entry.changes_anything()) {
                entries.push(entry);
            }
        }
        let digest = digest(&entries);
        Plan { entries, digest }
    }

    /// The desired values of `ids` (ascending, each with an entry: a computation's referrers),
    /// in their order.
    pub fn desired_of(&self, ids: &[i64]) -> Vec<RewardResult> {
        let mut entries = self.entries.iter();
        ids.iter()
            .map(|&id| {
                entries
                    .find(|e| e.referrer_user_id() == id)
                    .expect("every computed referrer has a plan entry")
                    .desired
                    .clone()
            })
            .collect()
    }

    pub fn reward_upserts(&self) -> impl Iterator<Item = &RewardResult> {
        self.entries
            .iter()
            .filter(|e| e.reward_changes() && e.writable())
            .map(|e| &e.desired)
    }

    pub fn host_changes(&self) -> impl Iterator<Item = (i64, HostChange)> {
        self.entries
            .iter()
            .filter(|e| e.writable())
            .filter_map(|e| e.host_change().map(|c| (e.referrer_user_id(), c)))
    }

    /// The referrers this plan cannot write, each with the reason (see
    /// [`PlanEntry::write_error`]).
    pub fn write_errors(&self) -> Vec<(i64, String)> {
        self.entries
            .iter()
            .filter_map(|e| e.write_error().map(|m| (e.referrer_user_id(), m)))
            .collect()
    }

    /// The ledger rows of this plan, one per changed value; host-column changes only for the
    /// users where the compare-and-set applied (`host_applied`).
    pub fn ledger(&self, host_applied: impl Fn(i64) -> bool) -> Vec<Change> {
        let mut out = Vec::new();
        for e in self.entries.iter().filter(|e| e.writable()) {
            let id = e.referrer_user_id();
            if e.reward_changes() {
                let old = e.stored_or_zero().fields();
                for ((field, old), (_, new)) in old.into_iter().zip(e.desired.fields()) {
                    if old != new {
                        out.push(Change {
                            referrer_user_id: id,
                            field,
                            old_value: old,
                            new_value: new,
                        });
                    }
                }
            }
            if let Some(change) = e.host_change()
                && host_applied(id)
            {
                let (old, new) = match change {
                    HostChange::Update { old, new } => (Some(old.to_string()), new),
                    HostChange::Insert { new } => (None, new),
                };
                out.push(Change {
                    referrer_user_id: id,
                    field: HOST_FIELD,
                    old_value: old,
                    new_value: Some(new.to_string()),
                });
            }
        }
        out
    }

    pub fn stats(&self) -> PlanStats {
        let mut s = PlanStats {
            referrers: self.entries.len() as u64,
            ..PlanStats::default()
        };
        for e in &self.entries {
            // An unwritable referrer moves nothing.
            if !e.writable() {
                s.unwritable += 1;
                continue;
            }
            let (current, desired) = (e.current_bonus_slots(), e.desired.bonus_slots);
            if desired > current {
                s.rewards_up += 1;
            } else if desired < current {
                s.rewards_down += 1;
            }
            s.bonus_delta += desired - current;
            if e.reward_changes() {
                s.reward_rows_to_write += 1;
            }
            if e.host_change().is_some() {
                s.host_values_to_write += 1;
            }
        }
        s
    }
}

/// What a plan would change, before it is applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PlanStats {
    pub referrers: u64,
    /// Referrers whose bonus slots go up (down) against the host column.
    pub rewards_up: u64,
    pub rewards_down: u64,
    /// Sum over referrers of desired minus current bonus slots.
    pub bonus_delta: i64,
    pub reward_rows_to_write: u64,
    pub host_values_to_write: u64,
    /// Referrers whose changes cannot be written ([`Plan::write_errors`]).
    pub unwritable: u64,
}

/// SPEC section 4's result digest: BLAKE3 of the canonical encoding of the per-referrer
/// results, sorted by referrer id, as lowercase hex.
///
/// The canonical encoding is one line per plan entry, each line a compact JSON array of the
/// eleven SPEC section 5 report fields in SPEC order (`referrer_user_id`,
/// `referred_users_total`, `qualified_referrals`, `disqualified_self_referral`,
/// `disqualified_cooldown`, `disqualified_missing_ip`, `disqualified_shared_ip`,
/// `disqualified_duplicate_ip`, `bonus_slots`, `badge`, `current_bonus_slots`), integers in
/// decimal, the badge a JSON string or `null`, followed by `\n`; UTF-8 throughout.
/// Example line: `[42,5,3,0,1,0,1,0,5,"verified_referrer",0]`.
pub fn digest(entries: &[PlanEntry]) -> String {
    let mut hasher = blake3::Hasher::new();
    let mut line = Vec::with_capacity(128);
    for e in entries {
        line.clear();
        canonical_line(e, &mut line);
        hasher.update(&line);
    }
    hasher.finalize().to_hex().to_string()
}

/// One entry's line, written into `out` without building a JSON value (a tenth of a second
/// per million entries went to the values' allocations); the badge is escaped by serde_json.
fn canonical_line(e: &PlanEntry, out: &mut Vec<u8>) {
    let d = &e.desired;
    let mut int = itoa::Buffer::new();
    out.push(b'[');
    for v in [
        d.referrer_user_id,
        d.referred_users_total,
        d.qualified_referrals,
        d.disqualified_self_referral,
        d.disqualified_cooldown,
        d.disqualified_missing_ip,
        d.disqualified_shared_ip,
        d.disqualified_duplicate_ip,
        d.bonus_slots,
    ] {
        out.extend_from_slice(int.format(v).as_bytes());
        out.push(b',');
    }
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &d.badge);
    out.push(b',');
    out.extend_from_slice(int.format(e.current_bonus_slots()).as_bytes());
    out.extend_from_slice(b"]\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: i64, qualified: i64, bonus: i64) -> RewardResult {
        RewardResult {
            qualified_referrals: qualified,
            referred_users_total: qualified,
            bonus_slots: bonus,
            ..RewardResult::zero(id)
        }
    }

    /// The join as lookups by id (the plan before it merged sorted lists): every computed
    /// referrer, then everyone else in scope holding something to revoke, and the named user.
    fn plan_by_lookup(
        results: Vec<RewardResult>,
        stored: Vec<RewardResult>,
        host_bonus: &[(i64, i64)],
        scope: Scope,
    ) -> Vec<PlanEntry> {
        use std::collections::HashMap;
        let stored: HashMap<i64, RewardResult> = stored
            .into_iter()
            .map(|r| (r.referrer_user_id, r))
            .collect();
        let host: HashMap<i64, i64> = host_bonus.iter().copied().collect();
        type Maps = (HashMap<i64, RewardResult>, HashMap<i64, i64>);
        fn entry((stored, host): &mut Maps, desired: RewardResult) -> PlanEntry {
            let id = desired.referrer_user_id;
            PlanEntry {
                stored: stored.remove(&id),
                host: host
                    .remove(&id)
                    .map_or(HostBonus::NoSubscription, HostBonus::Value),
                desired,
            }
        }
        let mut maps: Maps = (stored, host);
        let computed: Vec<i64> = results.iter().map(|r| r.referrer_user_id).collect();
        let mut entries: Vec<PlanEntry> =
            results.into_iter().map(|r| entry(&mut maps, r)).collect();
        let mut others: Vec<i64> = maps.0.keys().chain(maps.1.keys()).copied().collect();
        others.extend(scope.referrer());
        others.sort_unstable();
        others.dedup();
        for id in others.into_iter().filter(|id| !computed.contains(id)) {
            let e = entry(&mut maps, RewardResult::zero(id));
            if scope.referrer() == Some(id) || (scope.covers(id) && e.changes_anything()) {
                entries.push(e);
            }
        }
        entries.sort_by_key(PlanEntry::referrer_user_id);
        entries
    }

    proptest::proptest! {
        // The merge of the sorted lists plans what lookups by id plan, whatever order the
        // lists come in, for every kind of scope.
        #[test]
        fn the_merge_plans_as_lookups_by_id(
            ids in proptest::collection::btree_set(1i64..60, 0..40),
            picks in proptest::collection::vec((0u8..4, 0u8..4, 0u8..3, 0i64..4), 40),
            rotate in 0usize..40,
            scope_kind in 0u8..3,
        ) {
            let (mut results, mut stored, mut host) = (vec![], vec![], vec![]);
            for (&id, &(r, s, h, v)) in ids.iter().zip(&picks) {
                // Each list holds an id at most once, as the snapshot's keys.
                if r > 0 {
                    results.push(result(id, v, v));
                }
                if s > 1 {
                    stored.push(result(id, (v + s as i64) % 4, v));
                } else if s == 1 {
                    stored.push(RewardResult::zero(id));
                }
                if h > 0 {
                    host.push((id, (v + h as i64) % 3));
                }
            }
            let turn = |l: usize| if l == 0 { 0 } else { rotate % l };
            results.sort_by_key(|r| r.referrer_user_id);
            let (a, b, c) = (turn(results.len()), turn(stored.len()), turn(host.len()));
            stored.rotate_left(b);
            host.reverse();
            host.rotate_left(c);
            let scope = match scope_kind {
                0 => Scope::Full,
                1 => Scope::Referrer(ids.iter().nth(turn(ids.len())).copied().unwrap_or(7)),
                _ => Scope::Shard(crate::snapshot::Shard { index: 1, count: 2 }),
            };
            let expected = plan_by_lookup(results.clone(), stored.clone(), &host, scope);
            results.rotate_left(a);
            let plan = Plan::build(results, stored, &host, scope);
            proptest::prop_assert_eq!(&plan.entries, &expected);
            proptest::prop_assert_eq!(plan.digest, digest(&expected));
        }
    }

    #[test]
    fn unchanged_state_plans_no_writes() {
        let r = result(1, 3, 5);
        let plan = Plan::build(vec![r.clone()], vec![r], &[(1, 5)], Scope::Full);
        assert_eq!(plan.reward_upserts().count(), 0);
        assert_eq!(plan.host_changes().count(), 0);
        assert!(plan.ledger(|_| true).is_empty());
    }

    #[test]
    fn a_referrer_without_row_and_zero_result_writes_nothing() {
        let plan = Plan::build(vec![RewardResult::zero(1)], vec![], &[], Scope::Full);
        assert_eq!(plan.entries.len(), 1);
        assert!(!plan.entries[0].changes_anything());
    }

    #[test]
    fn subscription_created_only_for_a_bonus_above_zero() {
        let plan = Plan::build(
            vec![result(1, 3, 5), result(2, 1, 0)],
            vec![],
            &[],
            Scope::Full,
        );
        let changes: Vec<_> = plan.host_changes().collect();
        assert_eq!(changes, [(1, HostChange::Insert { new: 5 })]);
    }

    #[test]
    fn non_referrer_holding_a_bonus_is_revoked() {
        let plan = Plan::build(
            vec![],
            vec![result(7, 3, 5)],
            &[(7, 5), (8, 0)],
            Scope::Full,
        );
        assert_eq!(
            plan.entries.len(),
            1,
            "user 8 holds nothing and needs no entry"
        );
        let e = &plan.entries[0];
        assert_eq!(e.desired, RewardResult::zero(7));
        assert_eq!(e.host_change(), Some(HostChange::Update { old: 5, new: 0 }));
        let stats = plan.stats();
        assert_eq!((stats.rewards_down, stats.bonus_delta), (1, -5));
    }

    #[test]
    fn ledger_has_one_row_per_changed_value_and_skips_conflicts() {
        let mut desired = result(1, 3, 5);
        desired.badge = Some("verified_referrer".into());
        let plan = Plan::build(vec![desired], vec![], &[(1, 0)], Scope::Full);
        let fields: Vec<_> = plan.ledger(|_| true).iter().map(|c| c.field).collect();
        assert_eq!(
            fields,
            [
                "referred_users_total",
                "qualified_referrals",
                "bonus_slots",
                "badge",
                HOST_FIELD
            ]
        );
        assert_eq!(plan.ledger(|_| false).len(), 4);
    }

    #[test]
    fn canonical_line_is_the_compact_json_array_of_the_eleven_fields() {
        for badge in [None, Some("verified_referrer"), Some("a \"q\" \\ é\n\u{1}")] {
            let entry = PlanEntry {
                desired: RewardResult {
                    badge: badge.map(str::to_owned),
                    disqualified_cooldown: -3,
                    ..result(i64::MAX, 12, 10)
                },
                stored: None,
                host: HostBonus::Value(i64::MIN),
            };
            let d = &entry.desired;
            let expected = serde_json::json!([
                d.referrer_user_id,
                d.referred_users_total,
                d.qualified_referrals,
                d.disqualified_self_referral,
                d.disqualified_cooldown,
                d.disqualified_missing_ip,
                d.disqualified_shared_ip,
                d.disqualified_duplicate_ip,
                d.bonus_slots,
                d.badge,
                entry.current_bonus_slots(),
            ]);
            let mut line = vec![];
            canonical_line(&entry, &mut line);
            assert_eq!(String::from_utf8(line).unwrap(), format!("{expected}\n"));
        }
    }

    #[test]
    fn digest_changes_when_one_result_changes() {
        let a = Plan::build(
            vec![result(1, 3, 5), result(2, 0, 0)],
            vec![],
            &[],
            Scope::Full,
        );
        let b = Plan::build(
            vec![result(1, 3, 5), result(2, 1, 0)],
            vec![],
            &[],
            Scope::Full,
        );
        let c = Plan::build(
            vec![result(2, 0, 0), result(1, 3, 5)],
            vec![],
            &[],
            Scope::Full,
        );
        assert_ne!(a.digest, b.digest);
        assert_eq!(a.digest, c.digest);
    }

    #[test]
    fn a_bonus_beyond_the_host_column_leaves_only_that_referrer_unwritten() {
        let too_big = HOST_MAX + 1;
        let plan = Plan::build(
            vec![
                result(1, 3, too_big),
                result(2, 3, 5),
                result(3, 3, HOST_MAX),
            ],
            vec![],
            &[(1, 0), (2, 0), (3, 0)],
            Scope::Full,
        );
        let errors = plan.write_errors();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, 1);
        assert!(
            errors[0].1.contains(&too_big.to_string()),
            "{}",
            errors[0].1
        );
        let hosts: Vec<i64> = plan.host_changes().map(|(u, _)| u).collect();
        assert_eq!(hosts, [2, 3]);
        let rows: Vec<i64> = plan.reward_upserts().map(|r| r.referrer_user_id).collect();
        assert_eq!(rows, [2, 3]);
        assert!(
            plan.ledger(|_| true)
                .iter()
                .all(|c| c.referrer_user_id != 1)
        );
        assert_eq!(plan.stats().unwritable, 1);
    }

    #[test]
    fn an_old_host_value_beyond_integer_is_only_compared() {
        let plan = Plan::build(
            vec![result(1, 3, 5)],
            vec![],
            &[(1, HOST_MAX * 4)],
            Scope::Full,
        );
        assert!(plan.write_errors().is_empty());
        assert_eq!(
            plan.host_changes().collect::<Vec<_>>(),
            [(
                1,
                HostChange::Update {
                    old: HOST_MAX * 4,
                    new: 5
                }
            )]
        );
    }

    #[test]
    fn canonical_line_is_documented_form() {
        let mut d = result(42, 3, 5);
        d.referred_users_total = 5;
        d.badge = Some("verified_referrer".into());
        let e = PlanEntry {
            desired: d,
            stored: None,
            host: HostBonus::NoSubscription,
        };
        let mut line = vec![];
        canonical_line(&e, &mut line);
        assert_eq!(line, b"[42,5,3,0,0,0,0,0,5,\"verified_referrer\",0]\n");
    }
}
