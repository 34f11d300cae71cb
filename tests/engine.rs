//! The engine end to end on SQLite and PostgreSQL (TIMESTAMP and TIMESTAMPTZ schemas, sessions
//! in far time zones, a case-insensitive collation), over real connections.

mod common;

use common::*;
use referral_rewards::config::Config;
use referral_rewards::engine::EngineError;
use referral_rewards::program::slots::compute;
use referral_rewards::program::slots::plan::Plan;
use referral_rewards::program::slots::rules;
use referral_rewards::snapshot::Scope;
use referral_rewards::store::{RunFinish, Writes};

each_backend!(
    every_outcome_applied_then_nothing_to_do,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;

        let dry = db.reconcile(Scope::Full, now(), true).await.unwrap();
        assert_eq!(
            db.scalar("SELECT COUNT(*) FROM reward_runs").await,
            0,
            "a dry run leaves no run row"
        );
        assert_eq!(db.scalar("SELECT COUNT(*) FROM referral_rewards").await, 0);

        let r = db.reconcile(Scope::Full, now(), false).await.unwrap();
        assert_eq!(
            r.plan.digest, dry.plan.digest,
            "the dry run planned what the apply did"
        );
        assert_eq!(
            db.reward_row(1).await.unwrap(),
            row(
                ["25", "9", "0", "2", "3", "3", "2", "15"],
                Some("verified_referrer")
            )
        );
        assert_eq!(
            db.reward_row(30).await.unwrap(),
            row(["1", "0", "1", "0", "0", "0", "0", "0"], None)
        );
        assert_eq!(
            db.reward_row(40).await,
            None,
            "no row is written for all zeros"
        );
        // The referrer without a subscription got a scout one carrying the bonus.
        let scout = db
        .rows("SELECT tier, status, CAST(max_domains AS TEXT), CAST(referral_bonus_domains AS TEXT), CAST(expires_at AS TEXT) FROM subscriptions WHERE user_id = 1")
        .await;
        assert_eq!(
            scout,
            [[
                Some("scout".into()),
                Some("active".into()),
                Some("5".into()),
                Some("15".into()),
                None
            ]]
        );
        assert_eq!(db.bonus(30).await, Some(0), "stale bonus set back");
        assert_eq!(
            db.bonus(40).await,
            Some(0),
            "a non-referrer's bonus is revoked"
        );
        assert_eq!(db.bonus(41).await, Some(0));
        let a = r.applied.as_ref().unwrap();
        assert_eq!((a.reward_rows_written, a.host_values_written), (2, 3));
        assert!(a.conflicts.is_empty());
        let ledger = db.scalar("SELECT COUNT(*) FROM reward_changes").await;
        // Referrer 1: 7 non-zero counts + badge + host; 30: 2 counts + host; 40: host.
        assert_eq!(ledger, 9 + 3 + 1);
        assert_eq!(
            db.rows("SELECT status, digest FROM reward_runs").await,
            [[Some("succeeded".into()), Some(r.plan.digest.clone())]]
        );

        // A second run at the same as-of writes nothing.
        let before = db.state().await;
        let again = db.reconcile(Scope::Full, now(), false).await.unwrap();
        let a = again.applied.unwrap();
        assert_eq!(
            (
                a.reward_rows_written,
                a.host_values_written,
                a.ledger_rows_written
            ),
            (0, 0, 0)
        );
        assert_eq!(db.state().await, before);
    }
);

each_backend!(one_referrer_equals_the_full_run, |db: TestDb| async move {
    db.load(&every_outcome()).await;
    for id in [1, 30, 40] {
        db.reconcile(Scope::Referrer(id), now(), false)
            .await
            .unwrap();
    }
    let one: Vec<_> = [
        db.reward_row(1).await,
        db.reward_row(30).await,
        db.reward_row(40).await,
    ]
    .into();
    let bonuses = [db.bonus(1).await, db.bonus(30).await, db.bonus(40).await];
    let full = db.reconcile(Scope::Full, now(), false).await.unwrap();
    assert_eq!(
        full.applied.unwrap().reward_rows_written,
        0,
        "nothing left for the full run"
    );
    let after: Vec<_> = [
        db.reward_row(1).await,
        db.reward_row(30).await,
        db.reward_row(40).await,
    ]
    .into();
    assert_eq!(one, after);
    assert_eq!(bonuses, [Some(15), Some(0), Some(0)]);
});

each_backend!(
    revocation_of_a_user_who_lost_the_invite_code,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;
        db.reconcile(Scope::Full, now(), false).await.unwrap();
        assert_eq!(db.bonus(1).await, Some(15));
        db.exec("UPDATE users SET invite_code = NULL WHERE id = 1")
            .await;

        let r = db
            .reconcile(Scope::Referrer(1), now(), false)
            .await
            .unwrap();
        assert_eq!(r.plan.entries.len(), 1);
        assert_eq!(db.bonus(1).await, Some(0));
        assert_eq!(db.reward_row(1).await.unwrap(), row(["0"; 8], None));
        let full = db.reconcile(Scope::Full, now(), false).await.unwrap();
        assert_eq!(full.applied.unwrap().ledger_rows_written, 0);
    }
);

each_backend!(unknown_referrer_is_refused, |db: TestDb| async move {
    db.load(&every_outcome()).await;
    let e = db
        .reconcile(Scope::Referrer(999), now(), true)
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::UnknownReferrer(999)), "{e}");
});

each_backend!(
    failure_mid_apply_leaves_everything_as_it_was,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;
        // The host raises on the second subscription update.
        if db.is_pg() {
            db.exec(
            "CREATE SEQUENCE fault_seq;
             CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF nextval('fault_seq') >= 2 THEN RAISE EXCEPTION 'injected fault'; END IF; RETURN NEW; END $$;
             CREATE TRIGGER fault BEFORE UPDATE ON subscriptions FOR EACH ROW EXECUTE FUNCTION fault();",
        )
        .await;
        } else {
            db.exec(
            "CREATE TABLE fault_counter (n INTEGER NOT NULL); INSERT INTO fault_counter VALUES (0);
             CREATE TRIGGER fault BEFORE UPDATE ON subscriptions BEGIN
               UPDATE fault_counter SET n = n + 1;
               SELECT RAISE(ABORT, 'injected fault') WHERE (SELECT n FROM fault_counter) >= 2;
             END;",
        )
        .await;
        }
        let before = db.state().await;
        let e = db.reconcile(Scope::Full, now(), false).await.unwrap_err();
        let EngineError::RunFailed { run_id, message } = &e else {
            panic!("{e}")
        };
        assert!(message.contains("injected fault"), "{message}");
        assert_eq!(db.state().await, before, "no host or job-owned row changed");
        let runs = db
            .rows("SELECT CAST(id AS TEXT), status, error FROM reward_runs")
            .await;
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0][0].as_deref(), Some(run_id.to_string().as_str()));
        assert_eq!(runs[0][1].as_deref(), Some("failed"));
        assert!(runs[0][2].as_deref().unwrap().contains("injected fault"));
    }
);

each_backend!(
    host_value_changed_between_snapshot_and_write_is_a_conflict,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;
        let cfg = Config::default();
        let store = db.store().await;
        let window = rules::ip_window(now(), cfg.rules.ip_window_days);
        let snap = store.snapshot(Scope::Full, window, None).await.unwrap();
        let c = compute::compute(&snap, &cfg, now()).unwrap();
        let plan = Plan::build(
            c.results,
            snap.stored_rewards,
            &snap.host_bonus,
            Scope::Full,
        );

        // The host changes user 30's bonus after the snapshot.
        db.exec("UPDATE subscriptions SET referral_bonus_domains = 7 WHERE user_id = 30")
            .await;

        let mut lock = store.try_lock(Scope::Full).await.unwrap().expect("lock");
        let run_id = store
            .start_run(Scope::Full, now(), now(), None)
            .await
            .unwrap();
        let finish = RunFinish {
            stats: plan.stats(),
            outcome_counts: "{}".into(),
            digest: plan.digest.clone(),
            error: None,
            programs: None,
        };
        let before_apply = referral_rewards::instant::from_datetime(chrono::Utc::now());
        let writes = Writes {
            plan: &plan,
            grants: &[],
            run_id,
            as_of: now(),
            new_subscription: &cfg.new_subscription,
            finish: &finish,
            progress: None,
        };
        let out = store.apply(&mut lock, &writes).await.unwrap();
        store.release(lock).await;
        assert_eq!(out.conflicts, [30]);
        assert_eq!(db.bonus(30).await, Some(7), "not overwritten");
        assert_eq!(db.bonus(40).await, Some(0), "the others applied");
        assert_eq!(
        db.scalar("SELECT COUNT(*) FROM reward_changes WHERE referrer_user_id = 30 AND field = 'subscriptions.referral_bonus_domains'").await,
        0,
        "no ledger row for a value not written"
    );
        assert_eq!(db.scalar("SELECT conflicts FROM reward_runs").await, 1);
        let run = store.runs(1).await.unwrap().remove(0);
        // The job's clock stamps the run row's end (not the database's), at the write.
        let after_apply = referral_rewards::instant::from_datetime(chrono::Utc::now());
        let finished = run.finished_at.unwrap();
        assert!(
            (before_apply..=after_apply).contains(&finished),
            "{before_apply} <= {finished} <= {after_apply}"
        );
        store.close().await;

        // The next run picks it up.
        db.reconcile(Scope::Full, now(), false).await.unwrap();
        assert_eq!(db.bonus(30).await, Some(0));
    }
);

each_backend!(
    a_second_applying_run_is_refused_while_the_lock_is_held,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;
        let store = db.store().await;
        let lock = store
            .try_lock(Scope::Full)
            .await
            .unwrap()
            .expect("first lock");
        let e = db.reconcile(Scope::Full, now(), false).await.unwrap_err();
        assert!(matches!(e, EngineError::Locked), "{e}");
        assert_eq!(db.scalar("SELECT COUNT(*) FROM reward_runs").await, 0);
        // A dry run needs no lock.
        db.reconcile(Scope::Full, now(), true).await.unwrap();
        drop(lock);
        db.reconcile(Scope::Full, now(), false).await.unwrap();
    }
);

each_backend!(
    orphaned_running_row_is_marked_abandoned,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;
        let store = db.store().await;
        store
            .start_run(Scope::Full, now(), now(), None)
            .await
            .unwrap();
        store.close().await;
        let r = db.reconcile(Scope::Full, now(), false).await.unwrap();
        assert_eq!(r.abandoned_runs, 1);
        assert_eq!(
            db.rows("SELECT status FROM reward_runs ORDER BY id").await,
            [[Some("abandoned".into())], [Some("succeeded".into())]]
        );
    }
);

/// PostgreSQL types its columns; text times are SQLite's concern.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparseable_or_odd_times() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    db.load(&every_outcome()).await;
    // 'T' separator and no fraction are the same instant as the canonical form.
    db.exec("UPDATE users SET created_at = '2026-10-25T12:00:00' WHERE id = 6")
        .await;
    db.reconcile(Scope::Full, now(), false).await.unwrap();
    assert_eq!(db.reward_row(1).await.unwrap()[1].as_deref(), Some("9"));
    db.exec("UPDATE users SET created_at = 'yesterday' WHERE id = 6")
        .await;
    let e = db.reconcile(Scope::Full, now(), false).await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("users.created_at")
            && text.contains("row with id 6")
            && text.contains("yesterday"),
        "{text}"
    );
}

// 'infinity' is a PostgreSQL timestamp value.
each_pg_backend!(postgres_infinite_times_are_data, |db: TestDb| async move {
    db.load(&every_outcome()).await;
    // Never expires: still a candidate; subscribed at -infinity: no cooldown, first to claim.
    db.exec("UPDATE subscriptions SET expires_at = 'infinity' WHERE user_id = 16")
        .await;
    db.exec("UPDATE subscriptions SET started_at = '-infinity' WHERE user_id = 15")
        .await;
    db.reconcile(Scope::Full, now(), false).await.unwrap();
    let r = db.reward_row(1).await.unwrap();
    // 15 now subscribed before 3 and keeps "u3": 3 becomes the duplicate; counts are unchanged.
    assert_eq!(
        r,
        row(
            ["25", "9", "0", "2", "3", "3", "2", "15"],
            Some("verified_referrer")
        )
    );
    // As `explain` runs it: a listing, with the facts.
    let store = db.store().await;
    let listing = referral_rewards::engine::RunControl {
        list_uncounted: true,
        ..Default::default()
    };
    let req = referral_rewards::engine::RunRequest {
        scope: Scope::Referrer(1),
        as_of: now(),
        dry_run: true,
    };
    let explain =
        referral_rewards::engine::run_controlled(&store, &Config::default(), req, &listing)
            .await
            .unwrap();
    store.close().await;
    let outcome = |id| {
        explain
            .computation
            .referrals
            .iter()
            .find(|x| x.referred_user_id == id)
            .unwrap()
            .outcome
    };
    assert_eq!(
        outcome(15),
        referral_rewards::program::slots::rules::Outcome::Qualified
    );
    assert_eq!(
        outcome(3),
        referral_rewards::program::slots::rules::Outcome::DuplicateIp
    );
    assert_eq!(
        outcome(16),
        referral_rewards::program::slots::rules::Outcome::Qualified
    );
    // explain shows them as infinite times, and its text words them.
    let cfg = referral_rewards::config::Config::default();
    let e = referral_rewards::explain::referrer(&explain, &cfg, 1, None);
    let facts = |id: i64| {
        &e.referrals
            .iter()
            .find(|r| r.referred_user_id == id)
            .unwrap()
            .facts
    };
    assert_eq!(facts(16).expires_at.as_deref(), Some("infinity"));
    assert_eq!(facts(15).subscribed_at.as_deref(), Some("-infinity"));
    assert!(referral_rewards::explain::referrer_text(&e, &cfg).contains("-infinity"));
});

// The grant programs' host state is in the reference schema: payments, and each user's balances
// (credit_cents defaulting to 0, credit_until NULL).
each_backend!(
    reference_schema_has_the_grant_host_state,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;
        db.exec(&format!(
            "INSERT INTO payments (id, user_id, amount_cents, currency, status, created_at) \
         VALUES (1, 2, 1000, 'USD', 'succeeded', {})",
            db.ts(now())
        ))
        .await;
        assert_eq!(
        db.rows("SELECT CAST(credit_cents AS TEXT), CAST(credit_until AS TEXT) FROM users WHERE id = 2")
            .await,
        [[Some("0".to_owned()), None]]
    );
        assert_eq!(
            db.scalar("SELECT COUNT(*) FROM payments p JOIN users u ON u.id = p.user_id")
                .await,
            1
        );
        // The job's results do not depend on it.
        db.reconcile(Scope::Full, now(), false).await.unwrap();
        assert_eq!(db.reward_row(1).await.unwrap()[1].as_deref(), Some("9"));
    }
);
