//! Hand-written JSON pieces for the hot path's answers, byte for byte what `serde_json` writes for the same values
//! (the tests hold them equal), without the trip through `core::fmt` that serde takes for times and numbers.

use chrono::{DateTime, Datelike, Timelike, Utc};

/// `time` as chrono's `Serialize` writes it (RFC 3339, `Z`, the shortest of 0, 3, 6 or 9 fraction digits), without
/// the quotes.
pub fn rfc3339(out: &mut Vec<u8>, time: DateTime<Utc>) {
    let year = time.year();
    if !(0..=9999).contains(&year) {
        // Outside four digits chrono writes a sign; that path is not hot.
        let text = time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        out.extend_from_slice(text.as_bytes());
        return;
    }
    let (mut second, mut nano) = (time.second(), time.nanosecond());
    if nano >= 1_000_000_000 {
        // A leap second, as chrono writes it.
        second += 1;
        nano -= 1_000_000_000;
    }
    digits(out, year as u32, 4);
    out.push(b'-');
    digits(out, time.month(), 2);
    out.push(b'-');
    digits(out, time.day(), 2);
    out.push(b'T');
    digits(out, time.hour(), 2);
    out.push(b':');
    digits(out, time.minute(), 2);
    out.push(b':');
    digits(out, second, 2);
    if nano != 0 {
        out.push(b'.');
        if nano % 1_000_000 == 0 {
            digits(out, nano / 1_000_000, 3);
        } else if nano % 1_000 == 0 {
            digits(out, nano / 1_000, 6);
        } else {
            digits(out, nano, 9);
        }
    }
    out.push(b'Z');
}

/// `value` in decimal, as serde writes an unsigned integer.
pub fn uint(out: &mut Vec<u8>, value: u64) {
    let width = value.checked_ilog10().map_or(1, |log| log as usize + 1);
    digits(out, value, width);
}

/// The last `width` decimal digits of `value`, zero-padded.
fn digits(out: &mut Vec<u8>, value: impl Into<u64>, width: usize) {
    let mut value = value.into();
    let start = out.len();
    out.resize(start + width, b'0');
    for slot in out[start..].iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn serde_text(time: DateTime<Utc>) -> String {
        serde_json::to_string(&time)
            .unwrap()
            .trim_matches('"')
            .to_owned()
    }

    fn ours(time: DateTime<Utc>) -> String {
        let mut out = Vec::new();
        rfc3339(&mut out, time);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn times_are_written_as_serde_writes_them() {
        let base = Utc.with_ymd_and_hms(2026, 12, 4, 17, 5, 9).unwrap();
        let mut cases = vec![
            base,
            Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 6, 1, 0, 0, 0).unwrap(),
            // A leap second.
            Utc.from_utc_datetime(
                &chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
                    .unwrap()
                    .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
                    .unwrap(),
            ),
        ];
        for nanos in [
            1,
            10,
            999,
            1_000,
            120_000,
            999_999,
            1_000_000,
            7_000_000,
            123_456_789,
            999_999_999,
        ] {
            cases.push(base + chrono::Duration::nanoseconds(nanos));
        }
        // A spread of instants at millisecond precision, as holds' expiries are.
        let mut ms = 1_700_000_000_000_i64;
        for _ in 0..2_000 {
            ms = ms.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1) % 400_000_000_000_000;
            cases.push(DateTime::from_timestamp_millis(ms.abs()).unwrap());
        }
        for time in cases {
            assert_eq!(ours(time), serde_text(time), "{time:?}");
        }
    }

    #[test]
    fn integers_are_written_as_serde_writes_them() {
        for value in [0, 1, 9, 10, 99, 100, 4_294_967_295, u64::MAX] {
            let mut out = Vec::new();
            uint(&mut out, value);
            assert_eq!(out, serde_json::to_vec(&value).unwrap());
        }
    }
}
