//! The audit page: one self-contained HTML file (no CDN, fonts or scripts from elsewhere; its
//! charts are inline SVG drawn here, its table a few lines of its own JavaScript) that a
//! reviewer opens offline in any browser. It holds the run's summary and the plan's changes,
//! not every row, so that it stays small at millions of users: the referrals are embedded for
//! the top referrers and for changed referrers up to [`REFERRAL_BUDGET`] rows.

use std::fmt::Write;

use serde::Serialize;

use crate::config::Config;
use crate::diff::PlanDiff;
use crate::engine::RunReport;
use crate::instant;
use crate::program::slots::rules::Outcome;

/// How many top referrers the page lists (with their referrals).
pub const TOP_N: usize = 20;
/// At most this many referral rows are embedded (top referrers first, then changed referrers
/// by the size of their bonus change); the page says how many referrers it left out.
pub const REFERRAL_BUDGET: usize = 300_000;
/// At most this many changed referrers, and this many grants and reversals, go into the
/// changes table (the largest bonus changes first); the totals count them all, and the page
/// says how many rows `plan show --limit 0` has beyond it. A first run over a million users
/// changes every referrer and grants hundreds of thousands of referrals.
pub const CHANGED_REFERRERS_BUDGET: usize = 40_000;
pub const GRANT_ROWS_BUDGET: usize = 20_000;

/// Short names of the stored fields for the table's detail column.
fn short(field: &str) -> &str {
    match field {
        "referred_users_total" => "referred",
        "qualified_referrals" => "qualified",
        f => f.strip_prefix("disqualified_").unwrap_or(f),
    }
}

/// The data the page's script reads (also the numbers its charts and tables show).
#[derive(Debug, Clone, Serialize)]
pub struct PageData {
    pub as_of: String,
    pub digest: String,
    pub backend: &'static str,
    pub scope: String,
    pub dry_run: bool,
    pub referrers: u64,
    pub referred_users: u64,
    pub stats: crate::program::slots::plan::PlanStats,
    /// The slots program's outcomes, in report order: `[name, count]`.
    pub outcomes: Vec<(&'static str, u64)>,
    /// Per grant program, its outcomes: `[name, count]`.
    pub grant_outcomes: Vec<(String, Vec<(&'static str, u64)>)>,
    /// Referrers by qualified referrals: `[bucket, referrers]`.
    pub distribution: Vec<(&'static str, u64)>,
    /// `[referrer, qualified, referred, bonus_slots, current_bonus_slots, badge]`.
    pub top: Vec<(i64, i64, i64, i64, i64, Option<String>)>,
    /// The plan's changes: `[kind, referrer, referred, old bonus, new bonus, delta, detail]`.
    pub changes: Vec<ChangeRow>,
    pub totals: crate::diff::DiffTotals,
    /// Outcome names, indexed by the codes in `referrals`.
    pub outcome_names: Vec<&'static str>,
    /// Referrer → its referrals as `[referred, outcome code, position]`.
    pub referrals: std::collections::BTreeMap<i64, Vec<(i64, u8, Option<u32>)>>,
    /// Referrers whose referrals did not fit the budget (`explain --referrer ID` lists them).
    pub referrals_left_out: u64,
    /// Changes beyond the table's budgets (`plan show --limit 0` lists them all).
    pub changes_left_out: u64,
}

/// One row of the changes table.
pub type ChangeRow = (
    &'static str,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    i64,
    String,
);

const BUCKETS: [(&str, i64, i64); 8] = [
    ("0", 0, 0),
    ("1", 1, 1),
    ("2", 2, 2),
    ("3-4", 3, 4),
    ("5-9", 5, 9),
    ("10-19", 10, 19),
    ("20-49", 20, 49),
    ("50+", 50, i64::MAX),
];

/// The page's data from a run and the diff of its plan.
pub fn data(run: &RunReport, diff: &PlanDiff) -> PageData {
    let c = &run.computation;
    let mut distribution: Vec<(&'static str, u64)> = BUCKETS.iter().map(|b| (b.0, 0)).collect();
    for r in &c.results {
        if let Some(i) = BUCKETS
            .iter()
            .position(|b| (b.1..=b.2).contains(&r.qualified_referrals))
        {
            distribution[i].1 += 1;
        }
    }
    let current = |id: i64| {
        run.plan
            .entries
            .binary_search_by_key(&id, |e| e.referrer_user_id())
            .map(|i| run.plan.entries[i].current_bonus_slots())
            .unwrap_or(0)
    };
    let mut top: Vec<&crate::program::slots::rewards::RewardResult> = c.results.iter().collect();
    top.sort_by_key(|r| (std::cmp::Reverse(r.qualified_referrals), r.referrer_user_id));
    top.truncate(TOP_N);
    let top: Vec<_> = top
        .into_iter()
        .map(|r| {
            (
                r.referrer_user_id,
                r.qualified_referrals,
                r.referred_users_total,
                r.bonus_slots,
                current(r.referrer_user_id),
                r.badge.clone(),
            )
        })
        .collect();

    let (changes, changes_left_out) =
        change_rows(diff, current, CHANGED_REFERRERS_BUDGET, GRANT_ROWS_BUDGET);

    // The referrals: the top referrers', then the changed referrers' by the size of their
    // bonus change, while the budget lasts.
    let mut wanted: Vec<i64> = top.iter().map(|t| t.0).collect();
    // Every changed referrer, also those beyond the table's budget.
    let mut changed: Vec<(i64, i64)> = [
        &diff.up,
        &diff.down,
        &diff.revoked,
        &diff.new_subscriptions,
        &diff.counts_only,
    ]
    .iter()
    .flat_map(|g| g.iter().map(|r| (r.referrer_user_id, r.bonus_delta)))
    .collect();
    changed.sort_by_key(|&(id, delta)| (std::cmp::Reverse(delta.unsigned_abs()), id));
    wanted.extend(changed.into_iter().map(|(id, _)| id));
    let listed = c.listed();
    let mut referrals = std::collections::BTreeMap::new();
    let mut used = 0usize;
    let mut left_out = 0u64;
    for id in wanted {
        // A non-referrer's referrals are not read by a full run: none to show.
        if referrals.contains_key(&id)
            || c.results
                .binary_search_by_key(&id, |r| r.referrer_user_id)
                .is_err()
        {
            continue;
        }
        let start = listed.partition_point(|r| r.referrer_user_id < id);
        let end = listed.partition_point(|r| r.referrer_user_id <= id);
        if used + (end - start) > REFERRAL_BUDGET {
            left_out += 1;
            continue;
        }
        used += end - start;
        referrals.insert(
            id,
            listed[start..end]
                .iter()
                .map(|r| (r.referred_user_id, r.outcome.code(), r.position))
                .collect(),
        );
    }

    let counts = c.outcome_counts();
    PageData {
        as_of: instant::to_rfc3339(run.request.as_of),
        digest: run.plan.digest.clone(),
        backend: run.backend,
        scope: match run.request.scope {
            crate::snapshot::Scope::Full => "full".into(),
            crate::snapshot::Scope::Shard(s) => format!("shard {s}"),
            crate::snapshot::Scope::Referrer(id) => format!("referrer {id}"),
        },
        dry_run: run.request.dry_run,
        referrers: c.results.len() as u64,
        referred_users: counts.iter().map(|(_, n)| n).sum(),
        stats: run.stats.clone(),
        outcomes: counts.iter().map(|(o, n)| (o.as_str(), *n)).collect(),
        grant_outcomes: run
            .grants
            .iter()
            .map(|p| {
                let s = p.stats();
                let outcomes = crate::program::grants::rules::Outcome::ALL
                    .iter()
                    .map(|o| (o.as_str(), s.outcomes.get(o.as_str()).copied().unwrap_or(0)))
                    .collect();
                (p.name.clone(), outcomes)
            })
            .collect(),
        distribution,
        top,
        changes,
        totals: diff.totals.clone(),
        outcome_names: Outcome::ALL
            .iter()
            .chain([Outcome::ReferrerWithoutInviteCode].iter())
            .map(|o| o.as_str())
            .collect(),
        referrals,
        referrals_left_out: left_out,
        changes_left_out,
    }
}

/// The changes table's rows and how many were left out: the changed referrers, largest bonus
/// change first, at most `referrers_budget`; then reversals and grants in the plan's order, at
/// most `grants_budget`. `current` is a referrer's host value now.
pub fn change_rows(
    diff: &PlanDiff,
    current: impl Fn(i64) -> i64,
    referrers_budget: usize,
    grants_budget: usize,
) -> (Vec<ChangeRow>, u64) {
    let groups = [
        ("up", &diff.up),
        ("down", &diff.down),
        ("revoked", &diff.revoked),
        ("new_subscription", &diff.new_subscriptions),
        ("counts_only", &diff.counts_only),
    ];
    let mut referrer_rows: Vec<(&'static str, &crate::diff::ReferrerDiff)> = groups
        .iter()
        .flat_map(|(kind, rows)| rows.iter().map(move |r| (*kind, r)))
        .collect();
    referrer_rows.sort_by_key(|(_, r)| {
        (
            std::cmp::Reverse(r.bonus_delta.unsigned_abs()),
            r.referrer_user_id,
        )
    });
    let mut left_out = referrer_rows.len().saturating_sub(referrers_budget) as u64;
    referrer_rows.truncate(referrers_budget);
    let mut changes: Vec<ChangeRow> = vec![];
    for (kind, r) in referrer_rows {
        let host = r
            .changes
            .iter()
            .find(|f| f.field == crate::program::slots::plan::HOST_FIELD);
        let bonus = |v: &Option<String>| v.as_deref().and_then(|s| s.parse::<i64>().ok());
        let detail: Vec<String> = r
            .changes
            .iter()
            .filter(|f| {
                f.field != crate::program::slots::plan::HOST_FIELD
                    // The bonus columns show the host value; the stored one only where it
                    // differs from it.
                    && !(f.field == "bonus_slots" && host.is_some_and(|h| h.old == f.old))
            })
            .map(|f| {
                format!(
                    "{} {} → {}",
                    short(&f.field),
                    f.old.as_deref().unwrap_or("none"),
                    f.new.as_deref().unwrap_or("none")
                )
            })
            .chain(r.write_error.iter().map(|e| format!("NOT WRITTEN: {e}")))
            .collect();
        let now = current(r.referrer_user_id);
        changes.push((
            kind,
            r.referrer_user_id,
            None,
            host.and_then(|h| bonus(&h.old)).or(Some(now)),
            host.and_then(|h| bonus(&h.new))
                .or(Some(now + r.bonus_delta)),
            r.bonus_delta,
            detail.join(", "),
        ));
    }
    // Reversals first: rarer than grants, and what a reviewer looks for.
    let grant_rows = diff.grants.len() + diff.reversals.len();
    left_out += grant_rows.saturating_sub(grants_budget) as u64;
    let rows = diff
        .reversals
        .iter()
        .map(|g| ("reversal", g))
        .chain(diff.grants.iter().map(|g| ("grant", g)))
        .take(grants_budget);
    for (kind, g) in rows {
        changes.push((
            kind,
            g.referrer_user_id,
            Some(g.referred_user_id),
            None,
            None,
            0,
            format!(
                "{}: {} {} to user {} ({}{})",
                g.program,
                g.party,
                crate::program::grants::report::amount_text(g.credit_days, g.credit_cents),
                g.credited_user_id,
                g.outcome,
                g.cause
                    .as_deref()
                    .map(|c| format!(", {c}"))
                    .unwrap_or_default()
            ),
        ));
    }
    (changes, left_out)
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A horizontal bar chart as inline SVG: one bar per `[label, value]`, the value written beside
/// it; `data-label`/`data-value` on each bar for tools.
fn bar_chart(id: &str, title: &str, rows: &[(String, u64)]) -> String {
    let total: u64 = rows.iter().map(|r| r.1).sum();
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0).max(1);
    let (bar_h, gap, label_w, bar_w) = (18, 6, 130, 260);
    let h = rows.len() * (bar_h + gap) + 8;
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<figure class="chart" id="{id}"><figcaption>{}</figcaption><svg role="img" width="{}" height="{h}" viewBox="0 0 {} {h}">"##,
        esc(title),
        label_w + bar_w + 140,
        label_w + bar_w + 140
    );
    for (i, (label, value)) in rows.iter().enumerate() {
        let y = i * (bar_h + gap) + 4;
        let w = (*value as f64 / max as f64 * bar_w as f64).round() as usize;
        let share = if total == 0 {
            0.0
        } else {
            100.0 * *value as f64 / total as f64
        };
        let _ = write!(
            s,
            r##"<g class="bar" data-label="{l}" data-value="{value}"><text x="{lx}" y="{ty}" text-anchor="end">{l}</text><rect x="{label_w}" y="{y}" width="{w}" height="{bar_h}"></rect><text class="value" x="{vx}" y="{ty}">{value} ({share:.1}%)</text></g>"##,
            l = esc(label),
            lx = label_w - 6,
            ty = y + bar_h - 5,
            vx = label_w + w + 6,
        );
    }
    s.push_str("</svg></figure>");
    s
}

/// The config in force, as TOML: the rules, rewards and grant programs (not the database URL
/// or the HTTP token).
fn rules_toml(cfg: &Config) -> String {
    #[derive(Serialize)]
    struct Shown<'a> {
        rules: &'a crate::config::RulesConfig,
        rewards: &'a crate::config::RewardsConfig,
        new_subscription: &'a crate::config::NewSubscriptionConfig,
        grants: &'a [crate::config::GrantProgramConfig],
    }
    toml::to_string(&Shown {
        rules: &cfg.rules,
        rewards: &cfg.rewards,
        new_subscription: &cfg.new_subscription,
        grants: &cfg.grants,
    })
    .unwrap_or_else(|e| format!("# cannot show the config: {e}"))
}

/// JSON to embed in a `<script>` element: `<`, `>` and `&` written as JSON escapes.
fn script_json(v: &impl Serialize) -> String {
    serde_json::to_string(v)
        .expect("plain data")
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

/// Fills `{{name}}` placeholders in one pass over the template: text put in is never searched
/// again, so a badge or program name holding `{{data}}` stays text.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out =
        String::with_capacity(template.len() + values.iter().map(|v| v.1.len()).sum::<usize>());
    let mut rest = template;
    while let Some(at) = rest.find("{{") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        match after.find("}}").map(|end| (&after[..end], end)) {
            Some((name, end)) if values.iter().any(|v| v.0 == name) => {
                out.push_str(
                    values
                        .iter()
                        .find(|v| v.0 == name)
                        .map(|v| v.1)
                        .unwrap_or(""),
                );
                rest = &after[end + 2..];
            }
            _ => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The whole page.
pub fn render(run: &RunReport, cfg: &Config, diff: &PlanDiff) -> String {
    let d = data(run, diff);
    // Inside <script>, "</script" or "<!--" in a string would end or change the element: JSON
    // may write <, > and & as escapes, so no such sequence is left.
    let json = script_json(&d);
    let mut charts = String::new();
    charts.push_str(&bar_chart(
        "chart-slots",
        "slots program: referred users by outcome",
        &d.outcomes
            .iter()
            .map(|(o, n)| (o.to_string(), *n))
            .collect::<Vec<_>>(),
    ));
    for (name, outcomes) in &d.grant_outcomes {
        charts.push_str(&bar_chart(
            &format!("chart-grants-{}", esc(name)),
            &format!("grant program {name}: referrals by outcome"),
            &outcomes
                .iter()
                .map(|(o, n)| (o.to_string(), *n))
                .collect::<Vec<_>>(),
        ));
    }
    charts.push_str(&bar_chart(
        "chart-distribution",
        "referrers by qualified referrals",
        &d.distribution
            .iter()
            .map(|(b, n)| (b.to_string(), *n))
            .collect::<Vec<_>>(),
    ));
    let mut top = String::new();
    for (id, q, total, bonus, current, badge) in &d.top {
        let _ = write!(
            top,
            r##"<tr><td><a href="#referrer-{id}" class="ref" data-id="{id}">{id}</a></td><td>{q}</td><td>{total}</td><td>{bonus}</td><td>{current}</td><td>{}</td></tr>"##,
            esc(badge.as_deref().unwrap_or("none"))
        );
    }
    let t = &d.totals;
    let s = &d.stats;
    let summary = format!(
        r##"<dl class="summary">
<dt>as of</dt><dd id="as-of">{as_of}</dd>
<dt>digest</dt><dd id="digest"><code>{digest}</code></dd>
<dt>run</dt><dd>{scope} on {backend}{dry}</dd>
<dt>referrers (invite code)</dt><dd id="referrers">{referrers}</dd>
<dt>users in the plan</dt><dd id="planned">{planned} (referrers, and non-referrers holding a reward)</dd>
<dt>referred users</dt><dd id="referred-users">{referred}</dd>
<dt>bonus up / down</dt><dd id="up-down">{up} / {down}</dd>
<dt>bonus delta</dt><dd id="bonus-delta">{delta:+}</dd>
<dt>would write</dt><dd>{rows} referral_rewards rows, {host} host values</dd>
<dt>changes</dt><dd id="changes-total">{changed} referrers ({t_up} up, {t_down} down, {revoked} revoked, {new} new subscriptions, {counts} counts only), {grants} grants, {reversals} reversals</dd>
</dl>"##,
        as_of = esc(&d.as_of),
        digest = esc(&d.digest),
        scope = esc(&d.scope),
        backend = d.backend,
        dry = if d.dry_run { ", dry run" } else { ", applied" },
        referrers = d.referrers,
        planned = s.referrers,
        referred = d.referred_users,
        up = s.rewards_up,
        down = s.rewards_down,
        delta = s.bonus_delta,
        rows = s.reward_rows_to_write,
        host = s.host_values_to_write,
        changed = t.changed,
        t_up = t.up,
        t_down = t.down,
        revoked = t.revoked,
        new = t.new_subscriptions,
        counts = t.counts_only,
        grants = t.grants,
        reversals = t.reversals,
    );
    let title = esc(&format!("referral-rewards audit, {}", d.as_of));
    let config = esc(&rules_toml(cfg));
    let top_n = TOP_N.to_string();
    fill(
        PAGE,
        &[
            ("title", &title),
            ("summary", &summary),
            ("charts", &charts),
            ("top", &top),
            ("top_n", &top_n),
            ("config", &config),
            ("script", SCRIPT),
            ("data", &json),
        ],
    )
}

const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}}</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2430; max-width: 1200px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #d8dee8; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }
dl.summary dt { color: #5b6576; } dl.summary dd { margin: 0; }
.charts { display: flex; flex-wrap: wrap; gap: 24px; }
figure.chart { margin: 0; } figcaption { font-weight: 600; margin-bottom: 4px; }
svg text { font: 12px system-ui, sans-serif; fill: #1d2430; } svg rect { fill: #4c78a8; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid #eceff4; vertical-align: top; }
th { background: #f3f5f8; cursor: pointer; user-select: none; white-space: nowrap; }
th.asc::after { content: " ▲"; } th.desc::after { content: " ▼"; }
td.num, th.num { text-align: right; }
.controls { display: flex; gap: 12px; align-items: center; margin: 8px 0; }
#referrals { background: #f8f9fb; border: 1px solid #d8dee8; padding: 8px 12px; margin-top: 12px; }
pre { background: #f8f9fb; padding: 8px; overflow: auto; }
.kind-up { color: #1a7f37; } .kind-down, .kind-revoked, .kind-reversal { color: #b42318; }
</style>
</head>
<body>
<h1>{{title}}</h1>
{{summary}}
<h2>Outcomes</h2>
<div class="charts">{{charts}}</div>
<h2>Top {{top_n}} referrers</h2>
<p id="referrals-note"></p>
<table id="top"><thead><tr><th>referrer</th><th>qualified</th><th>referred</th><th>bonus slots</th><th>current</th><th>badge</th></tr></thead><tbody>{{top}}</tbody></table>
<h2>Changes of the plan</h2>
<div class="controls">
<label>kind <select id="kind"><option value="">all</option><option>up</option><option>down</option><option>revoked</option><option>new_subscription</option><option>counts_only</option><option>grant</option><option>reversal</option></select></label>
<label>filter <input id="filter" type="search" placeholder="referrer, user or text"></label>
<span id="shown"></span>
<button id="prev" type="button">previous</button><button id="next" type="button">next</button>
</div>
<p id="changes-left-out" hidden></p>
<table id="changes"><thead><tr>
<th data-col="0">kind</th><th data-col="1" class="num">referrer</th><th data-col="2" class="num">referred user</th><th data-col="3" class="num">bonus now</th><th data-col="4" class="num">bonus after</th><th data-col="5" class="num">delta</th><th data-col="6">detail</th>
</tr></thead><tbody></tbody></table>
<div id="referrals" hidden></div>
<h2>Rules and config in force</h2>
<pre id="config">{{config}}</pre>
<script type="application/json" id="data">{{data}}</script>
<script>{{script}}</script>
</body>
</html>
"##;

const SCRIPT: &str = r##"
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const PAGE = 100;
let rows = D.changes, view = rows, sortCol = null, sortDir = 1, page = 0;
const tbody = document.querySelector("#changes tbody");
const cell = (v) => (v === null || v === undefined ? "" : String(v));
function render() {
  const start = page * PAGE, end = Math.min(view.length, start + PAGE);
  const html = [];
  for (let i = start; i < end; i++) {
    const r = view[i];
    html.push('<tr class="kind-' + r[0] + '"><td>' + r[0] + '</td><td class="num"><a href="#referrer-' + r[1] +
      '" class="ref" data-id="' + r[1] + '">' + r[1] + '</a></td><td class="num">' + cell(r[2]) +
      '</td><td class="num">' + cell(r[3]) + '</td><td class="num">' + cell(r[4]) + '</td><td class="num">' +
      (r[5] > 0 ? "+" : "") + r[5] + '</td><td>' + esc(r[6]) + '</td></tr>');
  }
  tbody.innerHTML = html.join("");
  document.getElementById("shown").textContent = view.length === 0 ? "no changes" :
    "rows " + (start + 1) + "–" + end + " of " + view.length;
}
function esc(s) { return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }
function apply() {
  const kind = document.getElementById("kind").value;
  const q = document.getElementById("filter").value.trim().toLowerCase();
  view = rows.filter((r) => (!kind || r[0] === kind) &&
    (!q || r.some((v) => v !== null && String(v).toLowerCase().includes(q))));
  if (sortCol !== null) {
    const c = sortCol;
    view = view.slice().sort((a, b) => {
      const x = a[c], y = b[c];
      if (x === y) return 0;
      if (x === null) return 1;
      if (y === null) return -1;
      return (x < y ? -1 : 1) * sortDir;
    });
  }
  page = 0;
  render();
}
document.querySelectorAll("#changes th").forEach((th) => th.addEventListener("click", () => {
  const c = Number(th.dataset.col);
  sortDir = sortCol === c ? -sortDir : (c >= 1 && c <= 5 ? -1 : 1);
  sortCol = c;
  document.querySelectorAll("#changes th").forEach((h) => h.classList.remove("asc", "desc"));
  th.classList.add(sortDir > 0 ? "asc" : "desc");
  apply();
}));
document.getElementById("kind").addEventListener("change", apply);
document.getElementById("filter").addEventListener("input", apply);
document.getElementById("prev").addEventListener("click", () => { if (page > 0) { page--; render(); } });
document.getElementById("next").addEventListener("click", () => {
  if ((page + 1) * PAGE < view.length) { page++; render(); }
});
function showReferrals(id) {
  const box = document.getElementById("referrals");
  const list = D.referrals[id];
  let html = "<strong>referrer " + id + "</strong> ";
  if (!list) {
    html += "— its referrals are not on this page (it holds the top referrers' and the changed ones' up to its budget): run <code>referral-rewards explain --referrer " + id + " --as-of " + D.as_of + "</code>";
  } else {
    html += "— " + list.length + " referred users<table><thead><tr><th>referred user</th><th>outcome</th><th>position</th></tr></thead><tbody>" +
      list.map((r) => "<tr><td>" + r[0] + "</td><td>" + D.outcome_names[r[1]] + "</td><td>" + cell(r[2]) + "</td></tr>").join("") +
      "</tbody></table>";
  }
  box.innerHTML = html;
  box.hidden = false;
}
document.addEventListener("click", (e) => {
  const a = e.target.closest("a.ref");
  if (a) { e.preventDefault(); showReferrals(a.dataset.id); }
});
document.getElementById("referrals-note").textContent = "Click a referrer for its referrals: " +
  Object.keys(D.referrals).length + " referrers' are on this page (the top ones, then the changed ones by the size of their bonus change)" +
  (D.referrals_left_out > 0 ? "; " + D.referrals_left_out + " changed referrers' did not fit: referral-rewards explain --referrer ID lists them." : ".");
if (D.changes_left_out > 0) {
  const p = document.getElementById("changes-left-out");
  p.textContent = D.changes_left_out + " more changes are not on this page (it holds the " + D.changes.length +
    " largest): referral-rewards plan show PLAN.json --limit 0 lists them all.";
  p.hidden = false;
}
apply();
"##;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::{FieldChange, GrantDiff, ReferrerDiff};
    use crate::program::slots::plan::HOST_FIELD;

    fn referrer(id: i64, delta: i64) -> ReferrerDiff {
        ReferrerDiff {
            referrer_user_id: id,
            bonus_delta: delta,
            changes: vec![
                FieldChange {
                    field: "qualified_referrals".into(),
                    old: Some("1".into()),
                    new: Some("2".into()),
                },
                FieldChange {
                    field: HOST_FIELD.into(),
                    old: Some("5".into()),
                    new: Some((5 + delta).to_string()),
                },
            ],
            write_error: None,
        }
    }

    fn grant(referred: i64, cents: i64) -> GrantDiff {
        GrantDiff {
            program: "p".into(),
            referrer_user_id: 1,
            referred_user_id: referred,
            outcome: "granted".into(),
            cause: None,
            party: "referrer".into(),
            credited_user_id: 1,
            credit_days: None,
            credit_cents: Some(cents),
        }
    }

    /// What a badge or program name holds stays text: placeholders inside inserted text are not
    /// filled, and embedded JSON cannot end its script element.
    #[test]
    fn inserted_text_is_never_markup() {
        let page = fill(
            "<pre>{{config}}</pre><script>{{data}}</script>{{unknown}}",
            &[("config", "{{data}}"), ("data", "x")],
        );
        assert_eq!(page, "<pre>{{data}}</pre><script>x</script>{{unknown}}");
        let evil = "<!--<script></script>&";
        let json = script_json(&evil);
        assert!(!json.contains('<') && !json.contains('>') && !json.contains('&'));
        assert_eq!(serde_json::from_str::<String>(&json).unwrap(), evil);
    }

    /// Over budget, the table keeps the largest bonus changes and the reversals, and counts
    /// what it left out.
    #[test]
    fn the_table_keeps_the_largest_changes_within_its_budgets() {
        let mut d = crate::diff::diff(&crate::report::SavedPlan {
            format: "referral-rewards-plan/3".into(),
            as_of: "2026-11-01T00:00:00Z".into(),
            digest: "d".into(),
            referrers: vec![],
            programs: vec![],
            current: Some(vec![]),
        });
        d.up = vec![referrer(1, 5), referrer(2, 1)];
        d.down = vec![referrer(3, -10)];
        d.grants = vec![grant(10, 100), grant(11, 100)];
        d.reversals = vec![grant(12, -100)];
        let (rows, left_out) = change_rows(&d, |_| 5, 2, 2);
        let kinds: Vec<(&str, i64, Option<i64>)> = rows.iter().map(|r| (r.0, r.1, r.2)).collect();
        assert_eq!(
            kinds,
            [
                ("down", 3, None),
                ("up", 1, None),
                ("reversal", 1, Some(12)),
                ("grant", 1, Some(10))
            ]
        );
        assert_eq!(left_out, 2, "referrer 2 and the grant of user 11");
        assert_eq!((rows[0].3, rows[0].4, rows[0].5), (Some(5), Some(-5), -10));
        assert_eq!(rows[0].6, "qualified 1 → 2");
        let (all, none_left) = change_rows(&d, |_| 5, 10, 10);
        assert_eq!((all.len(), none_left), (6, 0));
    }
}
