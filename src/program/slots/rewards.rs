//! SPEC section 3, "Rewards": bonus slots and badges, and the per-referrer result type.
//!
//! The two rules are plain functions of a referrer's `qualified_referrals`, applied to each
//! referrer's counts once they are known (see `compute`).

use serde::{Deserialize, Serialize};

use crate::config::RewardsConfig;

/// One referrer's result: the report fields of SPEC section 5 without `current_bonus_slots`,
/// which is also the shape of a `referral_rewards` row. A referrer with no row reads as
/// [`RewardResult::zero`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardResult {
    pub referrer_user_id: i64,
    pub referred_users_total: i64,
    pub qualified_referrals: i64,
    pub disqualified_self_referral: i64,
    pub disqualified_cooldown: i64,
    pub disqualified_missing_ip: i64,
    pub disqualified_shared_ip: i64,
    pub disqualified_duplicate_ip: i64,
    pub bonus_slots: i64,
    pub badge: Option<String>,
}

impl RewardResult {
    /// "A referrer with no row reads as all zeros and no badge"; also what a user who is not
    /// a referrer is owed.
    pub fn zero(referrer_user_id: i64) -> Self {
        Self {
            referrer_user_id,
            referred_users_total: 0,
            qualified_referrals: 0,
            disqualified_self_referral: 0,
            disqualified_cooldown: 0,
            disqualified_missing_ip: 0,
            disqualified_shared_ip: 0,
            disqualified_duplicate_ip: 0,
            bonus_slots: 0,
            badge: None,
        }
    }

    /// The stored fields by name, in SPEC order: the ledger records one row per differing
    /// field. Numbers as decimal text, the badge as its name or NULL.
    pub fn fields(&self) -> [(&'static str, Option<String>); 9] {
        [
            (
                "referred_users_total",
                Some(self.referred_users_total.to_string()),
            ),
            (
                "qualified_referrals",
                Some(self.qualified_referrals.to_string()),
            ),
            (
                "disqualified_self_referral",
                Some(self.disqualified_self_referral.to_string()),
            ),
            (
                "disqualified_cooldown",
                Some(self.disqualified_cooldown.to_string()),
            ),
            (
                "disqualified_missing_ip",
                Some(self.disqualified_missing_ip.to_string()),
            ),
            (
                "disqualified_shared_ip",
                Some(self.disqualified_shared_ip.to_string()),
            ),
            (
                "disqualified_duplicate_ip",
                Some(self.disqualified_duplicate_ip.to_string()),
            ),
            ("bonus_slots", Some(self.bonus_slots.to_string())),
            ("badge", self.badge.clone()),
        ]
    }
}

/// "`bonus_slots = (qualified_referrals / batch_size) * bonus_per_batch` (integer division)".
/// `qualified_referrals` is never negative; both settings are validated to fit an `i32`, so the
/// product fits an `i64`.
pub fn bonus_slots(qualified_referrals: i64, cfg: &RewardsConfig) -> i64 {
    qualified_referrals.div_euclid(cfg.batch_size) * cfg.bonus_per_batch
}

/// "`badge`: the highest badge whose threshold `qualified_referrals` reaches; … none below"
/// the lowest threshold. Thresholds are validated strictly increasing, so the last one
/// reached is the highest.
pub fn badge(qualified_referrals: i64, cfg: &RewardsConfig) -> Option<&str> {
    cfg.badges
        .iter()
        .rev()
        .find(|b| qualified_referrals >= b.threshold)
        .map(|b| b.name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Badge;

    fn eval(qualified: &[i64], cfg: &RewardsConfig) -> (Vec<i64>, Vec<Option<String>>) {
        (
            qualified.iter().map(|&q| bonus_slots(q, cfg)).collect(),
            qualified
                .iter()
                .map(|&q| badge(q, cfg).map(str::to_owned))
                .collect(),
        )
    }

    #[test]
    fn bonus_slots_use_integer_division() {
        let (bonus, _) = eval(&[0, 1, 2, 3, 5, 6, 10], &RewardsConfig::default());
        assert_eq!(bonus, [0, 0, 0, 5, 5, 10, 15]);
    }

    #[test]
    fn bonus_per_batch_zero_gives_no_slots() {
        let cfg = RewardsConfig {
            bonus_per_batch: 0,
            ..RewardsConfig::default()
        };
        assert_eq!(eval(&[9], &cfg).0, [0]);
    }

    #[test]
    fn badges_at_their_thresholds_and_none_below() {
        let (_, badge) = eval(&[0, 2, 3, 9, 10, 11], &RewardsConfig::default());
        let v = |s: &str| Some(s.to_owned());
        assert_eq!(
            badge,
            [
                None,
                None,
                v("verified_referrer"),
                v("verified_referrer"),
                v("elite_referrer"),
                v("elite_referrer")
            ]
        );
    }

    #[test]
    fn no_badges_configured_gives_no_badge() {
        let cfg = RewardsConfig {
            badges: vec![],
            ..RewardsConfig::default()
        };
        assert_eq!(eval(&[100], &cfg).1, [None]);
    }

    #[test]
    fn three_badges_pick_the_highest_reached() {
        let cfg = RewardsConfig {
            badges: vec![
                Badge {
                    name: "a".into(),
                    threshold: 1,
                },
                Badge {
                    name: "b".into(),
                    threshold: 2,
                },
                Badge {
                    name: "c".into(),
                    threshold: 4,
                },
            ],
            ..RewardsConfig::default()
        };
        let (_, badge) = eval(&[1, 3, 4], &cfg);
        assert_eq!(
            badge,
            [Some("a".into()), Some("b".into()), Some("c".into())]
        );
    }
}
