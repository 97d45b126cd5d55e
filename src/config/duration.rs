//! Durations in the config file: humantime syntax, never negative, never above a year.

use serde::Deserialize;
use serde::Deserializer;
use serde::Serialize;
use serde::Serializer;
use std::time::Duration;

/// A duration written in the file as `"5s"`, `"30m"`, `"1h 30m"` (humantime syntax).
/// Negative values cannot be written: the parser refuses a leading minus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    pub const fn millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
    pub fn get(self) -> Duration {
        self.0
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = s.trim();
        if t.starts_with('-') {
            return Err(serde::de::Error::custom(format!(
                "duration {s:?} is negative; write a positive duration such as \"5s\""
            )));
        }
        let d = humantime::parse_duration(t).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); write e.g. \"500ms\", \"5s\", \"30m\""
            ))
        })?;
        if d > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "duration {s:?} is longer than any setting accepts (365 days)"
            )));
        }
        Ok(Dur(d))
    }
}

/// No duration in the config may exceed this (a year): far beyond any sane setting, and
/// small enough that adding it to any clock reading cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// A size in bytes, written as an integer or a string with a unit: `"512MiB"`, `"2GiB"`,
/// `"64KiB"`, `"1048576"`, or PostgreSQL's spellings `"100MB"`, `"64kB"`, `"1GB"`, which
/// PostgreSQL (and so this) reads as multiples of 1024.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"512MiB"`, `"2 GiB"`, `"100KiB"`, `"1048576"` (KiB/MiB/GiB/TiB, or B), and
    /// PostgreSQL's `kB`/`MB`/`GB`/`TB` (also `KB`), each 1024 times the one before, as in
    /// `postgresql.conf`.
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}; write e.g. \"512MiB\" or \"2GiB\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "kB" | "KB" => 1 << 10,
            "MiB" | "MB" => 1 << 20,
            "GiB" | "GB" => 1 << 30,
            "TiB" | "TB" => 1 << 40,
            u => {
                return Err(format!(
                    "unknown unit {u:?} in {s:?}; use B, KiB, MiB, GiB, TiB or PostgreSQL's kB, MB, GB, TB (multiples of 1024)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0 as f64;
        if self.0 >= 1 << 30 {
            write!(f, "{:.1} GiB", b / (1u64 << 30) as f64)
        } else if self.0 >= 1 << 20 {
            write!(f, "{:.1} MiB", b / (1u64 << 20) as f64)
        } else if self.0 >= 1 << 10 {
            write!(f, "{:.1} KiB", b / 1024.0)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

#[cfg(test)]
mod byte_size_tests {
    use super::ByteSize;

    #[test]
    fn sizes_parse_with_binary_and_postgresql_units_and_refuse_the_rest() {
        assert_eq!(ByteSize::parse("512MiB"), Ok(ByteSize(512 << 20)));
        assert_eq!(ByteSize::parse("2 GiB"), Ok(ByteSize(2 << 30)));
        assert_eq!(ByteSize::parse("1048576"), Ok(ByteSize(1 << 20)));
        // PostgreSQL's spellings, as postgresql.conf reads them (1024-based).
        assert_eq!(ByteSize::parse("100MB"), Ok(ByteSize(100 << 20)));
        assert_eq!(ByteSize::parse("64kB"), Ok(ByteSize(64 << 10)));
        assert_eq!(ByteSize::parse("1GB"), Ok(ByteSize(1 << 30)));
        assert!(ByteSize::parse("512mb").is_err());
        assert!(ByteSize::parse("1Mb").is_err());
        assert!(ByteSize::parse("1.5GB").is_err());
        assert!(ByteSize::parse("-1").is_err());
        assert!(ByteSize::parse("99999999999TiB").is_err());
        assert_eq!(ByteSize(3 << 20).to_string(), "3.0 MiB");
    }
}
