//! `reconcile --shard K/N`: N shard runs together give exactly the full run's result.

mod common;

use std::time::Duration;

use common::*;
use referral_rewards::demo::DemoSpec;
use referral_rewards::engine::EngineError;
use referral_rewards::snapshot::{Scope, Shard};

async fn with_demo(backend: Backend) -> Option<TestDb> {
    let db = TestDb::new(backend).await?;
    load_demo(&db).await;
    Some(db)
}

async fn load_demo(db: &TestDb) {
    db.load_demo(3000, 9, now()).await;
}

each_backend!(
    shards_together_equal_the_full_run,
    |db: TestDb| async move {
        let Some(full) = with_demo(db.backend).await else {
            return;
        };
        let plan = full.reconcile(Scope::Full, now(), true).await.unwrap().plan;
        full.reconcile(Scope::Full, now(), false).await.unwrap();
        let want = full.outcome_state().await;

        for count in [1u32, 3, 8] {
            let Some(sharded) = with_demo(db.backend).await else {
                return;
            };
            let mut entries = Vec::new();
            for index in 1..=count {
                let scope = Scope::Shard(Shard { index, count });
                let dry = sharded.reconcile(scope, now(), true).await.unwrap();
                assert!(
                    dry.plan
                        .entries
                        .iter()
                        .all(|e| Shard::of(e.referrer_user_id(), count) == index)
                );
                entries.extend(dry.plan.entries);
            }
            entries.sort_by_key(|e| e.referrer_user_id());
            assert_eq!(
                entries, plan.entries,
                "{count} shards plan what the full run plans"
            );

            for index in 1..=count {
                sharded
                    .reconcile(Scope::Shard(Shard { index, count }), now(), false)
                    .await
                    .unwrap();
            }
            assert_eq!(
                sharded.outcome_state().await,
                want,
                "{count} shards apply what the full run applies"
            );
            let again = sharded.reconcile(Scope::Full, now(), false).await.unwrap();
            assert_eq!(again.applied.unwrap().ledger_rows_written, 0);
        }
    }
);

each_backend!(
    shard_locks_exclude_a_full_run_and_the_same_shard_only,
    |db: TestDb| async move {
        let Some(db) = with_demo(db.backend).await else {
            return;
        };
        let store = db.store().await;
        let one = Scope::Shard(Shard { index: 1, count: 2 });
        let two = Scope::Shard(Shard { index: 2, count: 2 });
        let held = store.try_lock(one).await.unwrap().expect("shard 1/2");
        assert!(
            store.try_lock(one).await.unwrap().is_none(),
            "the same shard twice"
        );
        assert!(
            store.try_lock(Scope::Full).await.unwrap().is_none(),
            "a full run beside a shard"
        );
        let other = store
            .try_lock(two)
            .await
            .unwrap()
            .expect("another shard beside it");
        // Shards of another count would cover users twice: refused while 2-shards run.
        for k in 1..=3 {
            let third = Scope::Shard(Shard { index: k, count: 3 });
            assert!(
                store.try_lock(third).await.unwrap().is_none(),
                "{k}/3 beside 1/2 and 2/2"
            );
            let e = db.reconcile(third, now(), false).await.unwrap_err();
            assert!(matches!(e, EngineError::Locked), "{e}");
        }
        // A shard run proceeds while the other shard's lock is held; a full run is refused.
        store.release(held).await;
        db.reconcile(one, now(), false).await.unwrap();
        let e = db.reconcile(Scope::Full, now(), false).await.unwrap_err();
        assert!(matches!(e, EngineError::Locked), "{e}");
        let e = db
            .reconcile(Scope::Shard(Shard { index: 1, count: 3 }), now(), false)
            .await
            .unwrap_err();
        assert!(matches!(e, EngineError::Locked), "still one 2-shard: {e}");
        store.release(other).await;
        // No 2-shard left: 3-shards may run, and then 2-shards are the ones refused.
        let third = store
            .try_lock(Scope::Shard(Shard { index: 1, count: 3 }))
            .await
            .unwrap()
            .expect("1/3 once no 2-shard runs");
        assert!(
            store.try_lock(two).await.unwrap().is_none(),
            "2/2 beside 1/3"
        );
        store.release(third).await;
        db.reconcile(Scope::Full, now(), false).await.unwrap();
        store.close().await;
    }
);

/// The binary-COPY snapshot and the SELECT snapshot are the same data, full and sharded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_and_select_snapshots_are_identical() {
    for backend in [Backend::PgTimestamp, Backend::PgTimestamptz] {
        let Some(db) = with_demo(backend).await else {
            return;
        };
        db.load(&every_outcome_shifted()).await;
        // Stored rewards to read too, some with a badge and some without.
        db.reconcile(Scope::Full, now(), false).await.unwrap();
        let window = referral_rewards::program::slots::rules::ip_window(now(), 30);
        for scope in [Scope::Full, Scope::Shard(Shard { index: 2, count: 3 })] {
            let mut snaps = Vec::new();
            for copy in [true, false] {
                let store = referral_rewards::store::Store::connect(
                    &db.url,
                    &referral_rewards::store::ConnectOptions {
                        pg_binary_copy: copy,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
                let mut s = store.snapshot(scope, window, None).await.unwrap();
                assert_eq!(s.via_copy, copy);
                s.timings.clear();
                s.via_copy = false;
                s.referred.sort_by_key(|u| u.id);
                s.registrations.sort();
                s.referrer_events.sort();
                s.stored_rewards.sort_by_key(|r| r.referrer_user_id);
                s.host_bonus.sort();
                snaps.push(s);
                store.close().await;
            }
            assert!(!snaps[0].referred.is_empty());
            assert_eq!(snaps[0].referred, snaps[1].referred, "{scope:?}");
            assert_eq!(snaps[0].registrations, snaps[1].registrations, "{scope:?}");
            assert_eq!(
                snaps[0].referrer_events, snaps[1].referrer_events,
                "{scope:?}"
            );
            assert_eq!(snaps[0].referrers, snaps[1].referrers);
            let stored = &snaps[0].stored_rewards;
            assert!(stored.iter().any(|r| r.badge.is_some()), "{scope:?}");
            assert!(stored.iter().any(|r| r.badge.is_none()), "{scope:?}");
            assert_eq!(
                snaps[0].stored_rewards, snaps[1].stored_rewards,
                "{scope:?}"
            );
            assert_eq!(snaps[0].host_bonus, snaps[1].host_bonus, "{scope:?}");
        }
    }
}

/// The every-outcome fixture with its ids moved past the demo population's, for NULLs,
/// infinities and odd IP hashes in the same database.
fn every_outcome_shifted() -> Fixture {
    const OFF: i64 = 1_000_000;
    let mut f = every_outcome();
    for u in &mut f.users {
        u.id += OFF;
        u.referred_by = u.referred_by.map(|r| r + OFF);
        u.invite_code = u.invite_code.as_ref().map(|c| format!("{c}-shifted"));
    }
    for s in &mut f.subs {
        s.user_id += OFF;
    }
    for e in &mut f.events {
        e.id += OFF * 16;
        e.user_id = e.user_id.map(|u| u + OFF);
    }
    f
}

/// `demo-data` on PostgreSQL writes its rows frozen and all-visible (COPY FREEZE, after a
/// TRUNCATE in its transaction), as a host's tables are once vacuumed; where TRUNCATE is
/// refused (here: another table's key on `users`), or a host table holds rows already, it loads
/// the same rows without FREEZE and deletes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_data_on_postgres_loads_frozen_rows_unless_truncate_is_refused() {
    let all_visible = "SELECT count(*) FROM pg_class \
        WHERE relname IN ('users', 'payments') AND relpages > 0 AND relallvisible = relpages";
    let spec = DemoSpec {
        users: 500,
        seed: 3,
        anchor: now(),
    };
    let Some(frozen) = TestDb::new(Backend::PgTimestamp).await else {
        return;
    };
    frozen.store().await.load_demo(&spec).await.unwrap();
    assert_eq!(
        frozen.scalar(all_visible).await,
        2,
        "every page all-visible"
    );

    let Some(refused) = TestDb::new(Backend::PgTimestamp).await else {
        return;
    };
    refused
        .exec("CREATE TABLE app_orders (user_id BIGINT REFERENCES users (id))")
        .await;
    refused.store().await.load_demo(&spec).await.unwrap();
    assert_eq!(
        refused.scalar(all_visible).await,
        0,
        "loaded without FREEZE"
    );
    let count = "SELECT count(*) FROM users";
    assert_eq!(
        refused.scalar(count).await,
        frozen.scalar(count).await,
        "the same rows either way"
    );

    // A row already in another host table (`users` empty) is kept: nothing is truncated.
    let Some(kept) = TestDb::new(Backend::PgTimestamp).await else {
        return;
    };
    kept.exec(
        "INSERT INTO telemetry_events (id, user_id, event_name, ip_hash, created_at) \
         VALUES (999999999, NULL, 'page_view', NULL, '2026-01-01 00:00:00')",
    )
    .await;
    kept.store().await.load_demo(&spec).await.unwrap();
    assert_eq!(
        kept.scalar("SELECT count(*) FROM telemetry_events WHERE id = 999999999")
            .await,
        1
    );
    assert_eq!(kept.scalar(all_visible).await, 0, "loaded without FREEZE");
}

// The scans start before the snapshot's own connection has read the referrers, and keep what
// arrives meanwhile (a shard only its own users' rows) to decode once they are known. Held back
// here (`REFERRAL_REWARDS_TEST_HOLD_REFERRERS_FILE`) until both scans that wait for them have read
// every row, a full run and a shard run give the digests they give without the hold.
each_pg_backend!(
    rows_read_before_the_referrers_are_known_give_the_same_run,
    |db: TestDb| async move {
        load_demo(&db).await;
        let dir = tempfile::tempdir().unwrap();
        let hold = dir.path().join("hold");
        let digest = |args: &[&str], held: bool| -> String {
            let mut c = dry_run_binary(&db.url);
            c.args(args)
                .env("RUST_LOG", "referral_rewards=debug")
                .env_remove("REFERRAL_REWARDS_TEST_HOLD_REFERRERS_FILE")
                .stdout(std::process::Stdio::piped());
            if held {
                std::fs::write(&hold, "").unwrap();
                c.env("REFERRAL_REWARDS_TEST_HOLD_REFERRERS_FILE", &hold);
            }
            let mut child = c.spawn().unwrap();
            let reader = wait_for_log(
                &mut child,
                Duration::from_secs(120),
                "the scans read every row before the referrers are known",
                |log| {
                    !held
                        || (log.contains("test hold")
                            && log
                                .matches("scan read before the referrers were known")
                                .count()
                                == 2)
                },
            );
            if held {
                std::fs::remove_file(&hold).unwrap();
            }
            let out = child.wait_with_output().unwrap();
            let log = reader.join().unwrap();
            assert!(out.status.success(), "{log}");
            let stdout = String::from_utf8(out.stdout).unwrap();
            stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix("digest"))
                .unwrap_or_else(|| panic!("no digest in {stdout}"))
                .trim()
                .to_owned()
        };
        for args in [&[][..], &["--shard", "2/3"][..]] {
            let want = digest(args, false);
            assert_eq!(digest(args, true), want, "{args:?}");
        }
    }
);
