//! The value forms every section shares: durations, sizes, counts, client
//! networks and socket addresses. Each has a parser (or a standard one) and
//! a `Validator` helper that reports a bad form or a value out of range at
//! its position and gives the default in its place.

use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use super::Validator;

/// Shortest timeout or interval accepted (100 ms): zero would close every
/// connection at once, and anything shorter is below scheduling noise.
pub const MIN_DURATION: Duration = Duration::from_millis(100);
/// Any timeout or interval without a range of its own, and `routes.read_timeout`
/// and `idle_timeout` (long streams): 100 ms to 24 h.
pub const DURATION_RANGE: RangeInclusive<Duration> = MIN_DURATION..=Duration::from_secs(24 * 3600);
/// Any size without a range of its own, and `routes.max_body`: 0 bytes (no
/// body allowed) to 1 GiB.
pub const SIZE_RANGE: RangeInclusive<usize> = 0..=1024 * 1024 * 1024;

impl Validator<'_> {
    /// A timeout or interval without a range of its own ([`DURATION_RANGE`]).
    pub(super) fn duration(
        &mut self,
        value: Option<&Spanned<String>>,
        default: Duration,
    ) -> Duration {
        self.duration_in(value, default, DURATION_RANGE)
    }

    /// A duration setting; a bad form or a value outside `range` is reported
    /// with the allowed range, and `default` stands in for it.
    pub(super) fn duration_in(
        &mut self,
        value: Option<&Spanned<String>>,
        default: Duration,
        range: RangeInclusive<Duration>,
    ) -> Duration {
        self.ranged(
            value,
            default,
            range,
            "duration",
            parse_duration,
            show_duration,
        )
    }

    /// A size without a range of its own ([`SIZE_RANGE`]).
    pub(super) fn size(&mut self, value: Option<&Spanned<String>>, default: usize) -> usize {
        self.size_in(value, default, SIZE_RANGE)
    }

    /// A size setting; a bad form or a value outside `range` is reported with
    /// the allowed range, and `default` stands in for it.
    pub(super) fn size_in(
        &mut self,
        value: Option<&Spanned<String>>,
        default: usize,
        range: RangeInclusive<usize>,
    ) -> usize {
        self.ranged(value, default, range, "size", parse_size, show_size)
    }

    /// A string setting read by `parse`, in `range` (shown with `show`); a
    /// mistake is reported as a bad `what` or one out of range, and
    /// `default` stands in for it.
    fn ranged<T: Copy + PartialOrd>(
        &mut self,
        value: Option<&Spanned<String>>,
        default: T,
        range: RangeInclusive<T>,
        what: &str,
        parse: fn(&str) -> Result<T, String>,
        show: fn(T) -> String,
    ) -> T {
        let Some(value) = value else { return default };
        let text = value.get_ref();
        match parse(text) {
            Ok(v) if range.contains(&v) => v,
            Ok(_) => {
                self.at(
                    value,
                    format!(
                        "{what} {text:?} is out of range: allowed from {} to {}",
                        show(*range.start()),
                        show(*range.end())
                    ),
                );
                default
            }
            Err(e) => {
                self.at(value, format!("bad {what} {text:?}: {e}"));
                default
            }
        }
    }

    /// A count setting (`what` names it); a value outside `range` is
    /// reported with the allowed range, and `default` stands in for it.
    pub(super) fn count<T: Copy + PartialOrd + fmt::Display>(
        &mut self,
        value: Option<&Spanned<T>>,
        default: T,
        range: RangeInclusive<T>,
        what: &str,
    ) -> T {
        match value {
            Some(v) if !range.contains(v.get_ref()) => {
                self.at(
                    v,
                    format!(
                        "{what} = {} is out of range: allowed from {} to {}",
                        v.get_ref(),
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
            Some(v) => *v.get_ref(),
            None => default,
        }
    }

    pub(super) fn networks(&mut self, list: &[Spanned<String>]) -> Vec<IpNet> {
        list.iter()
            .filter_map(|n| match n.get_ref().parse::<IpNet>() {
                Ok(net) => Some(net),
                Err(_) => {
                    self.at(
                        n,
                        format!(
                            "bad network {:?}: expected CIDR like \"127.0.0.1/32\"",
                            n.get_ref()
                        ),
                    );
                    None
                }
            })
            .collect()
    }

    pub(super) fn addr(&mut self, value: &Spanned<String>, what: &str) -> Option<SocketAddr> {
        match value.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.at(
                    value,
                    format!(
                        "bad {what} address {:?}: expected IP:PORT, e.g. \"127.0.0.1:8080\" or \"[::1]:8080\"",
                        value.get_ref()
                    ),
                );
                None
            }
        }
    }
}

/// Parses a duration as the README documents it: a whole number and one
/// unit, `ms`, `s`, `m` or `h`, with nothing between them (`"500ms"`,
/// `"30s"`, `"2m"`, `"1h"`). The error says how to write it.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let Ok(n) = number.parse::<u64>() else {
        return Err("write a whole number and a unit: ms, s, m or h, e.g. \"30s\"".into());
    };
    let scale = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(format!("a duration needs a unit: \"{n}s\", or ms, m, h")),
        _ if unit.starts_with('.') => {
            return Err("no fractions: write a smaller unit, e.g. \"1500ms\" for 1.5 s".into())
        }
        _ => {
            return Err(format!(
                "unknown unit {:?}: write ms, s, m or h right after the number, e.g. \"{n}s\"",
                unit.trim()
            ))
        }
    };
    n.checked_mul(scale)
        .map(Duration::from_millis)
        .ok_or_else(|| "too large".to_string())
}

/// A duration in the shortest unit that says it exactly, as it is written
/// in the config: `"100ms"`, `"90s"`, `"10m"`, `"24h"`.
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".into(),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

/// Parses a size: a whole number of bytes, optionally followed by a unit:
/// `B`, `KiB`, `MiB`, `GiB` (powers of 1024) or `KB`, `MB`, `GB` (powers of
/// 1000), e.g. `"512"`, `"32KiB"`, `"1MiB"`.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let Ok(n) = number.parse::<usize>() else {
        return Err("write a whole number of bytes with an optional unit, e.g. \"1MiB\", \"32KiB\" or \"512\"".into());
    };
    let scale: usize = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!(
                "unknown unit {:?}: write B, KiB, MiB, GiB, KB, MB or GB right after the number, e.g. \"{n}KiB\"",
                unit.trim()
            ))
        }
    };
    n.checked_mul(scale).ok_or_else(|| "too large".to_string())
}

/// A size as written in the config: `"1MiB"`, `"32KiB"`, `"512"`.
pub fn show_size(n: usize) -> String {
    match n {
        0 => "0".into(),
        _ if n.is_multiple_of(1 << 30) => format!("{}GiB", n >> 30),
        _ if n.is_multiple_of(1 << 20) => format!("{}MiB", n >> 20),
        _ if n.is_multiple_of(1 << 10) => format!("{}KiB", n >> 10),
        _ => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{errors, GOOD};

    #[test]
    fn durations_take_one_documented_form_and_a_range() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in [
            "10 sec",
            "10 seconds",
            "1.5s",
            "10",
            "s",
            "",
            "-1s",
            "1m30s",
            "10S",
            " 5s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_duration("90").unwrap_err().contains("\"90s\""));
        for (text, shown) in [
            ("100ms", "100ms"),
            ("90s", "90s"),
            ("600s", "10m"),
            ("24h", "24h"),
        ] {
            assert_eq!(show_duration(parse_duration(text).unwrap()), shown);
        }
        for (line, bad) in [
            ("grace_period = \"5s\"", "grace_period = \"0s\""),
            ("grace_period = \"5s\"", "grace_period = \"99ms\""),
            ("threads = 1", "threads = 1\nheader_timeout = \"0s\""),
            ("threads = 1", "threads = 1\nkeepalive_timeout = \"9000h\""),
            ("threads = 1", "threads = 1\nretry_after = \"1500ms\""),
        ] {
            let e = errors(&GOOD.replace(line, bad));
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
        }
        let e = errors(&GOOD.replace("threads = 1", "threads = 1\nheader_timeout = \"0s\""));
        assert!(
            e[0].message.contains("allowed from 100ms to 10m"),
            "{}",
            e[0]
        );
        let e = errors(&GOOD.replace("threads = 1", "threads = 1\nsend_timeout = 90"));
        assert!(e[0].message.contains("send_timeout = \"90s\""), "{}", e[0]);
    }

    #[test]
    fn sizes_and_counts_have_ranges() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("32KiB"), Ok(32 * 1024));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        for bad in ["1.5MiB", "1 MiB", "1mib", "", "MiB", "-1"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        for bad in [
            "max_header_size = \"100\"",
            "max_header_size = \"2MiB\"",
            "threads = 0",
            "upstream_keepalive_pool = 1000000",
        ] {
            let e = errors(&GOOD.replace("threads = 1", bad));
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            assert!(e[0].message.contains("allowed from"), "{bad}: {}", e[0]);
        }
    }
}
