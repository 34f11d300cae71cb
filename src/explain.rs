//! `explain`, for support: why each referral counts or not, the facts behind the outcome, and in
//! plain words what would change it; from the referrer's side (`explain --referrer`,
//! `GET /v1/referrers/{id}`) and from the referred user's (`explain --user`,
//! `GET /v1/users/{id}`). One typed structure per view: `--format json` and HTTP serialise it,
//! the text is rendered from it.

use std::fmt::Write;

use serde::Serialize;

use crate::config::{Config, GrantProgramConfig};
use crate::engine::RunReport;
use crate::instant;
use crate::program::grants::report::{
    GrantView, ReferralView, ReferrerView, amount_text, referrer_view,
};
use crate::program::slots::compute::ReferralOutcome;
use crate::program::slots::facts::{ReferralFacts, short_ip};
use crate::program::slots::rules::Outcome;
use crate::report::ReportRow;

/// One referrer's referrals, as support reads them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReferrerExplanation {
    pub as_of: String,
    /// Whether the user holds an invite code (a user without one earns nothing, and any reward
    /// it holds is revoked).
    pub is_referrer: bool,
    /// The slots program's result against the current state: the report row's fields, from
    /// `referrer_user_id` to `current_bonus_slots`.
    #[serde(flatten)]
    pub result: ReportRow,
    /// The badge the `referral_rewards` row holds now.
    pub current_badge: Option<String>,
    /// Desired minus current bonus slots.
    pub bonus_delta: i64,
    pub grant_programs: Vec<ReferrerView>,
    #[serde(flatten)]
    pub page: Option<PageInfo>,
    pub referrals: Vec<ReferralExplanation>,
}

/// Where a page of referrals stands among all of them (HTTP pages them; the CLI does not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PageInfo {
    pub referrals_total: usize,
    /// The cursor of the next page; `null` on the last.
    pub next_cursor: Option<i64>,
}

/// One referred user in the slots program.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReferralExplanation {
    pub referrer_user_id: i64,
    pub referred_user_id: i64,
    pub outcome: &'static str,
    /// Rank in the referrer's claim order, from 1; candidates only.
    pub position: Option<u32>,
    pub signup_ip: Option<String>,
    #[serde(flatten)]
    pub facts: ReferralFacts,
    /// The outcome in plain words, with its facts.
    pub reason: String,
    /// What would change the outcome, when something would.
    pub would_change: Option<String>,
}

/// One referred user, looked up from its own side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserExplanation {
    pub as_of: String,
    pub user_id: i64,
    /// Who referred the user (`None`: nobody did).
    pub referred_by: Option<i64>,
    /// Whether that referrer exists and holds an invite code.
    pub referrer_exists: bool,
    pub referrer_has_invite_code: bool,
    /// The user's referral in the slots program; `None` when nobody (existing) referred it.
    pub slots: Option<ReferralExplanation>,
    /// The user's referral in each grant program, in config order.
    pub grant_programs: Vec<UserGrant>,
}

/// One referred user in one grant program.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserGrant {
    pub program: String,
    /// `max_rewarded_per_referrer` (`None`: no limit).
    pub cap: Option<i64>,
    #[serde(flatten)]
    pub referral: ReferralView,
    pub reason: String,
    pub would_change: Option<String>,
}

/// A time of the facts (RFC 3339 with microseconds) as a person reads it: `2026-11-08 14:03:00
/// UTC`.
pub fn when(rfc3339: &str) -> String {
    if !rfc3339.starts_with(|c: char| c.is_ascii_digit()) {
        return rfc3339.to_owned(); // infinity, -infinity
    }
    let mut s: String = rfc3339.chars().take(19).collect();
    if s.len() > 10 {
        s.replace_range(10..11, " ");
    }
    s.push_str(" UTC");
    s
}

fn opt_id(id: Option<i64>) -> String {
    id.map_or_else(|| "-".into(), |i| i.to_string())
}

fn list(xs: &[String]) -> String {
    xs.join(", ")
}

/// The reason for a slots outcome and what would change it, in plain words.
pub fn slots_reason(
    r: &ReferralOutcome,
    f: &ReferralFacts,
    cfg: &Config,
) -> (String, Option<String>) {
    let rules = &cfg.rules;
    let ip = r.signup_ip.as_deref().map(short_ip).unwrap_or_default();
    let at = |t: &Option<String>| t.as_deref().map(when).unwrap_or_else(|| "-".into());
    match r.outcome {
        Outcome::Qualified => (
            format!(
                "counts toward referrer {}'s reward (claim position {})",
                r.referrer_user_id,
                r.position.unwrap_or_default()
            ),
            None,
        ),
        Outcome::SelfReferral => (
            "the user referred itself".into(),
            Some("never counts".into()),
        ),
        Outcome::Cooldown => {
            let end = at(&f.cooldown_ends_at);
            let days = rules.cooldown_days;
            let change = match f.then_outcome {
                Some("missing_ip") => format!(
                    "the {days}-day cooldown ends at {end}, but it would not count then either: its registration event has no usable IP hash (missing_ip)"
                ),
                Some("shared_ip") => format!(
                    "the {days}-day cooldown ends at {end}, but it would not count then either: the referrer itself used its signup IP hash {ip} inside the IP window (shared_ip)"
                ),
                Some("duplicate_ip") => format!(
                    "the {days}-day cooldown ends at {end}, but it would not count then either: user {} qualified first from the same IP hash {ip} (duplicate_ip)",
                    opt_id(f.ip_claimed_by)
                ),
                _ => format!(
                    "counts after {end}, when the {days}-day cooldown ends (if nothing else changes)"
                ),
            };
            (
                format!("signed up or subscribed less than {days} days before the as-of time"),
                Some(change),
            )
        }
        Outcome::MissingIp => (
            "its registration event has no usable IP hash, and rules.require_ip_hash is on".into(),
            Some("counts only once its registration event carries an IP hash".into()),
        ),
        Outcome::SharedIp => {
            let reason = match &f.referrer_last_used_ip_at {
                Some(t) => format!(
                    "signed up from IP hash {ip}, which the referrer itself used inside the {}-day IP window (last at {})",
                    rules.ip_window_days,
                    when(t)
                ),
                None => format!(
                    "signed up from IP hash {ip}, which the referrer itself used inside the {}-day IP window",
                    rules.ip_window_days
                ),
            };
            let after = match &f.shared_ip_until {
                Some(t) => format!(
                    "after {}, when the referrer's last use leaves the IP window (unless the referrer uses that IP again)",
                    when(t)
                ),
                None => format!(
                    "once the referrer has not used that IP for {} days",
                    rules.ip_window_days
                ),
            };
            let change = if f.then_outcome == Some("duplicate_ip") {
                format!(
                    "{after}, an earlier referral from the same IP hash would count instead, and this one would be duplicate_ip"
                )
            } else {
                format!("counts {after}")
            };
            (reason, Some(change))
        }
        Outcome::DuplicateIp => match f.ip_claimed_by {
            Some(first) => (
                format!(
                    "user {first}, referred by the same referrer and earlier in the claim order (subscription start, then id), qualified first from the same IP hash {ip}"
                ),
                Some(format!("counts only if user {first} stops qualifying")),
            ),
            None => (
                format!("an earlier subscriber of this referrer qualified from IP hash {ip}"),
                Some("counts only if that subscriber stops qualifying".into()),
            ),
        },
        Outcome::Inactive => (
            "the account is not active".into(),
            Some("counts once the account is active again (if the other rules pass)".into()),
        ),
        Outcome::Unverified => (
            "the account is not verified".into(),
            Some("counts once the account is verified (if the other rules pass)".into()),
        ),
        Outcome::NoSubscription => (
            "the user has no subscription".into(),
            Some(format!(
                "counts once the user subscribes with a tier in [{}] and a status in [{}]",
                list(&rules.qualifying_tiers),
                list(&rules.qualifying_statuses)
            )),
        ),
        Outcome::Tier => (
            format!(
                "the subscription's tier {} is not one of [{}]",
                f.tier.as_deref().unwrap_or("-"),
                list(&rules.qualifying_tiers)
            ),
            Some("counts if the subscription moves to one of those tiers".into()),
        ),
        Outcome::Status => (
            format!(
                "the subscription's status {} is not one of [{}]",
                f.status.as_deref().unwrap_or("-"),
                list(&rules.qualifying_statuses)
            ),
            Some("counts once the subscription's status is one of those".into()),
        ),
        Outcome::Expired => (
            format!("the subscription expired at {}", at(&f.expires_at)),
            Some("counts again if the subscription is renewed".into()),
        ),
        Outcome::ReferrerWithoutInviteCode => (
            format!(
                "referrer {} holds no invite code, so the referral counts for nobody in the slots program",
                r.referrer_user_id
            ),
            Some(format!(
                "counts once user {} holds an invite code",
                r.referrer_user_id
            )),
        ),
    }
}

/// The reason for a grant program's outcome and what would change it, in plain words.
pub fn grant_reason(
    v: &ReferralView,
    program: Option<&GrantProgramConfig>,
    cap: Option<i64>,
) -> (String, Option<String>) {
    let conv = match (&v.converted_at, v.conversion_payment_id) {
        (Some(t), Some(p)) => format!("payment {p} at {}", when(t)),
        _ => "no payment".into(),
    };
    let pays = program.map(|p| {
        format!(
            "a payment with status in [{}] of at least {} cents{}",
            list(&p.payment_statuses),
            p.min_payment_cents,
            p.currency
                .as_deref()
                .map(|c| format!(" in {c}"))
                .unwrap_or_default()
        )
    });
    match v.outcome {
        "no_conversion" => (
            "the referred user has not paid yet".into(),
            Some(format!(
                "granted after the user first pays ({})",
                pays.unwrap_or_else(|| "a counted payment".into())
            )),
        ),
        "self_referral" => (
            "the user referred itself".into(),
            Some("never granted".into()),
        ),
        "missing_ip" => (
            "its registration event has no usable IP hash".into(),
            Some("granted only once its registration event carries an IP hash".into()),
        ),
        "shared_ip" => (
            "signed up from an IP hash the referrer itself used inside the IP window".into(),
            Some("never granted for this conversion while that use stands".into()),
        ),
        "duplicate_ip" => (
            "another referral of this referrer was granted first from the same IP hash".into(),
            Some("granted only if that referral stops qualifying".into()),
        ),
        "on_hold" => {
            let end = v.hold_ends_at.as_deref().map(when).unwrap_or_default();
            (
                format!("converted by {conv}; the hold ends at {end}"),
                Some(format!(
                    "granted after {end}, when the hold ends, unless the payment is refunded"
                )),
            )
        }
        "cap_reached" => (
            format!(
                "the referrer already has {} granted referrals; this one is number {} in conversion order",
                cap.unwrap_or_default(),
                v.position.unwrap_or_default()
            ),
            Some("granted only if one of the referrer's earlier grants is reversed".into()),
        ),
        "granted" => (format!("granted for {conv}"), None),
        "reversed" => (
            format!(
                "the grant is taken back: the referral is now {}",
                v.cause.unwrap_or("-")
            ),
            None,
        ),
        other => (other.to_owned(), None),
    }
}

/// The slots explanation of each listed referral of a report (a one-user run lists its
/// referrer's), with facts where the run derived them.
pub fn referrals(report: &RunReport, cfg: &Config) -> Vec<ReferralExplanation> {
    let listed = report.computation.listed();
    listed
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let facts = report.computation.facts.get(i).cloned().unwrap_or_default();
            let (reason, would_change) = slots_reason(r, &facts, cfg);
            ReferralExplanation {
                referrer_user_id: r.referrer_user_id,
                referred_user_id: r.referred_user_id,
                outcome: r.outcome.as_str(),
                position: r.position,
                signup_ip: r.signup_ip.clone(),
                facts,
                reason,
                would_change,
            }
        })
        .collect()
}

/// Referrer `id`'s explanation from a one-user run on it; `page` pages the referrals by
/// referred user id.
pub fn referrer(
    report: &RunReport,
    cfg: &Config,
    id: i64,
    page: Option<(usize, Option<i64>)>,
) -> ReferrerExplanation {
    let entry = report
        .plan
        .entries
        .iter()
        .find(|e| e.referrer_user_id() == id);
    let mut all: Vec<ReferralExplanation> = referrals(report, cfg)
        .into_iter()
        .filter(|r| r.referrer_user_id == id)
        .collect();
    let page = page.map(|(limit, cursor)| {
        all.sort_by_key(|r| r.referred_user_id);
        let total = all.len();
        all.retain(|r| cursor.is_none_or(|c| r.referred_user_id > c));
        let more = all.len() > limit;
        all.truncate(limit);
        PageInfo {
            referrals_total: total,
            next_cursor: if more {
                all.last().map(|r| r.referred_user_id)
            } else {
                None
            },
        }
    });
    ReferrerExplanation {
        as_of: instant::to_rfc3339(report.request.as_of),
        is_referrer: report
            .computation
            .results
            .iter()
            .any(|r| r.referrer_user_id == id),
        // A one-user run always plans its user; zeros only if that ever changes.
        result: entry.map(ReportRow::of).unwrap_or_else(|| ReportRow {
            result: crate::program::slots::rewards::RewardResult::zero(id),
            current_bonus_slots: 0,
        }),
        current_badge: entry.and_then(|e| e.stored.as_ref().and_then(|s| s.badge.clone())),
        bonus_delta: entry.map_or(0, |e| e.desired.bonus_slots - e.current_bonus_slots()),
        grant_programs: report.grants.iter().map(|p| referrer_view(p, id)).collect(),
        page,
        referrals: all,
    }
}

/// User `id`'s explanation from a one-user run on its referrer (or on itself when its
/// referrer is unknown): its referral in every program.
pub fn user(
    report: &RunReport,
    cfg: &Config,
    id: i64,
    referred_by: Option<i64>,
    referrer_exists: bool,
) -> UserExplanation {
    let slots = referrals(report, cfg)
        .into_iter()
        .find(|r| r.referred_user_id == id);
    let grant_programs = report
        .grants
        .iter()
        .filter_map(|p| {
            let r = referred_by?;
            let view = referrer_view(p, r)
                .referrals
                .into_iter()
                .find(|v| v.referred_user_id == id)?;
            let program = cfg.grants.iter().find(|g| g.name == p.name);
            let cap = (p.cap > 0).then_some(p.cap);
            let (reason, would_change) = grant_reason(&view, program, cap);
            Some(UserGrant {
                program: p.name.clone(),
                cap,
                referral: view,
                reason,
                would_change,
            })
        })
        .collect();
    UserExplanation {
        as_of: instant::to_rfc3339(report.request.as_of),
        user_id: id,
        referred_by,
        referrer_exists,
        referrer_has_invite_code: referred_by.is_some_and(|r| {
            report
                .computation
                .results
                .iter()
                .any(|x| x.referrer_user_id == r)
        }),
        slots,
        grant_programs,
    }
}

fn opt<T: ToString>(x: Option<T>) -> String {
    x.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn short_when(t: &Option<String>) -> String {
    t.as_deref()
        .map(|t| when(t).trim_end_matches(" UTC").to_owned())
        .unwrap_or_else(|| "-".into())
}

/// Each program's table, then the referrals it does not grant: why, and what would change it.
fn grants_text(views: &[ReferrerView], cfg: &Config) -> String {
    let mut s = String::new();
    for v in views {
        s.push_str(&crate::program::grants::report::referrer_text(v));
        let program = cfg.grants.iter().find(|g| g.name == v.program);
        let mut first = true;
        for r in v.referrals.iter().filter(|r| r.outcome != "granted") {
            if first {
                let _ = writeln!(s, "why not, and what would change it:");
                first = false;
            }
            let (reason, change) = grant_reason(r, program, v.cap);
            let _ = writeln!(s, "{:>13}  {}: {reason}", r.referred_user_id, r.outcome);
            if let Some(c) = change {
                let _ = writeln!(s, "{:>13}  -> {c}", "");
            }
        }
    }
    s
}

/// The text form of a referrer's explanation.
pub fn referrer_text(e: &ReferrerExplanation, cfg: &Config) -> String {
    let mut s = String::new();
    let id = e.result.result.referrer_user_id;
    let _ = writeln!(s, "referrer {id} as of {}", when(&e.as_of));
    if !e.is_referrer {
        let _ = writeln!(
            s,
            "user {id} is not a referrer (no invite code): it earns nothing, and any reward it holds is revoked"
        );
    }
    {
        let r = &e.result;
        let d = &r.result;
        let _ = writeln!(
            s,
            "referred {}, qualified {}, self_referral {}, cooldown {}, missing_ip {}, shared_ip {}, duplicate_ip {}",
            d.referred_users_total,
            d.qualified_referrals,
            d.disqualified_self_referral,
            d.disqualified_cooldown,
            d.disqualified_missing_ip,
            d.disqualified_shared_ip,
            d.disqualified_duplicate_ip
        );
        let _ = writeln!(
            s,
            "bonus_slots {} (current {}, {:+}), badge {} (current {})",
            d.bonus_slots,
            r.current_bonus_slots,
            e.bonus_delta,
            d.badge.as_deref().unwrap_or("none"),
            e.current_badge.as_deref().unwrap_or("none")
        );
    }
    if e.referrals.is_empty() {
        let _ = writeln!(s, "no referred users");
    } else {
        let w = e
            .referrals
            .iter()
            .map(|r| r.outcome.len())
            .max()
            .unwrap_or(0)
            .max(16);
        let _ = writeln!(
            s,
            "{:>13}  {:<w$} {:>3}  {:<19}  {:<19}  {:<16}  {:<19}  {:<19}  ip",
            "referred_user",
            "outcome",
            "pos",
            "signed_up (UTC)",
            "subscribed",
            "tier/status",
            "expires",
            "cooldown_ends"
        );
        for r in &e.referrals {
            let f = &r.facts;
            let plan = match (&f.tier, &f.status) {
                (Some(t), Some(st)) => format!("{t}/{st}"),
                _ => "-".into(),
            };
            let _ = writeln!(
                s,
                "{:>13}  {:<w$} {:>3}  {:<19}  {:<19}  {:<16}  {:<19}  {:<19}  {}",
                r.referred_user_id,
                r.outcome,
                opt(r.position),
                short_when(&f.signed_up_at),
                short_when(&f.subscribed_at),
                plan,
                short_when(&f.expires_at),
                short_when(&f.cooldown_ends_at),
                f.signup_ip_short.as_deref().unwrap_or("-"),
            );
        }
        let not: Vec<&ReferralExplanation> = e
            .referrals
            .iter()
            .filter(|r| r.outcome != Outcome::Qualified.as_str())
            .collect();
        if !not.is_empty() {
            let _ = writeln!(s, "why not, and what would change it:");
            for r in not {
                let _ = writeln!(s, "{:>13}  {}: {}", r.referred_user_id, r.outcome, r.reason);
                if let Some(c) = &r.would_change {
                    let _ = writeln!(s, "{:>13}  -> {c}", "");
                }
            }
        }
    }
    s.push_str(&grants_text(&e.grant_programs, cfg));
    s
}

fn grant_amounts(gs: &[GrantView]) -> String {
    gs.iter()
        .map(|g| {
            format!(
                "{} {} to user {}",
                g.party,
                amount_text(g.credit_days, g.credit_cents),
                g.credited_user_id
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The text form of a user's explanation.
pub fn user_text(e: &UserExplanation) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "user {} as of {}", e.user_id, when(&e.as_of));
    match e.referred_by {
        None => {
            let _ = writeln!(
                s,
                "nobody referred this user: it counts in no referral program"
            );
        }
        Some(r) if !e.referrer_exists => {
            let _ = writeln!(
                s,
                "referred by user {r}, who does not exist: the referral counts in no program"
            );
        }
        Some(r) => {
            let _ = writeln!(
                s,
                "referred by user {r}{}",
                if e.referrer_has_invite_code {
                    ""
                } else {
                    " (who holds no invite code)"
                }
            );
        }
    }
    if let Some(r) = &e.slots {
        let f = &r.facts;
        // A referral whose referrer holds no invite code is listed without the user's row.
        if f.signed_up_at.is_some() {
            let _ = writeln!(
                s,
                "signed up {}; subscription {}; subscribed {}; expires {}; signup IP hash {}",
                short_when(&f.signed_up_at),
                match (&f.tier, &f.status) {
                    (Some(t), Some(st)) => format!("{t}/{st}"),
                    _ => "none".into(),
                },
                short_when(&f.subscribed_at),
                f.expires_at
                    .as_deref()
                    .map_or("never".into(), |t| short_when(&Some(t.into()))),
                f.signup_ip_short.as_deref().unwrap_or("none"),
            );
        }
        let _ = writeln!(
            s,
            "slots program: {}{}",
            r.outcome,
            r.position
                .map(|p| format!(" (claim position {p})"))
                .unwrap_or_default()
        );
        let _ = writeln!(s, "  why: {}", r.reason);
        if let Some(c) = &r.would_change {
            let _ = writeln!(s, "  what would change it: {c}");
        }
    }
    for g in &e.grant_programs {
        let v = &g.referral;
        let outcome = match v.cause {
            Some(c) => format!("{} ({c})", v.outcome),
            None => v.outcome.to_owned(),
        };
        let _ = writeln!(s, "grant program {}: {outcome}", g.program);
        let _ = writeln!(s, "  why: {}", g.reason);
        if let Some(c) = &g.would_change {
            let _ = writeln!(s, "  what would change it: {c}");
        }
        if !v.held.is_empty() {
            let _ = writeln!(s, "  held: {}", grant_amounts(&v.held));
        }
        if !v.changes.is_empty() {
            let _ = writeln!(s, "  this run: {}", grant_amounts(&v.changes));
        }
    }
    s
}

/// `explain --referrer ID` and `GET /v1/referrers/{id}`: a dry run of the referrer, its
/// referrals' facts, and the referrer's last use of each shared IP (read after the run).
pub async fn explain_referrer(
    store: &crate::store::Store,
    cfg: &Config,
    id: i64,
    as_of: instant::Instant,
    page: Option<(usize, Option<i64>)>,
) -> Result<ReferrerExplanation, crate::engine::EngineError> {
    let report = dry_run(store, cfg, id, as_of).await?;
    let mut e = referrer(&report, cfg, id, page);
    add_last_use(store, cfg, as_of, id, &mut e.referrals).await?;
    Ok(e)
}

/// `explain --user ID` and `GET /v1/users/{id}`: a dry run of the user's referrer (of the
/// user itself when nobody, or nobody who exists, referred it).
pub async fn explain_user(
    store: &crate::store::Store,
    cfg: &Config,
    id: i64,
    as_of: instant::Instant,
) -> Result<UserExplanation, crate::engine::EngineError> {
    let referred_by = store
        .referred_by(id)
        .await?
        .ok_or(crate::engine::EngineError::UnknownReferrer(id))?;
    let referrer_exists = match referred_by {
        Some(r) => store.user_exists(r).await?,
        None => false,
    };
    let on = match referred_by {
        Some(r) if referrer_exists => r,
        _ => id,
    };
    let report = dry_run(store, cfg, on, as_of).await?;
    let mut e = user(&report, cfg, id, referred_by, referrer_exists);
    if let Some(s) = e.slots.as_mut() {
        add_last_use(store, cfg, as_of, on, std::slice::from_mut(s)).await?;
    }
    Ok(e)
}

async fn dry_run(
    store: &crate::store::Store,
    cfg: &Config,
    id: i64,
    as_of: instant::Instant,
) -> Result<RunReport, crate::engine::EngineError> {
    let req = crate::engine::RunRequest {
        scope: crate::snapshot::Scope::Referrer(id),
        as_of,
        dry_run: true,
    };
    // A listing: with each referral's facts.
    let ctl = crate::engine::RunControl {
        list_uncounted: true,
        ..Default::default()
    };
    crate::engine::run_controlled(store, cfg, req, &ctl).await
}

/// The `shared_ip` facts: when the referrer last used each shared IP (one query, only when a
/// referral is `shared_ip`).
async fn add_last_use(
    store: &crate::store::Store,
    cfg: &Config,
    as_of: instant::Instant,
    referrer: i64,
    rows: &mut [ReferralExplanation],
) -> Result<(), crate::engine::EngineError> {
    if !rows.iter().any(|r| r.outcome == Outcome::SharedIp.as_str()) {
        return Ok(());
    }
    let window = crate::program::fraud::ip_window(as_of, cfg.rules.ip_window_days);
    let last = store.ip_last_used(referrer, window).await?;
    for r in rows
        .iter_mut()
        .filter(|r| r.outcome == Outcome::SharedIp.as_str())
    {
        if let Some(&at) = r.signup_ip.as_deref().and_then(|ip| last.get(ip)) {
            r.facts.referrer_last_used_ip_at = Some(instant::to_rfc3339_or_infinite(at));
            r.facts.shared_ip_until = Some(instant::to_rfc3339_or_infinite(
                at.saturating_add(cfg.rules.ip_window_days * instant::MICROS_PER_DAY),
            ));
            let (reason, change) = slots_reason(&as_outcome(r), &r.facts, cfg);
            r.reason = reason;
            r.would_change = change;
        }
    }
    Ok(())
}

/// The outcome row an explanation was made from (to word it again once more facts are in).
fn as_outcome(r: &ReferralExplanation) -> ReferralOutcome {
    ReferralOutcome {
        referrer_user_id: r.referrer_user_id,
        referred_user_id: r.referred_user_id,
        outcome: Outcome::SharedIp,
        position: r.position,
        signup_ip: r.signup_ip.clone(),
    }
}
