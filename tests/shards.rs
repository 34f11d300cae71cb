//! `reconcile --shard K/N`: N shard runs together give exactly the full run's result.

mod common;

use common::*;
use referral_rewards::demo::DemoSpec;
use referral_rewards::engine::EngineError;
use referral_rewards::snapshot::{Scope, Shard};

async fn with_demo(backend: Backend) -> Option<TestDb> {
    let db = TestDb::new(backend).await?;
    let store = db.store().await;
    store
        .load_demo(&DemoSpec {
            users: 3000,
            seed: 9,
            anchor: now(),
        })
        .await
        .unwrap();
    store.close().await;
    Some(db)
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
        // A shard run proceeds while the other shard's lock is held; a full run is refused.
        drop(held);
        db.reconcile(one, now(), false).await.unwrap();
        let e = db.reconcile(Scope::Full, now(), false).await.unwrap_err();
        assert!(matches!(e, EngineError::Locked), "{e}");
        drop(other);
        db.reconcile(Scope::Full, now(), false).await.unwrap();
        store.close().await;
    }
);
