//! The snapshot does not depend on the host's indexes: on the indexes a typical application has
//! (`sql/reference/typical_indexes.sql`) a full run reads exactly the rows it reads on the
//! recommended ones, and computes the same digest.

mod common;

use common::*;
use referral_rewards::config::Config;
use referral_rewards::demo::DemoSpec;
use referral_rewards::engine;
use referral_rewards::program::slots::rules;
use referral_rewards::snapshot::{Scope, Snapshot};

/// config.toml with its example grant programs enabled, as `make demo` does.
fn grants_config() -> Config {
    let text = referral_rewards::config::enable_grant_examples(include_str!("../config.toml"))
        .expect("config.toml's grant examples");
    let cfg = Config::parse(&text).unwrap();
    assert_eq!(cfg.grants.len(), 2);
    cfg
}

/// The snapshot's rows in one order, without its timings and read path.
fn canonical(mut s: Snapshot) -> String {
    s.referrers.sort_unstable();
    s.referred.sort_by_key(|u| u.id);
    s.registrations.sort();
    s.referrer_events.sort();
    s.stored_rewards.sort_by_key(|r| r.referrer_user_id);
    s.host_bonus.sort_unstable();
    s.uncounted.sort_unstable();
    if let Some(g) = s.grants.as_mut() {
        g.referrals.sort_by_key(|r| (r.referrer_id, r.user_id));
        g.registrations.sort();
        g.referrer_events.sort();
        g.payments.sort_by_key(|p| p.id);
        g.ledger
            .sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    }
    s.timings.clear();
    s.via_copy = false;
    s.side_read = false;
    format!("{s:#?}")
}

/// The names of the indexes on the host tables.
async fn index_names(db: &TestDb) -> Vec<String> {
    let sql = if db.is_pg() {
        "SELECT indexname FROM pg_indexes WHERE tablename IN \
         ('users', 'subscriptions', 'telemetry_events', 'payments') ORDER BY 1"
    } else {
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name IN \
         ('users', 'subscriptions', 'telemetry_events', 'payments') ORDER BY 1"
    };
    db.rows(sql)
        .await
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect()
}

each_backend!(
    typical_indexes_read_the_same_snapshot_as_the_recommended_ones,
    |db: TestDb| async move {
        let cfg = grants_config();
        let store = db.store().await;
        store
            .load_demo(&DemoSpec {
                users: 4000,
                seed: 12,
                anchor: now(),
            })
            .await
            .unwrap();
        store.close().await;
        // Stored rewards and ledger rows to read as well, then a change for the next run.
        db.reconcile_with(&cfg, Scope::Full, now(), false)
            .await
            .unwrap();
        db.exec("UPDATE users SET is_verified = NOT is_verified WHERE id % 7 = 3")
            .await;

        let window = rules::ip_window(now(), cfg.rules.ip_window_days);
        let read = engine::grants_read(&cfg);
        let snapshot = |db: &TestDb| {
            let read = read.clone();
            let url = db.url.clone();
            let opts = db.opts();
            async move {
                let store = referral_rewards::store::Store::connect(&url, &opts)
                    .await
                    .unwrap();
                let s = store
                    .snapshot_listing(Scope::Full, window, read, true)
                    .await
                    .unwrap();
                store.close().await;
                s
            }
        };
        let recommended = snapshot(&db).await;
        assert!(recommended.referred.len() > 1000 && !recommended.registrations.is_empty());
        assert!(!recommended.stored_rewards.is_empty());
        assert!(!recommended.grants.as_ref().unwrap().ledger.is_empty());
        let digest = db
            .reconcile_with(&cfg, Scope::Full, now(), true)
            .await
            .unwrap()
            .plan
            .digest;

        let before = index_names(&db).await;
        assert!(before.contains(&"telemetry_events_registration".to_owned()));
        db.exec(include_str!("../sql/reference/typical_indexes.sql"))
            .await;
        db.exec("ANALYZE").await;
        let after = index_names(&db).await;
        assert!(!after.contains(&"telemetry_events_registration".to_owned()));
        assert!(!after.contains(&"payments_user_time".to_owned()));
        assert!(after.contains(&"telemetry_events_user_event".to_owned()));

        let typical = snapshot(&db).await;
        assert_eq!(canonical(typical), canonical(recommended));
        let again = db
            .reconcile_with(&cfg, Scope::Full, now(), true)
            .await
            .unwrap()
            .plan
            .digest;
        assert_eq!(again, digest);
    }
);
