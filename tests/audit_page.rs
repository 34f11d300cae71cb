//! The audit page in a real browser: headless Chromium, driven over the DevTools protocol,
//! renders the page of a demo dry run; it loads with no console error and no network request,
//! its charts and tables hold the numbers of the run's JSON summary, and sorting, filtering and
//! the referrals of a referrer work.
//!
//! Chromium comes from `REFERRAL_REWARDS_TEST_CHROMIUM` (the Makefile sets it, installing
//! Debian's `chromium` where missing), else `chromium` on PATH. Without it the test fails when
//! `CI=true` and says loudly that it was skipped elsewhere.
//! `REFERRAL_REWARDS_AUDIT_SCREENSHOT=PATH` also saves a PNG of the page there (docs/).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

mod cdp;
use cdp::{Cdp, launch};

const BIN: &str = env!("CARGO_BIN_EXE_referral-rewards");
const AS_OF: &str = "2026-11-01T00:00:00Z";

fn chromium() -> Option<PathBuf> {
    let found = cdp::find_chromium();
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "CI=true and no Chromium: set REFERRAL_REWARDS_TEST_CHROMIUM or install Debian's chromium (make test does)"
            );
        }
        eprintln!(
            "\n*** SKIPPED: the audit page's browser test needs Chromium (Debian's chromium; `make test` installs it) ***\n"
        );
    }
    found
}

fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    let o = Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

#[test]
fn the_audit_page_renders_offline_in_chromium_with_the_numbers_of_the_json_report() {
    let Some(chromium) = chromium() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The demo's config: config.toml with its two example grant programs enabled.
    let config =
        referral_rewards::config::enable_grant_examples(include_str!("../config.toml")).unwrap();
    std::fs::write(d.join("config.toml"), config).unwrap();
    let db = format!("sqlite://{}", d.join("demo.db").display());
    let base = ["--config", "config.toml", "--database-url", db.as_str()];
    let with =
        |args: &[&str]| -> Vec<String> { base.iter().chain(args).map(|s| s.to_string()).collect() };
    let args = with(&[
        "demo-data",
        "--users",
        "4000",
        "--seed",
        "7",
        "--anchor",
        AS_OF,
    ]);
    run(d, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let args = with(&[
        "reconcile",
        "--dry-run",
        "--as-of",
        AS_OF,
        "--report",
        "audit.html",
        "--diff",
        "--output",
        "json",
    ]);
    let o = run(d, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let totals = &report["diff"]["totals"];
    let page_path = std::fs::canonicalize(d.join("audit.html")).unwrap();
    let page_url = format!("file://{}", page_path.display());

    let (_browser, ws) = launch(&chromium);
    let mut cdp = Cdp::connect(&ws);
    cdp.open_page();
    let load_ms = cdp.load(&page_url);
    eprintln!(
        "audit page: {} bytes, loaded in {load_ms} ms",
        std::fs::metadata(&page_path).unwrap().len()
    );

    // A picture of the page as it opens (the viewport), for the docs when asked.
    let shot = cdp.call("Page.captureScreenshot", json!({ "format": "png" }));
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    if let Some(path) = std::env::var_os("REFERRAL_REWARDS_AUDIT_SCREENSHOT") {
        std::fs::write(path, &png).unwrap();
    }

    // No console error, no exception, no request but the page itself.
    assert_no_errors(&cdp);
    let requests: Vec<&str> = cdp
        .events
        .iter()
        .filter(|e| e["method"] == "Network.requestWillBeSent")
        .map(|e| e["params"]["request"]["url"].as_str().unwrap())
        .collect();
    assert_eq!(
        requests,
        [page_url.as_str()],
        "the page alone, nothing else"
    );

    // The charts hold the JSON report's numbers: the slots outcomes and each grant program's.
    let mut bars = |chart: &str| -> Value {
        cdp.eval(&format!(
            "Object.fromEntries([...document.querySelectorAll('#{chart} g.bar')].map(g => [g.dataset.label, Number(g.dataset.value)]))"
        ))
    };
    let slots = bars("chart-slots");
    for (outcome, n) in report["outcomes"].as_object().unwrap() {
        assert_eq!(slots[outcome], *n, "{outcome}");
    }
    let programs = report["grant_programs"].as_array().unwrap();
    assert_eq!(programs.len(), 2);
    for p in programs {
        let chart = bars(&format!("chart-grants-{}", p["program"].as_str().unwrap()));
        for (outcome, n) in p["outcomes"].as_object().unwrap() {
            assert_eq!(chart[outcome], *n, "{} {outcome}", p["program"]);
        }
    }
    let text = |cdp: &mut Cdp, id: &str| -> String {
        cdp.eval(&format!("document.getElementById('{id}').textContent"))
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(text(&mut cdp, "digest"), report["digest"].as_str().unwrap());
    assert_eq!(
        text(&mut cdp, "bonus-delta"),
        format!("{:+}", report["stats"]["bonus_delta"].as_i64().unwrap())
    );

    // The changes table: every change once, paged by 100.
    let all = totals["changed"].as_u64().unwrap()
        + totals["grants"].as_u64().unwrap()
        + totals["reversals"].as_u64().unwrap();
    assert!(all > 100, "enough changes to page: {all}");
    assert_eq!(text(&mut cdp, "shown"), format!("rows 1–100 of {all}"));
    let rows = |cdp: &mut Cdp| -> Vec<Vec<String>> {
        serde_json::from_value(cdp.eval(
            "[...document.querySelectorAll('#changes tbody tr')].map(tr => [...tr.cells].map(td => td.textContent))",
        ))
        .unwrap()
    };
    assert_eq!(rows(&mut cdp).len(), 100);

    // Sorting by delta: the largest first, then on a second click the smallest first.
    let deltas: Vec<i64> = ["up", "down", "revoked", "new_subscriptions", "counts_only"]
        .iter()
        .flat_map(|g| report["diff"][g].as_array().unwrap().iter())
        .map(|r| r["bonus_delta"].as_i64().unwrap())
        .collect();
    let delta = |row: &Vec<String>| row[5].trim_start_matches('+').parse::<i64>().unwrap();
    cdp.eval("document.querySelector('#changes th[data-col=\"5\"]').click()");
    let sorted = rows(&mut cdp);
    assert_eq!(delta(&sorted[0]), *deltas.iter().max().unwrap());
    assert!(sorted.windows(2).all(|w| delta(&w[0]) >= delta(&w[1])));
    cdp.eval("document.querySelector('#changes th[data-col=\"5\"]').click()");
    let sorted = rows(&mut cdp);
    assert_eq!(delta(&sorted[0]), (*deltas.iter().min().unwrap()).min(0));
    assert!(sorted.windows(2).all(|w| delta(&w[0]) <= delta(&w[1])));

    // Filtering by kind: the revoked ones, as many as the report counts.
    cdp.eval(
        "(() => { const s = document.getElementById('kind'); s.value = 'revoked'; s.dispatchEvent(new Event('change')); })()",
    );
    let revoked = totals["revoked"].as_u64().unwrap();
    assert!(revoked > 0);
    assert!(text(&mut cdp, "shown").ends_with(&format!(" of {revoked}")));
    assert!(rows(&mut cdp).iter().all(|r| r[0] == "revoked"));
    // Filtering by text: one referrer's rows.
    let one = report["diff"]["up"][0]["referrer_user_id"]
        .as_i64()
        .unwrap();
    cdp.eval(&format!(
        "(() => {{ document.getElementById('kind').value = ''; const f = document.getElementById('filter'); f.value = '{one}'; f.dispatchEvent(new Event('input')); }})()"
    ));
    let filtered = rows(&mut cdp);
    assert!(!filtered.is_empty());
    assert!(
        filtered
            .iter()
            .all(|r| r.iter().any(|c| c.contains(&one.to_string())))
    );
    // Every row of that referrer passed the filter, on whichever page (the filter matches any
    // cell holding the text, so other rows pass too).
    let counts = cdp.eval(&format!(
        "[D.changes.filter(r => r[1] === {one}).length, view.filter(r => r[1] === {one}).length, view.length]"
    ));
    assert_eq!(counts[0], counts[1], "referrer {one}'s rows: {counts}");
    assert!(counts[0].as_u64().unwrap() > 0);
    assert!(text(&mut cdp, "shown").ends_with(&format!(" of {}", counts[2])));

    // A top referrer's referrals, one click away.
    cdp.eval("document.querySelector('#top a.ref').click()");
    let shown = cdp.eval(
        "(() => { const b = document.getElementById('referrals'); return [b.hidden, b.querySelectorAll('tbody tr').length]; })()",
    );
    assert_eq!(shown[0], false);
    let first_top = cdp.eval("Number(document.querySelector('#top a.ref').dataset.id)");
    let data = cdp.eval("JSON.parse(document.getElementById('data').textContent).referrals");
    let expected = data[first_top.to_string()].as_array().unwrap().len();
    assert_eq!(shown[1], expected);
    assert!(expected > 0);

    // The handlers above threw nothing either.
    assert_no_errors(&cdp);
}

/// No exception, no console error and no logged error among the events seen so far.
fn assert_no_errors(cdp: &Cdp) {
    let errors: Vec<&Value> = cdp
        .events
        .iter()
        .filter(|e| {
            e["method"] == "Runtime.exceptionThrown"
                || (e["method"] == "Runtime.consoleAPICalled" && e["params"]["type"] == "error")
                || (e["method"] == "Log.entryAdded" && e["params"]["entry"]["level"] == "error")
        })
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}
