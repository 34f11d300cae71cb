//! Instants as integer microseconds since the Unix epoch, UTC.
//!
//! Every time crosses the store boundary as an `Instant`, so that the rules compare instants,
//! never text: on SQLite `'… 12:00:00'` and `'… 12:00:00.000000'` are the same instant.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc};

/// Microseconds since 1970-01-01T00:00:00Z.
pub type Instant = i64;

pub const MICROS_PER_DAY: i64 = 86_400 * 1_000_000;

pub fn from_datetime(t: DateTime<Utc>) -> Instant {
    t.timestamp_micros()
}

pub fn to_datetime(t: Instant) -> DateTime<Utc> {
    Utc.timestamp_micros(t)
        .single()
        .expect("instants come from valid datetimes")
}

/// `YYYY-MM-DD HH:MM:SS.ffffff`, the canonical text form written to SQLite.
pub fn to_sql_text(t: Instant) -> String {
    // Field by field: chrono's `format` re-parses its pattern on every call, and this runs
    // once per row when loading millions of rows.
    let dt = to_datetime(t).naive_utc();
    let (d, tm) = (dt.date(), dt.time());
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
        d.year(),
        d.month(),
        d.day(),
        tm.hour(),
        tm.minute(),
        tm.second(),
        t.rem_euclid(1_000_000)
    )
}

/// RFC 3339 with microseconds, for people and JSON.
pub fn to_rfc3339(t: Instant) -> String {
    to_datetime(t).to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// [`to_rfc3339`], or `infinity` / `-infinity` for an instant beyond chrono's range (PostgreSQL's
/// infinite times, and what adding days to them gives): the facts shown to people may hold them.
pub fn to_rfc3339_or_infinite(t: Instant) -> String {
    match Utc.timestamp_micros(t).single() {
        Some(d) => d.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        None if t > 0 => "infinity".into(),
        None => "-infinity".into(),
    }
}

/// Parses a SQLite time column: `YYYY-MM-DD HH:MM:SS[.ffffff]`, a `T` separator accepted,
/// an optional `Z` or numeric offset honoured, and a bare date read as midnight UTC.
pub fn parse_sql_text(s: &str) -> Option<Instant> {
    if let Some(t) = parse_canonical(s.as_bytes()) {
        return Some(t);
    }
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros());
    }
    let with_t = s.replacen(' ', "T", 1);
    if let Ok(t) = DateTime::parse_from_rfc3339(&with_t) {
        return Some(t.timestamp_micros());
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(&with_t, fmt) {
            return Some(t.and_utc().timestamp_micros());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Some(d.and_time(NaiveTime::MIN).and_utc().timestamp_micros());
    }
    None
}

/// The fast path for the common shape, `YYYY-MM-DD HH:MM:SS[.f…]` (or `T`), no offset: digits
/// read directly, without chrono's format machinery (this runs three times per referred user).
fn parse_canonical(b: &[u8]) -> Option<Instant> {
    fn num(b: &[u8]) -> Option<u32> {
        b.iter().try_fold(0u32, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + (c - b'0') as u32)
        })
    }
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b' ' | b'T')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(num(&b[0..4])? as i32, num(&b[5..7])?, num(&b[8..10])?)?;
    let (h, m, sec) = (num(&b[11..13])?, num(&b[14..16])?, num(&b[17..19])?);
    let micros = match &b[19..] {
        [] => 0,
        [b'.', frac @ ..]
            if (1..=9).contains(&frac.len()) && frac.iter().all(u8::is_ascii_digit) =>
        {
            // Up to nanoseconds accepted; instants keep microseconds (truncated).
            let digits = &frac[..frac.len().min(6)];
            num(digits)? * 10u32.pow(6 - digits.len() as u32)
        }
        _ => return None,
    };
    let time = NaiveTime::from_hms_micro_opt(h, m, sec, micros)?;
    Some(date.and_time(time).and_utc().timestamp_micros())
}

/// Parses `--as-of`: RFC 3339 with any offset; a time without an offset is UTC. Only years 1
/// to 9999 are accepted: every backend stores them (an as-of becomes a run's `as_of` and may
/// become a subscription's `started_at`), and every window computed from them stays in range.
pub fn parse_as_of(s: &str) -> Result<Instant, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty time".into());
    }
    let t = parse_sql_text(s).ok_or_else(|| {
        format!("{s:?} is not a time; expected RFC 3339 such as 2026-11-01T12:00:00Z")
    })?;
    let year = to_datetime(t).year();
    if !(1..=9999).contains(&year) {
        return Err(format!(
            "{s:?} is in the year {year}; only the years 1 to 9999 can be stored by every database"
        ));
    }
    Ok(t)
}

/// The calendar date (UTC) of an instant, as `YYYY-MM-DD`: used for index-friendly coarse
/// range filters on SQLite text columns before the exact comparison in Rust.
pub fn date_text(t: Instant) -> String {
    to_datetime(t).format("%Y-%m-%d").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_fraction_and_no_fraction_are_the_same_instant() {
        assert_eq!(
            parse_sql_text("2026-11-01 12:00:00"),
            parse_sql_text("2026-11-01 12:00:00.000000")
        );
        assert_eq!(
            parse_sql_text("2026-11-01T12:00:00"),
            parse_sql_text("2026-11-01 12:00:00")
        );
    }

    #[test]
    fn fast_path_agrees_with_chrono() {
        for s in [
            "2026-11-01 12:00:00",
            "2026-11-01T12:00:00",
            "2026-11-01 12:00:00.5",
            "2026-11-01 12:00:00.000001",
            "1999-12-31 23:59:59.999999",
            "2024-02-29 00:00:00",
        ] {
            let slow =
                NaiveDateTime::parse_from_str(&s.replacen('T', " ", 1), "%Y-%m-%d %H:%M:%S%.f")
                    .unwrap()
                    .and_utc()
                    .timestamp_micros();
            assert_eq!(parse_canonical(s.as_bytes()), Some(slow), "{s}");
        }
        // Not the canonical shape: left to the general parser.
        for s in [
            "2026-11-01 12:00:00Z",
            "2026-11-01T12:00:00+02:00",
            " 2026-11-01 12:00:00",
            "2026-02-30 00:00:00",
            "2026-11-01 12:00",
        ] {
            assert_eq!(parse_canonical(s.as_bytes()), None, "{s}");
        }
        assert_eq!(parse_sql_text("2026-02-30 00:00:00"), None);
    }

    #[test]
    fn microseconds_are_kept() {
        let a = parse_sql_text("2026-11-01 12:00:00.000001").unwrap();
        let b = parse_sql_text("2026-11-01 12:00:00").unwrap();
        assert_eq!(a - b, 1);
    }

    #[test]
    fn as_of_with_offset_is_converted_to_utc() {
        let a = parse_as_of("2026-11-01T14:00:00+02:00").unwrap();
        let b = parse_as_of("2026-11-01T12:00:00Z").unwrap();
        assert_eq!(a, b);
        assert_eq!(parse_as_of("2026-11-01T12:00:00").unwrap(), b);
    }

    #[test]
    fn as_of_outside_years_1_to_9999_is_refused() {
        // These parse as instants: refused for their year.
        for (s, year) in [
            ("+10000-01-01T00:00:00", "10000"),
            ("0000-12-31T23:59:59Z", "0"),
            ("-0001-01-01T00:00:00", "-1"),
            ("+262000-01-01", "262000"),
        ] {
            assert!(parse_sql_text(s).is_some(), "{s} parses");
            let e = parse_as_of(s).expect_err(s);
            assert!(
                e.contains(&format!("year {year};")) && e.contains("1 to 9999"),
                "{s}: {e}"
            );
        }
        // Beyond what any form parses: not a time at all.
        assert!(
            parse_as_of("+262143-12-31T23:59:59")
                .unwrap_err()
                .contains("not a time")
        );
        assert!(parse_as_of("9999-12-31T23:59:59.999999Z").is_ok());
        assert!(parse_as_of("0001-01-01T00:00:00Z").is_ok());
        // An offset that moves the instant past the end of 9999 is refused too.
        assert!(
            parse_as_of("9999-12-31T23:00:00-02:00")
                .unwrap_err()
                .contains("year 10000")
        );
    }

    #[test]
    fn as_of_garbage_is_refused() {
        assert!(parse_as_of("yesterday").is_err());
        assert!(parse_as_of("").is_err());
    }

    #[test]
    fn text_round_trip() {
        let t = parse_sql_text("2026-11-01 12:34:56.789012").unwrap();
        assert_eq!(to_sql_text(t), "2026-11-01 12:34:56.789012");
        assert_eq!(parse_sql_text(&to_sql_text(t)), Some(t));
    }
}
