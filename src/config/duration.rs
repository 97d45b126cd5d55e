//! Durations in the config file: humantime syntax, never negative, never above a year.

#[allow(unused_imports)]
use super::*;

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
