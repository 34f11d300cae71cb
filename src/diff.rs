//! Plan review, like `terraform plan`: only what a plan changes, old → new per field, grouped
//! (bonus up, down, revoked, new subscriptions, counts only; grants and reversals), with totals.
//! Built from a saved plan (`plan show plan.json`) or from a fresh dry run (`--diff`, through
//! the plan it would save), so both read the same. One typed structure: the text is rendered
//! from it and `--format json` serialises it.

use std::collections::HashMap;
use std::fmt::Write;

use serde::Serialize;

use crate::program::slots::plan::HOST_FIELD;
use crate::program::slots::rewards::RewardResult;
use crate::report::{CurrentRow, SavedPlan};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanDiff {
    pub as_of: String,
    pub digest: String,
    pub format: String,
    /// Whether the plan recorded the current rows (format 3): older plans show the bonus only.
    pub complete: bool,
    pub totals: DiffTotals,
    /// Bonus slots go up on an existing subscription.
    pub up: Vec<ReferrerDiff>,
    pub down: Vec<ReferrerDiff>,
    /// Bonus slots go to 0 from above.
    pub revoked: Vec<ReferrerDiff>,
    /// No subscription yet: an apply creates one holding the bonus.
    pub new_subscriptions: Vec<ReferrerDiff>,
    /// The bonus stays; the stored counts or badge change.
    pub counts_only: Vec<ReferrerDiff>,
    pub grants: Vec<GrantDiff>,
    pub reversals: Vec<GrantDiff>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DiffTotals {
    pub referrers: u64,
    pub changed: u64,
    pub up: u64,
    pub down: u64,
    pub revoked: u64,
    pub new_subscriptions: u64,
    pub counts_only: u64,
    /// Referrers an apply leaves unwritten (their new bonus does not fit the host column).
    pub unwritable: u64,
    /// Sum of new minus current bonus slots over the referrers an apply writes.
    pub bonus_delta: i64,
    pub grants: u64,
    pub grant_days: i64,
    pub grant_cents: i64,
    pub reversals: u64,
    pub reversal_days: i64,
    pub reversal_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReferrerDiff {
    pub referrer_user_id: i64,
    pub bonus_delta: i64,
    /// The fields that change, in report order, the host column last.
    pub changes: Vec<FieldChange>,
    pub write_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    pub field: String,
    /// As the ledger records them: decimal text, the badge's name; `null` for none.
    pub old: Option<String>,
    pub new: Option<String>,
}

/// One grant or reversal the plan makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrantDiff {
    pub program: String,
    pub referrer_user_id: i64,
    pub referred_user_id: i64,
    pub outcome: String,
    pub cause: Option<String>,
    pub party: String,
    pub credited_user_id: i64,
    pub credit_days: Option<i64>,
    pub credit_cents: Option<i64>,
}

/// The diff of a saved plan against the state it was computed from.
pub fn diff(plan: &SavedPlan) -> PlanDiff {
    let current: Option<HashMap<i64, &CurrentRow>> = plan
        .current
        .as_ref()
        .map(|rows| rows.iter().map(|c| (c.referrer_user_id, c)).collect());
    let mut d = PlanDiff {
        as_of: plan.as_of.clone(),
        digest: plan.digest.clone(),
        format: plan.format.clone(),
        complete: current.is_some(),
        totals: DiffTotals {
            referrers: plan.referrers.len() as u64,
            ..DiffTotals::default()
        },
        up: vec![],
        down: vec![],
        revoked: vec![],
        new_subscriptions: vec![],
        counts_only: vec![],
        grants: vec![],
        reversals: vec![],
    };
    for row in &plan.referrers {
        let new = &row.result;
        let id = new.referrer_user_id;
        let now_bonus = row.current_bonus_slots;
        let (changes, has_subscription, write_error) = match &current {
            // Format 3: a referrer that is not listed changes nothing.
            Some(cur) => {
                let Some(c) = cur.get(&id) else { continue };
                let old = c.stored.clone().unwrap_or_else(|| RewardResult::zero(id));
                let mut changes: Vec<FieldChange> = old
                    .fields()
                    .into_iter()
                    .zip(new.fields())
                    .filter(|((_, o), (_, n))| o != n)
                    .map(|((field, old), (_, new))| FieldChange {
                        field: field.into(),
                        old,
                        new,
                    })
                    .collect();
                if !c.has_subscription && new.bonus_slots > 0 {
                    changes.push(FieldChange {
                        field: HOST_FIELD.into(),
                        old: None,
                        new: Some(new.bonus_slots.to_string()),
                    });
                } else if c.has_subscription && now_bonus != new.bonus_slots {
                    changes.push(FieldChange {
                        field: HOST_FIELD.into(),
                        old: Some(now_bonus.to_string()),
                        new: Some(new.bonus_slots.to_string()),
                    });
                }
                (changes, c.has_subscription, c.write_error.clone())
            }
            // Formats 1 and 2 kept the host value only.
            None if now_bonus != new.bonus_slots => (
                vec![FieldChange {
                    field: HOST_FIELD.into(),
                    old: Some(now_bonus.to_string()),
                    new: Some(new.bonus_slots.to_string()),
                }],
                true,
                None,
            ),
            None => continue,
        };
        if changes.is_empty() {
            continue;
        }
        // Saturating: a hand-edited plan file may hold any integers.
        let delta = new.bonus_slots.saturating_sub(now_bonus);
        let r = ReferrerDiff {
            referrer_user_id: id,
            bonus_delta: delta,
            changes,
            write_error,
        };
        d.totals.changed += 1;
        if r.write_error.is_some() {
            d.totals.unwritable += 1;
        } else {
            d.totals.bonus_delta = d.totals.bonus_delta.saturating_add(delta);
        }
        let group = if !has_subscription && new.bonus_slots > 0 {
            d.totals.new_subscriptions += 1;
            &mut d.new_subscriptions
        } else if new.bonus_slots == 0 && now_bonus > 0 {
            d.totals.revoked += 1;
            &mut d.revoked
        } else if delta > 0 {
            d.totals.up += 1;
            &mut d.up
        } else if delta < 0 {
            d.totals.down += 1;
            &mut d.down
        } else {
            d.totals.counts_only += 1;
            &mut d.counts_only
        };
        group.push(r);
    }
    for p in &plan.programs {
        for r in &p.referrals {
            for (party, credited, days, cents) in &r.changes {
                let g = GrantDiff {
                    program: p.program.clone(),
                    referrer_user_id: r.referrer_user_id,
                    referred_user_id: r.referred_user_id,
                    outcome: r.outcome.clone(),
                    cause: r.cause.clone(),
                    party: party.clone(),
                    credited_user_id: *credited,
                    credit_days: *days,
                    credit_cents: *cents,
                };
                let (days, cents) = (days.unwrap_or(0), cents.unwrap_or(0));
                let t = &mut d.totals;
                if days < 0 || cents < 0 {
                    t.reversals += 1;
                    t.reversal_days = t.reversal_days.saturating_add(days);
                    t.reversal_cents = t.reversal_cents.saturating_add(cents);
                    d.reversals.push(g);
                } else {
                    t.grants += 1;
                    t.grant_days = t.grant_days.saturating_add(days);
                    t.grant_cents = t.grant_cents.saturating_add(cents);
                    d.grants.push(g);
                }
            }
        }
    }
    d
}

impl PlanDiff {
    /// At most `limit` entries per group (0: all); the totals still count everything.
    pub fn truncated(mut self, limit: usize) -> PlanDiff {
        if limit > 0 {
            for g in [
                &mut self.up,
                &mut self.down,
                &mut self.revoked,
                &mut self.new_subscriptions,
                &mut self.counts_only,
            ] {
                g.truncate(limit);
            }
            self.grants.truncate(limit);
            self.reversals.truncate(limit);
        }
        self
    }
}

fn value(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("none")
}

fn referrer_lines(s: &mut String, sign: char, rows: &[ReferrerDiff], total: u64) {
    for r in rows {
        let fields: Vec<String> = r
            .changes
            .iter()
            .map(|c| format!("{} {} -> {}", c.field, value(&c.old), value(&c.new)))
            .collect();
        let _ = writeln!(
            s,
            "  {sign} referrer {}: {}{}",
            r.referrer_user_id,
            fields.join(", "),
            r.write_error
                .as_deref()
                .map(|e| format!(" [NOT WRITTEN: {e}]"))
                .unwrap_or_default()
        );
    }
    more(s, rows.len() as u64, total);
}

fn more(s: &mut String, shown: u64, total: u64) {
    if total > shown {
        let _ = writeln!(s, "  ... and {} more (--limit 0 shows all)", total - shown);
    }
}

fn grant_lines(s: &mut String, sign: char, rows: &[GrantDiff], total: u64) {
    for g in rows {
        let _ = writeln!(
            s,
            "  {sign} {}: referral {} -> {} ({}{}): {} {} to user {}",
            g.program,
            g.referrer_user_id,
            g.referred_user_id,
            g.outcome,
            g.cause
                .as_deref()
                .map(|c| format!(", {c}"))
                .unwrap_or_default(),
            g.party,
            crate::program::grants::report::amount_text(g.credit_days, g.credit_cents),
            g.credited_user_id
        );
    }
    more(s, rows.len() as u64, total);
}

/// The text form: a group per kind of change, then one line of totals.
pub fn text(d: &PlanDiff) -> String {
    let mut s = String::new();
    let t = &d.totals;
    let _ = writeln!(s, "plan as of {}, digest {}", d.as_of, d.digest);
    if !d.complete {
        let _ = writeln!(
            s,
            "({} records only the host value of each referrer: save the plan again for every field's old value)",
            d.format
        );
    }
    let groups: [(&str, char, &[ReferrerDiff], u64); 5] = [
        ("bonus up", '~', &d.up, t.up),
        ("bonus down", '~', &d.down, t.down),
        ("revoked", '-', &d.revoked, t.revoked),
        (
            "new subscriptions",
            '+',
            &d.new_subscriptions,
            t.new_subscriptions,
        ),
        ("counts or badge only", '~', &d.counts_only, t.counts_only),
    ];
    for (name, sign, rows, total) in groups {
        if total > 0 {
            let _ = writeln!(s, "\n{name} ({total}):");
            referrer_lines(&mut s, sign, rows, total);
        }
    }
    if t.grants > 0 {
        let _ = writeln!(s, "\ngrants ({}):", t.grants);
        grant_lines(&mut s, '+', &d.grants, t.grants);
    }
    if t.reversals > 0 {
        let _ = writeln!(s, "\nreversals ({}):", t.reversals);
        grant_lines(&mut s, '-', &d.reversals, t.reversals);
    }
    if t.changed == 0 && t.grants == 0 && t.reversals == 0 {
        let _ = writeln!(
            s,
            "\n{}",
            if d.complete {
                "No changes: an apply would write nothing."
            } else {
                "No host value changes (this plan format does not record the rest)."
            }
        );
    }
    let _ = writeln!(
        s,
        "\nPlan{}: {} of {} referrers change ({} up, {} down, {} revoked, {} new subscriptions, {} counts only{}); bonus slots {:+}; {} grants ({} days, {} cents), {} reversals ({} days, {} cents).",
        if d.complete {
            ""
        } else {
            " (host values only)"
        },
        t.changed,
        t.referrers,
        t.up,
        t.down,
        t.revoked,
        t.new_subscriptions,
        t.counts_only,
        if t.unwritable > 0 {
            format!(", {} unwritable", t.unwritable)
        } else {
            String::new()
        },
        t.bonus_delta,
        t.grants,
        t.grant_days,
        t.grant_cents,
        t.reversals,
        t.reversal_days,
        t.reversal_cents
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::ReportRow;

    fn row(id: i64, bonus: i64, current: i64) -> ReportRow {
        let mut result = RewardResult::zero(id);
        result.bonus_slots = bonus;
        ReportRow {
            result,
            current_bonus_slots: current,
        }
    }

    /// A plan saved before format 3 knows each referrer's host value only: the diff shows that,
    /// says so, and groups by it.
    #[test]
    fn an_older_plan_shows_the_host_values_it_kept() {
        let plan = SavedPlan {
            format: "referral-rewards-plan/2".into(),
            as_of: "2026-11-01T00:00:00Z".into(),
            digest: "d".into(),
            referrers: vec![row(1, 5, 0), row(2, 5, 5), row(3, 0, 10), row(4, 5, 10)],
            programs: vec![],
            current: None,
        };
        let d = diff(&plan);
        assert!(!d.complete);
        assert_eq!(
            (
                d.totals.changed,
                d.totals.up,
                d.totals.revoked,
                d.totals.down
            ),
            (3, 1, 1, 1)
        );
        assert_eq!(d.totals.bonus_delta, 5 - 10 - 5);
        assert_eq!(d.up[0].changes.len(), 1);
        assert_eq!(d.up[0].changes[0].field, HOST_FIELD);
        assert!(text(&d).contains("records only the host value"));
        let mut two = d.clone();
        two.up.push(two.up[0].clone());
        two.totals.up = 2;
        let t = two.truncated(1);
        assert_eq!(t.up.len(), 1, "at most one per group");
        assert_eq!(t.totals.up, 2, "the totals count everything");
        assert!(text(&t).contains("... and 1 more"), "{}", text(&t));
    }
}
