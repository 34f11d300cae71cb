//! The shared fixture: one referrer with a referred user for every outcome and boundary.

use super::*;

pub fn now() -> i64 {
    at("2026-11-01 12:00:00")
}

pub fn user(id: i64, referred_by: Option<i64>) -> U {
    U {
        id,
        created_at: now() - 100 * DAY,
        is_active: true,
        is_verified: true,
        invite_code: None,
        referred_by,
    }
}

pub fn sub(user_id: i64) -> S {
    S {
        user_id,
        tier: "trader".into(),
        status: "active".into(),
        bonus: 0,
        started_at: Some(now() - 90 * DAY),
        expires_at: None,
    }
}

pub fn ev(id: i64, user: i64, name: &str, ip: Option<&str>, t: i64) -> E {
    E {
        id,
        user_id: Some(user),
        name: name.into(),
        ip_hash: ip.map(str::to_owned),
        created_at: t,
    }
}

/// Referrer 1 (no subscription) with referred users covering every outcome and boundary;
/// referrer 30 (empty-string invite code) who referred itself and holds a stale bonus; user 40,
/// not a referrer, holding a bonus; user 41, referred by 40.
pub fn every_outcome() -> Fixture {
    let mut f = Fixture::default();
    let mut r1 = user(1, None);
    r1.invite_code = Some("R1".into());
    f.users.push(r1);
    // Referrer 1's own events: two inside the window at its ends, two just outside.
    let n = now();
    f.events.push(ev(1001, 1, "login", Some("r-ip"), n - DAY));
    f.events
        .push(ev(1002, 1, "page_view", Some("edge-ip"), n - 30 * DAY));
    f.events.push(ev(1003, 1, "login", Some("now-ip"), n));
    f.events
        .push(ev(1004, 1, "login", Some("old-ip"), n - 30 * DAY - 1));
    f.events.push(ev(1005, 1, "login", Some("future"), n + 1));
    f.events.push(ev(1006, 1, "login", Some("  "), n - DAY));

    let mut eid = 2000;
    let mut add =
        |f: &mut Fixture, id: i64, ip: Option<&str>, tweak: &dyn Fn(&mut U, &mut S) -> bool| {
            let mut u = user(id, Some(1));
            let mut s = sub(id);
            let keep_sub = tweak(&mut u, &mut s);
            f.users.push(u);
            if keep_sub {
                f.subs.push(s);
            }
            if let Some(ip) = ip {
                eid += 1;
                f.events
                    .push(ev(eid, id, "user_registered", Some(ip), n - 100 * DAY));
            }
        };
    let plain = |_: &mut U, _: &mut S| true;
    add(&mut f, 2, Some("u2"), &plain); // qualified
    add(&mut f, 3, Some("u3"), &plain); // qualified
    add(&mut f, 4, Some("a1"), &plain); // qualified; also registered from "B2" below
    add(&mut f, 5, Some("u5"), &|u, _| {
        u.created_at = now() - 7 * DAY + 1; // cooldown, one microsecond inside
        true
    });
    add(&mut f, 6, Some("u6"), &|u, _| {
        u.created_at = now() - 7 * DAY; // exactly at the cutoff: no cooldown
        true
    });
    add(&mut f, 7, Some("  "), &plain); // missing_ip (blank)
    add(&mut f, 8, Some(""), &plain); // missing_ip (empty)
    add(&mut f, 9, None, &plain); // missing_ip (no registration event)
    add(&mut f, 10, Some("r-ip"), &plain); // shared_ip
    add(&mut f, 11, Some("edge-ip"), &plain); // shared_ip: the window's first instant
    add(&mut f, 12, Some("old-ip"), &plain); // qualified: one microsecond before the window
    add(&mut f, 13, Some("future"), &plain); // qualified: one microsecond after now
    add(&mut f, 14, Some("u2"), &|_, s| {
        s.started_at = Some(now() - 80 * DAY); // duplicate of 2, who subscribed earlier
        true
    });
    add(&mut f, 15, Some("u3"), &|_, s| {
        s.started_at = None; // NULL sorts last: duplicate of 3
        true
    });
    add(&mut f, 16, Some("u16"), &|_, s| {
        s.expires_at = Some(now()); // expires exactly now: a candidate
        true
    });
    add(&mut f, 17, Some("u17"), &|_, s| {
        s.expires_at = Some(now() - 1);
        true
    });
    add(&mut f, 18, Some("u18"), &|u, _| {
        u.is_active = false;
        true
    });
    add(&mut f, 19, Some("u19"), &|u, _| {
        u.is_verified = false;
        true
    });
    add(&mut f, 20, Some("u20"), &|_, _| false);
    add(&mut f, 21, Some("u21"), &|_, s| {
        s.tier = "Trader".into();
        true
    });
    add(&mut f, 22, Some("u22"), &|_, s| {
        s.status = "canceled".into();
        true
    });
    add(&mut f, 23, Some("now-ip"), &plain); // shared_ip: the window's last instant
    add(&mut f, 24, Some("u24"), &|_, s| {
        s.started_at = Some(now() - 7 * DAY + 1); // cooldown through started_at
        true
    });
    add(&mut f, 25, Some("u25"), &|_, s| {
        s.started_at = Some(now() - 7 * DAY);
        true
    });
    add(&mut f, 26, Some("B2"), &|_, s| {
        // Qualifies only if user 4's signup IP is "a1" (byte order), not "B2" (en-US order).
        s.started_at = Some(now() - 80 * DAY);
        true
    });
    f.events
        .push(ev(2900, 4, "user_registered", Some("B2"), n - 100 * DAY));
    f.events.push(ev(
        2901,
        4,
        "user_registered",
        Some("\u{3000}"),
        n - 100 * DAY,
    ));
    // Not a registration (name compared exactly): ignored for the signup IP.
    f.events
        .push(ev(2902, 9, "User_Registered", Some("x9"), n - 100 * DAY));

    // Referrer 30: empty-string invite code, referred itself, holds a stale bonus.
    let mut r30 = user(30, Some(30));
    r30.invite_code = Some(String::new());
    f.users.push(r30);
    let mut s30 = sub(30);
    s30.bonus = 99;
    f.subs.push(s30);
    f.events
        .push(ev(3001, 30, "user_registered", Some("u30"), n - 100 * DAY));

    // User 40 is no referrer but holds a bonus; 41 was referred by 40.
    f.users.push(user(40, None));
    let mut s40 = sub(40);
    s40.bonus = 10;
    f.subs.push(s40);
    f.users.push(user(41, Some(40)));
    f.subs.push(sub(41));
    f
}

pub fn row(v: [&str; 8], badge: Option<&str>) -> Vec<Option<String>> {
    let mut r: Vec<Option<String>> = v.iter().map(|s| Some(s.to_string())).collect();
    r.push(badge.map(str::to_owned));
    r
}
