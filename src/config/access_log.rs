//! `[access_log]`: one JSON line per finished request (see
//! `crate::access_log`), where it goes and how many are kept.

use std::ops::RangeInclusive;
use std::path::PathBuf;

use toml::Spanned;

use super::{file, Validator};

/// Whether the access log is written when `[access_log]` does not say (on).
pub const DEFAULT_ACCESS_LOG_ENABLED: bool = true;
/// Share of successful requests logged (1: all of them). Answers with a
/// status of 400 or more, refusals and requests the client left are always
/// logged, whatever the sample.
pub const DEFAULT_ACCESS_LOG_SAMPLE: f64 = 1.0;
/// `access_log.sample`: 0 (only errors and refusals) to 1 (every request).
pub const ACCESS_LOG_SAMPLE_RANGE: RangeInclusive<f64> = 0.0..=1.0;
/// Lines held in memory for the writer thread (65 536 lines, about 20 MiB
/// at ~300 bytes a line): what a stalled disk or stdout pipe may fall behind
/// before lines are dropped (and counted) rather than delaying responses.
pub const DEFAULT_ACCESS_LOG_BUFFER_LINES: u32 = 65_536;
/// `access_log.buffer_lines`: 1 to 1 048 576 lines.
pub const ACCESS_LOG_BUFFER_LINES_RANGE: RangeInclusive<u32> = 1..=1 << 20;

/// Where and how much of the access log is written.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLog {
    /// `false`: no access log at all (nginx's `access_log off`).
    pub enabled: bool,
    /// Append to this file; `None`: standard output. Its directory must
    /// exist (`switchyard check` says so); the file is created, mode 0640.
    pub path: Option<PathBuf>,
    /// Share of requests below 400 that are logged, 0 to 1 (Envoy's
    /// runtime-fraction filter); see [`DEFAULT_ACCESS_LOG_SAMPLE`].
    pub sample: f64,
    /// See [`DEFAULT_ACCESS_LOG_BUFFER_LINES`] (nginx's `buffer=`, counted
    /// in lines).
    pub buffer_lines: usize,
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog {
            enabled: DEFAULT_ACCESS_LOG_ENABLED,
            path: None,
            sample: DEFAULT_ACCESS_LOG_SAMPLE,
            buffer_lines: DEFAULT_ACCESS_LOG_BUFFER_LINES as usize,
        }
    }
}

impl Validator<'_> {
    pub(super) fn access_log(&mut self, a: file::AccessLog) -> AccessLog {
        AccessLog {
            enabled: a.enabled.unwrap_or(DEFAULT_ACCESS_LOG_ENABLED),
            path: self.path_key("access_log.path", a.path),
            sample: self.sample(a.sample),
            buffer_lines: self.count(
                a.buffer_lines.as_ref(),
                DEFAULT_ACCESS_LOG_BUFFER_LINES,
                ACCESS_LOG_BUFFER_LINES_RANGE,
                "buffer_lines",
            ) as usize,
        }
    }

    /// A fraction from 0 to 1 (`nan` and infinities are outside it).
    fn sample(&mut self, value: Option<Spanned<f64>>) -> f64 {
        let Some(value) = value else {
            return DEFAULT_ACCESS_LOG_SAMPLE;
        };
        let s = *value.get_ref();
        if !ACCESS_LOG_SAMPLE_RANGE.contains(&s) {
            self.at(
                &value,
                format!(
                    "sample = {s} is out of range: a fraction from 0 (only errors and refusals) \
                     to 1 (every request), e.g. 0.1"
                ),
            );
            return DEFAULT_ACCESS_LOG_SAMPLE;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::tests::{errors, GOOD};
    use crate::config::Config;

    #[test]
    fn defaults_to_every_request_on_stdout() {
        let c = Config::parse(Path::new("t.toml"), GOOD).unwrap();
        assert_eq!(c.access_log, AccessLog::default());
        assert!(c.access_log.enabled && c.access_log.path.is_none());
        assert_eq!(c.access_log.sample, 1.0);
    }

    #[test]
    fn keys_are_read_and_located() {
        let text = format!(
            "{GOOD}\n[access_log]\nenabled = false\npath = \"logs/access.log\"\nsample = 0.25\nbuffer_lines = 10\n"
        );
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        assert!(!c.access_log.enabled);
        assert_eq!(
            c.access_log.path.as_deref(),
            Some(Path::new("logs/access.log"))
        );
        assert_eq!(c.access_log.sample, 0.25);
        assert_eq!(c.access_log.buffer_lines, 10);
        assert_eq!(c.positions.get("access_log.path"), Some(&(25, 8)));
        // A whole number is a fraction too.
        let c = Config::parse(
            Path::new("t.toml"),
            &format!("{GOOD}\n[access_log]\nsample = 0\n"),
        )
        .unwrap();
        assert_eq!(c.access_log.sample, 0.0);
    }

    #[test]
    fn bad_values_and_unknown_keys_are_refused_with_their_position() {
        let text = format!(
            "{GOOD}\n[access_log]\nsample = 1.5\nbuffer_lines = 0\nformat = \"combined\"\n"
        );
        let e = errors(&text);
        let found: Vec<(usize, usize)> = e.iter().map(|e| (e.line, e.col)).collect();
        assert_eq!(found, vec![(24, 10), (25, 16), (26, 1)], "{e:?}");
        assert!(
            e[0].message.contains("sample = 1.5 is out of range"),
            "{}",
            e[0]
        );
        assert!(
            e[1].message.contains("buffer_lines = 0 is out of range"),
            "{}",
            e[1]
        );
        assert!(e[2].message.contains("unknown key `format`"), "{}", e[2]);
        let e = errors(&format!("{GOOD}\n[access_log]\nsample = nan\n"));
        assert!(e[0].message.contains("out of range"), "{}", e[0]);
    }
}
