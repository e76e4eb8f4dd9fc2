//! Units that users write by hand: CPU and memory quantities in Kubernetes notation (`500m`,
//! `4Gi`), byte sizes (`8MiB`), bit rates (`200Mbit/s`) and humantime durations (`30s`, `10m`).
//!
//! Each parsed value is a newtype over an integer in the smallest unit the engine needs
//! (millicores, bytes, bits per second), so arithmetic in the engine is exact and comparisons are
//! cheap. Serialisation writes a canonical string that parses back to the same value.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a unit string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("empty value")]
    Empty,
    #[error("`{0}` is not a number followed by an optional unit")]
    NotANumber(String),
    #[error("unknown unit `{unit}` in `{input}` (expected one of {expected})")]
    UnknownUnit {
        input: String,
        unit: String,
        expected: &'static str,
    },
    #[error("`{0}` is negative")]
    Negative(String),
    #[error("`{0}` is too large")]
    Overflow(String),
    #[error("`{input}` is not a duration: {reason} (write e.g. `30s`, `10m`, `1h 30m`)")]
    Duration { input: String, reason: String },
}

/// Splits `1.5Gi` into (1.5, "Gi"), keeping the number exact as a decimal string.
fn split_number(input: &str) -> Result<(&str, &str), UnitError> {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(UnitError::Empty);
    }
    if trimmed.starts_with('-') {
        return Err(UnitError::Negative(trimmed.to_string()));
    }
    let end = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(end);
    if number.is_empty() || number.matches('.').count() > 1 || number.starts_with('.') {
        return Err(UnitError::NotANumber(trimmed.to_string()));
    }
    Ok((number.trim_start_matches('+'), unit.trim()))
}

/// Multiplies a non-negative decimal string by an integer scale without going through floats,
/// so `0.1Gi` is exact and `1.5` CPU is exactly 1500 millicores. Fractions below one unit are
/// rounded up, as Kubernetes does for requests.
fn scale_decimal(number: &str, scale: u128, input: &str) -> Result<u64, UnitError> {
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    let overflow = || UnitError::Overflow(input.to_string());
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole
            .parse()
            .map_err(|_| UnitError::NotANumber(input.to_string()))?
    };
    let mut value = whole.checked_mul(scale).ok_or_else(overflow)?;
    if !frac.is_empty() {
        if frac.len() > 18 {
            return Err(UnitError::NotANumber(input.to_string()));
        }
        let digits: u128 = frac
            .parse()
            .map_err(|_| UnitError::NotANumber(input.to_string()))?;
        let denominator = 10u128.pow(frac.len() as u32);
        let scaled = digits.checked_mul(scale).ok_or_else(overflow)?;
        value = value
            .checked_add(scaled.div_ceil(denominator))
            .ok_or_else(overflow)?;
    }
    u64::try_from(value).map_err(|_| overflow())
}

const BYTE_UNITS: &str =
    "B, k, K, M, G, T, P, Ki, Mi, Gi, Ti, Pi, KB, MB, GB, TB, KiB, MiB, GiB, TiB";

fn byte_scale(unit: &str) -> Option<u128> {
    Some(match unit {
        "" | "B" => 1,
        "k" | "K" | "KB" | "kB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "P" | "PB" => 1_000_000_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        "Pi" | "PiB" => 1 << 50,
        _ => return None,
    })
}

/// A number of bytes: memory requests (`4Gi`), checkpoint and chunk sizes (`8MiB`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes(pub u64);

impl FromStr for Bytes {
    type Err = UnitError;
    fn from_str(input: &str) -> Result<Self, UnitError> {
        let (number, unit) = split_number(input)?;
        let scale = byte_scale(unit).ok_or_else(|| UnitError::UnknownUnit {
            input: input.to_string(),
            unit: unit.to_string(),
            expected: BYTE_UNITS,
        })?;
        scale_decimal(number, scale, input).map(Bytes)
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 5] = [
            (1 << 50, "Pi"),
            (1 << 40, "Ti"),
            (1 << 30, "Gi"),
            (1 << 20, "Mi"),
            (1 << 10, "Ki"),
        ];
        for (scale, unit) in UNITS {
            if self.0 >= scale && self.0.is_multiple_of(scale) {
                return write!(f, "{}{unit}", self.0 / scale);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Bytes {
    /// Human-friendly approximation for reports (`1.5 GiB`), not for round trips.
    pub fn approx(self) -> String {
        let value = self.0 as f64;
        let units = [
            ("PiB", 50),
            ("TiB", 40),
            ("GiB", 30),
            ("MiB", 20),
            ("KiB", 10),
        ];
        for (unit, shift) in units {
            let scale = (1u64 << shift) as f64;
            if value >= scale {
                return format!("{:.1} {unit}", value / scale);
            }
        }
        format!("{} B", self.0)
    }
}

/// CPU in millicores: `2` is 2000, `500m` is 500, `1.5` is 1500.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MilliCpu(pub u64);

impl FromStr for MilliCpu {
    type Err = UnitError;
    fn from_str(input: &str) -> Result<Self, UnitError> {
        let (number, unit) = split_number(input)?;
        let scale = match unit {
            "m" => 1,
            "" => 1_000,
            "k" => 1_000_000,
            _ => {
                return Err(UnitError::UnknownUnit {
                    input: input.to_string(),
                    unit: unit.to_string(),
                    expected: "none (cores), m (millicores)",
                });
            }
        };
        scale_decimal(number, scale, input).map(MilliCpu)
    }
}

impl fmt::Display for MilliCpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(f, "{}", self.0 / 1000)
        } else {
            write!(f, "{}m", self.0)
        }
    }
}

const RATE_UNITS: &str = "bit, Kbit, Mbit, Gbit (bits) or B, KB, MB, GB, KiB, MiB, GiB (bytes), each optionally followed by /s";

/// Human-friendly byte count for reports (`1.5 GiB`), not for round trips.
pub fn approx_bytes(bytes: u64) -> String {
    Bytes(bytes).approx()
}

/// Human-friendly rate for reports (`102.4 Mbit/s`).
pub fn approx_rate(bits_per_second: f64) -> String {
    if bits_per_second >= 1e9 {
        format!("{:.2} Gbit/s", bits_per_second / 1e9)
    } else if bits_per_second >= 1e6 {
        format!("{:.1} Mbit/s", bits_per_second / 1e6)
    } else if bits_per_second >= 1e3 {
        format!("{:.1} kbit/s", bits_per_second / 1e3)
    } else {
        format!("{bits_per_second:.0} bit/s")
    }
}

/// Human-friendly duration for estimates and reports (`5.1 s`, `3.2 min`), where
/// [`format_duration`]'s exact `5s 73ms` would suggest false precision.
pub fn approx_duration(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs < 1e-3 {
        format!("{} µs", duration.as_micros())
    } else if secs < 1.0 {
        format!("{:.1} ms", secs * 1e3)
    } else if secs < 120.0 {
        format!("{secs:.1} s")
    } else if secs < 7200.0 {
        format!("{:.1} min", secs / 60.0)
    } else {
        format!("{:.1} h", secs / 3600.0)
    }
}

/// A data rate in bits per second: `200Mbit/s`, `1Gbit`, `25MiB/s`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BitRate(pub u64);

impl FromStr for BitRate {
    type Err = UnitError;
    fn from_str(input: &str) -> Result<Self, UnitError> {
        let (number, unit) = split_number(input)?;
        let unit = unit.strip_suffix("/s").unwrap_or(unit).trim();
        let bits: Option<u128> = match unit {
            "" | "bit" | "bps" => Some(1),
            "Kbit" | "kbit" | "Kbps" | "kbps" => Some(1_000),
            "Mbit" | "mbit" | "Mbps" => Some(1_000_000),
            "Gbit" | "gbit" | "Gbps" => Some(1_000_000_000),
            _ => None,
        };
        let scale = match bits {
            Some(scale) => scale,
            None => match unit {
                "B" | "KB" | "MB" | "GB" | "KiB" | "MiB" | "GiB" => {
                    byte_scale(unit).map(|bytes| bytes * 8)
                }
                _ => None,
            }
            .ok_or_else(|| UnitError::UnknownUnit {
                input: input.to_string(),
                unit: unit.to_string(),
                expected: RATE_UNITS,
            })?,
        };
        scale_decimal(number, scale, input).map(BitRate)
    }
}

impl fmt::Display for BitRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (scale, unit) in [
            (1_000_000_000, "Gbit/s"),
            (1_000_000, "Mbit/s"),
            (1_000, "Kbit/s"),
        ] {
            if self.0 >= scale && self.0.is_multiple_of(scale) {
                return write!(f, "{}{unit}", self.0 / scale);
            }
        }
        write!(f, "{}bit/s", self.0)
    }
}

/// Accepts `"4Gi"`, `4294967296` and `"4294967296"` alike: YAML users write all three.
macro_rules! string_or_number_serde {
    ($ty:ident) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw {
                    Int(u64),
                    Float(f64),
                    Text(String),
                }
                let text = match Raw::deserialize(deserializer)? {
                    Raw::Int(value) => value.to_string(),
                    Raw::Float(value) => value.to_string(),
                    Raw::Text(text) => text,
                };
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
string_or_number_serde!(Bytes);
string_or_number_serde!(MilliCpu);
string_or_number_serde!(BitRate);

/// Parses a humantime duration with an error that says what to write instead.
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    humantime::parse_duration(input.trim()).map_err(|error| UnitError::Duration {
        input: input.to_string(),
        reason: error.to_string(),
    })
}

/// Formats a duration the way users write it (`1m 30s`), dropping sub-millisecond noise.
pub fn format_duration(duration: Duration) -> String {
    let rounded = Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
    humantime::format_duration(rounded).to_string()
}

/// `#[serde(with = "units::duration")]` for a `Duration` written as `30s` / `10m`.
pub mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_duration(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// `#[serde(with = "units::option_duration", default)]` for an optional duration.
pub mod option_duration {
    use super::*;

    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => serializer.collect_str(&format_duration(*value)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| parse_duration(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Time elapsed from `then` to `now`, zero if `then` is in the future (clock skew between the
/// observer and the observed must not produce negative ages).
pub fn age(now: jiff::Timestamp, then: jiff::Timestamp) -> Duration {
    Duration::try_from(now.duration_since(then)).unwrap_or(Duration::ZERO)
}

/// `then + duration`, saturating at the largest representable time.
pub fn after(then: jiff::Timestamp, duration: Duration) -> jiff::Timestamp {
    jiff::SignedDuration::try_from(duration)
        .ok()
        .and_then(|signed| then.checked_add(signed).ok())
        .unwrap_or(jiff::Timestamp::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_kubernetes_memory_quantities() {
        assert_eq!("4Gi".parse::<Bytes>().unwrap(), Bytes(4 << 30));
        assert_eq!("512Mi".parse::<Bytes>().unwrap(), Bytes(512 << 20));
        assert_eq!("1G".parse::<Bytes>().unwrap(), Bytes(1_000_000_000));
        assert_eq!("1.5Ki".parse::<Bytes>().unwrap(), Bytes(1536));
        assert_eq!("8MiB".parse::<Bytes>().unwrap(), Bytes(8 << 20));
        assert_eq!("100".parse::<Bytes>().unwrap(), Bytes(100));
    }

    #[test]
    fn parses_cpu_quantities() {
        assert_eq!("2".parse::<MilliCpu>().unwrap(), MilliCpu(2000));
        assert_eq!("500m".parse::<MilliCpu>().unwrap(), MilliCpu(500));
        assert_eq!("1.5".parse::<MilliCpu>().unwrap(), MilliCpu(1500));
        assert_eq!(
            "0.0001".parse::<MilliCpu>().unwrap(),
            MilliCpu(1),
            "rounds up like kube"
        );
    }

    #[test]
    fn parses_rates_in_bits_and_bytes() {
        assert_eq!(
            "200Mbit/s".parse::<BitRate>().unwrap(),
            BitRate(200_000_000)
        );
        assert_eq!("1Gbit".parse::<BitRate>().unwrap(), BitRate(1_000_000_000));
        assert_eq!("25MB/s".parse::<BitRate>().unwrap(), BitRate(200_000_000));
        assert_eq!("1KiB/s".parse::<BitRate>().unwrap(), BitRate(8192));
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        assert_eq!("".parse::<Bytes>(), Err(UnitError::Empty));
        assert!(matches!(
            "-1Gi".parse::<Bytes>(),
            Err(UnitError::Negative(_))
        ));
        assert!(matches!(
            "lots".parse::<Bytes>(),
            Err(UnitError::NotANumber(_))
        ));
        let error = "4Gb".parse::<Bytes>().unwrap_err().to_string();
        assert!(error.contains("unknown unit `Gb`"), "{error}");
        assert!(matches!(
            "2x".parse::<MilliCpu>(),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            "99999999999Pi".parse::<Bytes>(),
            Err(UnitError::Overflow(_))
        ));
        assert!(parse_duration("ten minutes").is_err());
    }

    #[test]
    fn deserialises_numbers_and_strings() {
        let bytes: Vec<Bytes> = serde_json::from_str(r#"["1Ki", 2048, "4096"]"#).unwrap();
        assert_eq!(bytes, vec![Bytes(1024), Bytes(2048), Bytes(4096)]);
        let cpu: MilliCpu = serde_json::from_str("0.5").unwrap();
        assert_eq!(cpu, MilliCpu(500));
    }

    #[test]
    fn ages_never_go_negative() {
        let now: jiff::Timestamp = "2026-01-01T00:00:10Z".parse().unwrap();
        let later: jiff::Timestamp = "2026-01-01T00:00:20Z".parse().unwrap();
        assert_eq!(age(now, later), Duration::ZERO);
        assert_eq!(age(later, now), Duration::from_secs(10));
        assert_eq!(after(now, Duration::from_secs(10)), later);
    }

    proptest! {
        #[test]
        fn bytes_round_trip(value in any::<u64>()) {
            let text = Bytes(value).to_string();
            prop_assert_eq!(text.parse::<Bytes>().unwrap(), Bytes(value));
        }

        #[test]
        fn cpu_round_trip(value in 0u64..u64::MAX / 1000) {
            let text = MilliCpu(value).to_string();
            prop_assert_eq!(text.parse::<MilliCpu>().unwrap(), MilliCpu(value));
        }

        #[test]
        fn rate_round_trip(value in 0u64..u64::MAX / 8) {
            let text = BitRate(value).to_string();
            prop_assert_eq!(text.parse::<BitRate>().unwrap(), BitRate(value));
        }

        #[test]
        fn duration_round_trip(millis in 0u64..10_000_000_000) {
            let duration = Duration::from_millis(millis);
            prop_assert_eq!(parse_duration(&format_duration(duration)).unwrap(), duration);
        }
    }
}
