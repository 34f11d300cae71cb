//! A grant program's plan: the decided referrals a run covers, the ledger rows it makes, its
//! counts and its digest entries.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{GrantProgramConfig, RulesConfig};
use crate::instant::Instant;
use crate::snapshot::Scope;

use super::rules::{self, Decided, Facts, GrantChange, Outcome};
use super::{Amount, Party};

/// One grant program's share of a run.
#[derive(Debug, Clone)]
pub struct ProgramPlan {
    pub name: String,
    /// `max_rewarded_per_referrer`; 0: no limit.
    pub cap: i64,
    /// `hold_days`: a conversion is granted this long after it (the facts `explain` shows).
    pub hold_days: i64,
    /// The referrals this run covers, by `(R, U)`: every referral for a full run, those of the
    /// shard's referrers for a shard, and for a one-user run on X those in which X is R or U
    /// (decided with the whole of X's and X's referrer's sets).
    pub referrals: Vec<Decided>,
}

impl ProgramPlan {
    pub fn build(
        program: &GrantProgramConfig,
        rules: &RulesConfig,
        facts: &Facts<'_>,
        now: Instant,
        scope: Scope,
    ) -> ProgramPlan {
        let mut referrals = rules::decide(program, rules, facts, now);
        referrals.retain(|d| covers(scope, d));
        ProgramPlan {
            name: program.name.clone(),
            cap: program.max_rewarded_per_referrer,
            hold_days: program.hold_days,
            referrals,
        }
    }

    /// The ledger rows to write: reversals and grants, referral by referral.
    pub fn changes(&self) -> impl Iterator<Item = (&Decided, &GrantChange)> {
        self.referrals
            .iter()
            .flat_map(|d| d.changes.iter().map(move |c| (d, c)))
    }

    pub fn stats(&self) -> GrantStats {
        let mut s = GrantStats {
            program: self.name.clone(),
            referrals: self.referrals.len() as u64,
            ..GrantStats::default()
        };
        // Counted by index, named once at the end (a map lookup per referral showed).
        let mut outcomes = [0u64; Outcome::ALL.len()];
        for d in &self.referrals {
            outcomes[d.outcome.index()] += 1;
            s.conversions += d.conversion.is_some() as u64;
            for c in &d.changes {
                let t = match (c.reversal, c.party) {
                    (false, Party::Referrer) => &mut s.grants_referrer,
                    (false, Party::Referred) => &mut s.grants_referred,
                    (true, Party::Referrer) => &mut s.reversals_referrer,
                    (true, Party::Referred) => &mut s.reversals_referred,
                };
                t.add(c.amount);
            }
        }
        for o in Outcome::ALL {
            s.outcomes.insert(o.as_str(), outcomes[o.index()]);
        }
        s
    }
}

/// Whether a scope writes a referral: a shard writes its referrers' referrals, a one-user run
/// on X those in which X is R or U.
pub fn covers(scope: Scope, d: &Decided) -> bool {
    match scope {
        Scope::Full => true,
        Scope::Referrer(x) => d.referrer_id == x || d.user_id == x,
        Scope::Shard(s) => s.contains(d.referrer_id),
    }
}

/// A count of ledger rows and their total amounts (negative for reversals).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub count: u64,
    pub days: i64,
    pub cents: i64,
}

impl Totals {
    pub fn add(&mut self, a: Amount) {
        self.count += 1;
        self.days += a.days();
        self.cents += a.cents();
    }
}

/// A grant program's counts in a run (the run row's `programs`, the summary).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GrantStats {
    pub program: String,
    pub referrals: u64,
    pub conversions: u64,
    pub outcomes: BTreeMap<&'static str, u64>,
    pub grants_referrer: Totals,
    pub grants_referred: Totals,
    pub reversals_referrer: Totals,
    pub reversals_referred: Totals,
}

impl GrantStats {
    pub fn ledger_rows_to_write(&self) -> u64 {
        self.grants_referrer.count
            + self.grants_referred.count
            + self.reversals_referrer.count
            + self.reversals_referred.count
    }
}

/// The digest of a run with grant programs: the slots digest, then per program (by name) one
/// entry per referral granted now or changing in this run, by `(R, U)`. Without grant
/// programs it is the slots digest itself, so a slots-only run keeps its digest.
///
/// Encoding: BLAKE3 over the line `slots <slots digest>\n`, then per entry one compact JSON
/// array and `\n`: `[program, R, U, outcome, cause, [[party, credited user, days, cents,
/// seq], …]]` (cause `null` unless reversed; amounts negative for reversals).
pub fn digest(slots_digest: &str, programs: &[ProgramPlan]) -> String {
    if programs.is_empty() {
        return slots_digest.to_owned();
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(format!("slots {slots_digest}\n").as_bytes());
    let mut sorted: Vec<&ProgramPlan> = programs.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    // The lines written by hand into one buffer rather than through serde_json (hundreds of
    // thousands of them; program names and outcomes need no escaping: [a-z0-9_]), and fed to
    // the hasher a block at a time: the same bytes, fewer calls.
    let mut line = String::with_capacity(1 << 16);
    let mut int = itoa::Buffer::new();
    for p in sorted {
        for d in &p.referrals {
            if d.outcome != Outcome::Granted && d.changes.is_empty() {
                continue;
            }
            if line.len() > (1 << 16) - 256 {
                hasher.update(line.as_bytes());
                line.clear();
            }
            let q = |line: &mut String, s: &str| {
                line.push('"');
                line.push_str(s);
                line.push('"');
            };
            line.push('[');
            q(&mut line, &p.name);
            for v in [d.referrer_id, d.user_id] {
                line.push(',');
                line.push_str(int.format(v));
            }
            line.push(',');
            q(&mut line, d.outcome.as_str());
            line.push(',');
            match d.cause {
                Some(c) => q(&mut line, c.as_str()),
                None => line.push_str("null"),
            }
            line.push_str(",[");
            for (i, c) in d.changes.iter().enumerate() {
                if i > 0 {
                    line.push(',');
                }
                line.push('[');
                q(&mut line, c.party.as_str());
                line.push(',');
                line.push_str(int.format(c.credited_user_id));
                line.push(',');
                line.push_str(int.format(c.amount.days()));
                line.push(',');
                line.push_str(int.format(c.amount.cents()));
                line.push(',');
                line.push_str(int.format(c.seq));
                line.push(']');
            }
            line.push_str("]]\n");
        }
    }
    hasher.update(line.as_bytes());
    hasher.finalize().to_hex().to_string()
}
