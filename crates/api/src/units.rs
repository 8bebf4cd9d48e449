//! Sizes (`8Gi`, `512Mi`, `1048576`) and durations (`500ms`, `30s`, `5m`).

use std::{fmt, str::FromStr, time::Duration};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "invalid size {input:?}: expected bytes, optionally with a Ki, Mi, Gi or Ti suffix (e.g. 512Mi)"
    )]
    Size { input: String },
    #[error("invalid duration {input:?}: expected e.g. 500ms, 30s or 5m ({reason})")]
    Duration { input: String, reason: String },
    #[error(
        "invalid host memory budget {input:?}: expected a size (e.g. 512Gi), a share of the machine's memory (e.g. 50%) or off"
    )]
    HostBudget { input: String },
}

/// Host memory kept for sleeping models' weights on a machine: a size, a share of its
/// memory, or `off` (not accounted: level-1 sleeps are never sent to level 2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HostBudget {
    Off,
    Bytes(u64),
    Percent(f64),
}

impl HostBudget {
    /// The budget in bytes on a machine of `machine` bytes; `None` when off.
    pub fn bytes(self, machine: u64) -> Option<u64> {
        match self {
            Self::Off => None,
            Self::Bytes(b) => Some(b),
            Self::Percent(p) => Some((machine as f64 * p / 100.0) as u64),
        }
    }
}

impl FromStr for HostBudget {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseError::HostBudget {
            input: s.to_string(),
        };
        let t = s.trim();
        if t == "off" {
            return Ok(Self::Off);
        }
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(Self::Percent(p)),
                _ => Err(err()),
            };
        }
        t.parse::<ByteSize>()
            .map(|b| Self::Bytes(b.bytes()))
            .map_err(|_| err())
    }
}

/// A number of bytes that parses from plain integers or binary suffixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const KI: u64 = 1 << 10;
    pub const MI: u64 = 1 << 20;
    pub const GI: u64 = 1 << 30;
    pub const TI: u64 = 1 << 40;

    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseError::Size {
            input: s.to_string(),
        };
        let t = s.trim();
        let (digits, mult) = [
            ("Ki", Self::KI),
            ("Mi", Self::MI),
            ("Gi", Self::GI),
            ("Ti", Self::TI),
        ]
        .iter()
        .find_map(|(suffix, mult)| t.strip_suffix(suffix).map(|d| (d, *mult)))
        .unwrap_or((t, 1));
        let n: u64 = digits.trim().parse().map_err(|_| err())?;
        n.checked_mul(mult).map(ByteSize).ok_or_else(err)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (suffix, mult) in [
            ("Ti", Self::TI),
            ("Gi", Self::GI),
            ("Mi", Self::MI),
            ("Ki", Self::KI),
        ] {
            if n >= mult && n.is_multiple_of(mult) {
                return write!(f, "{}{}", n / mult, suffix);
            }
        }
        write!(f, "{n}")
    }
}

/// Parses `500ms`, `30s`, `5m`, `1h30m` into a duration.
pub fn parse_duration(s: &str) -> Result<Duration, ParseError> {
    humantime::parse_duration(s.trim()).map_err(|e| ParseError::Duration {
        input: s.to_string(),
        reason: e.to_string(),
    })
}

/// A duration as `parse_duration` reads it back, in the largest units that are exact:
/// `5m`, `20s`, `1m30s`, `1s500ms` (no spaces, so that it is one argument and matches the
/// Model resource's pattern).
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    humantime::format_duration(d).to_string().replace(' ', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_plain_and_binary_suffixes() {
        let cases = [
            ("0", 0),
            ("1048576", 1 << 20),
            ("1Ki", 1024),
            ("512Mi", 512 << 20),
            ("80Gi", 80 << 30),
            ("2Ti", 2 << 40),
            (" 3Gi ", 3 << 30),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<ByteSize>().unwrap().bytes(), want, "{input}");
        }
        for bad in ["", "Gi", "1.5Gi", "-1", "12GB", "99999999999Ti"] {
            let err = bad.parse::<ByteSize>().unwrap_err();
            assert!(err.to_string().contains("invalid size"), "{bad}: {err}");
        }
    }

    #[test]
    fn host_budgets_parse_sizes_shares_and_off() {
        let machine = 200 << 30;
        for (input, want) in [
            ("off", None),
            ("64Gi", Some(64 << 30)),
            ("50%", Some(100 << 30)),
            (" 100% ", Some(machine)),
            ("12.5%", Some(25 << 30)),
        ] {
            let b: HostBudget = input.parse().unwrap();
            assert_eq!(b.bytes(machine), want, "{input}");
        }
        for bad in ["", "0%", "101%", "-5%", "half", "12GB"] {
            let err = bad.parse::<HostBudget>().unwrap_err();
            assert!(
                err.to_string().contains("host memory budget"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn sizes_display_round_trips() {
        for n in [0, 1, 1023, 1024, 3 << 30, (3 << 30) + 1] {
            let s = ByteSize(n).to_string();
            assert_eq!(s.parse::<ByteSize>().unwrap().bytes(), n);
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        let err = parse_duration("five minutes").unwrap_err();
        assert!(err.to_string().contains("five minutes"));
    }

    #[test]
    fn durations_format_as_they_parse() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_secs(20), "20s"),
            (Duration::from_secs(600), "10m"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_millis(1500), "1s500ms"),
            (Duration::from_secs(7200), "2h"),
        ];
        for (d, want) in cases {
            assert_eq!(format_duration(d), want);
            assert_eq!(parse_duration(want).unwrap(), d, "{want}");
        }
        // Odd values too: nanoseconds, days.
        for d in [Duration::new(3, 7), Duration::from_secs(3 * 86400 + 1)] {
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
    }
}

/// Value parsers for command-line flags: durations (`30s`) and sizes (`8Gi`), with the
/// same messages as configuration files.
pub mod arg {
    use std::time::Duration;

    use super::{ByteSize, parse_duration};

    pub fn duration(s: &str) -> Result<Duration, String> {
        parse_duration(s).map_err(|e| e.to_string())
    }

    pub fn host_budget(s: &str) -> Result<super::HostBudget, String> {
        s.parse().map_err(|e: super::ParseError| e.to_string())
    }

    pub fn size(s: &str) -> Result<u64, String> {
        s.parse::<ByteSize>()
            .map(ByteSize::bytes)
            .map_err(|e| e.to_string())
    }
}
