//! Value types of the routing state that cannot hold invalid values.
//!
//! Each type parses from a string (TOML or JSON) through `TryFrom<String>`, so a
//! deserialized `State` is valid field by field; cross-field rules (references,
//! duplicates) are checked by [`super::validate`]. Error messages are lower-case and
//! name what was expected; the caller adds the key path.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Longest DNS name we accept, in bytes (RFC 1035 without the root dot).
pub const MAX_HOST_LEN: usize = 253;

macro_rules! string_newtype {
    ($(#[$m:meta])* $name:ident, $check:path) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Box<str>);

        impl $name {
            /// The value as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                $check(&s)?;
                Ok(Self(s.into_boxed_str()))
            }
        }

        impl TryFrom<&str> for $name {
            type Error = String;
            fn try_from(s: &str) -> Result<Self, String> {
                $check(s)?;
                Ok(Self(s.into()))
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0.into_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_newtype!(
    /// A lower-case DNS host name of at least two labels (IDNs in punycode).
    Host,
    check_host
);
string_newtype!(
    /// An object id: 1 to 128 of `A-Z a-z 0-9 . _ -`.
    Id,
    check_id
);
string_newtype!(
    /// A sandbox id: one lower-case DNS label, since it appears in preview host names.
    SandboxId,
    check_sandbox_id
);
string_newtype!(
    /// A workspace id: lower-case `a-z 0-9 _ -`, at most 63, since it names a DNS label
    /// under the ACME zone (`{workspace_id}.{acme_zone}`).
    WorkspaceId,
    check_workspace_id
);
string_newtype!(
    /// A bucket's name in the store: 1 to 255 of `A-Z a-z 0-9 . _ -`, starting with a
    /// letter or a digit (S3-compatible stores differ on the finer rules; the store has
    /// the last word).
    BucketName,
    check_bucket_name
);
string_newtype!(
    /// One lower-case DNS label (workspace slugs, deployment names).
    Label,
    check_label
);
string_newtype!(
    /// An `https:` URL.
    HttpsUrl,
    check_https_url
);
string_newtype!(
    /// An `https:` or `mailto:` URL.
    SupportUrl,
    check_support_url
);
string_newtype!(
    /// `#rgb` or `#rrggbb`.
    AccentColor,
    check_accent_color
);
string_newtype!(
    /// An argon2id hash in PHC string format.
    PasswordHash,
    check_password_hash
);

fn check_bucket_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 255 {
        return Err("must be 1 to 255 characters".into());
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("`{c}` is not allowed in a bucket name (only `A-Z a-z 0-9 . _ -`)"));
    }
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!("`{s}` must start with a letter or a digit"));
    }
    Ok(())
}

fn check_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!("`{s}` is longer than 63 characters"));
    }
    if let Some(c) = s.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-')) {
        return Err(format!("`{s}` contains `{c}`: only lower-case letters, digits and `-` are allowed"));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(format!("`{s}` must not start or end with `-`"));
    }
    Ok(())
}

/// Validates a lower-case DNS host name; shared with the request path's host parser.
pub fn check_host(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > MAX_HOST_LEN {
        return Err(format!("host is longer than {MAX_HOST_LEN} characters"));
    }
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!("`{s}` must be lower-case"));
    }
    if s.parse::<IpAddr>().is_ok() {
        return Err(format!("`{s}` is an IP address, not a host name"));
    }
    let mut labels = 0;
    for label in s.split('.') {
        check_label(label).map_err(|e| format!("`{s}` is not a valid host name: label {e}"))?;
        labels += 1;
    }
    if labels < 2 {
        return Err(format!("`{s}` must have at least two labels"));
    }
    Ok(())
}

fn check_id(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 128 {
        return Err("must be 1 to 128 characters".into());
    }
    match s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        Some(c) => Err(format!("`{s}` contains `{c}`: only letters, digits, `.`, `_` and `-` are allowed")),
        None => Ok(()),
    }
}

/// The rule of a [`SandboxId`].
pub fn check_sandbox_id(s: &str) -> Result<(), String> {
    check_label(s)
}

/// The rule of a [`WorkspaceId`].
pub fn check_workspace_id(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1 to 63 characters".into());
    }
    match s.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '-')) {
        Some(c) => Err(format!("`{s}` contains `{c}`: only lower-case letters, digits, `_` and `-` are allowed")),
        None => Ok(()),
    }
}

fn check_url_text(s: &str) -> Result<(), String> {
    if s.len() > 2048 {
        return Err("URL is longer than 2048 characters".into());
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("URL must not contain spaces or control characters".into());
    }
    // RFC 3986: ASCII only (other characters percent-encoded, hosts in punycode), and
    // none of the characters a URI never holds raw.
    if !s.bytes().all(|b| b.is_ascii_graphic() && !b"\"<>\\^`{|}".contains(&b)) {
        return Err(format!("`{s}` is not a URI: percent-encode other characters and write hosts in punycode"));
    }
    Ok(())
}

fn check_https_url(s: &str) -> Result<(), String> {
    check_url_text(s)?;
    let rest = s.strip_prefix("https://").ok_or_else(|| format!("`{s}` must be an https: URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("`{s}` must name a host (and no user info)"));
    }
    Ok(())
}

fn check_support_url(s: &str) -> Result<(), String> {
    if let Some(addr) = s.strip_prefix("mailto:") {
        check_url_text(s)?;
        if !addr.contains('@') {
            return Err(format!("`{s}` must be mailto:user@host"));
        }
        return Ok(());
    }
    check_https_url(s).map_err(|_| format!("`{s}` must be an https: or mailto: URL"))
}

fn check_accent_color(s: &str) -> Result<(), String> {
    let hex = s.strip_prefix('#').unwrap_or("");
    if (hex.len() == 3 || hex.len() == 6) && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(format!("`{s}` must be #rgb or #rrggbb"))
    }
}

fn check_password_hash(s: &str) -> Result<(), String> {
    // Full verification happens with the argon2 crate when the hash is used; here we
    // insist on the PHC shape so that a typo fails at push time, not at login time.
    let parts: Vec<&str> = s.split('$').collect();
    if !(parts.len() == 6 && parts[0].is_empty() && parts[1] == "argon2id" && parts[2].starts_with("v=")) {
        return Err("must be an argon2id PHC string ($argon2id$v=19$m=…,t=…,p=…$salt$hash)".into());
    }
    // Bounded cost: a pushed hash decides how much memory and time each password try
    // takes on the edge (argon2's default is m=19456,t=2,p=1).
    let (mut m, mut t, mut p) = (None, None, None);
    for kv in parts[3].split(',') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v: Option<u32> = v.parse().ok();
        match k {
            "m" => m = v,
            "t" => t = v,
            "p" => p = v,
            _ => {}
        }
    }
    match (m, t, p) {
        (Some(m), Some(t), Some(p)) if (8..=262_144).contains(&m) && (1..=16).contains(&t) && (1..=8).contains(&p) => Ok(()),
        _ => Err("argon2id parameters must be m=8..262144 (KiB), t=1..16, p=1..8".into()),
    }
}

/// A TCP port from 1 to 65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Port(pub u16);

impl TryFrom<u32> for Port {
    type Error = String;
    fn try_from(v: u32) -> Result<Self, String> {
        match u16::try_from(v) {
            Ok(p) if p > 0 => Ok(Port(p)),
            _ => Err(format!("port {v} is not between 1 and 65535")),
        }
    }
}

impl From<Port> for u32 {
    fn from(p: Port) -> u32 {
        p.0 as u32
    }
}

/// An IP address given as text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Address(pub IpAddr);

impl TryFrom<String> for Address {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse().map(Address).map_err(|_| format!("`{s}` is not an IP address"))
    }
}

impl From<Address> for String {
    fn from(a: Address) -> String {
        a.0.to_string()
    }
}

/// A runtime instance, `IP:port` (IPv6 as `[::1]:8080`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Instance(pub SocketAddr);

impl TryFrom<String> for Instance {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 => Ok(Instance(a)),
            Ok(_) => Err(format!("`{s}`: port must be between 1 and 65535")),
            Err(_) => Err(format!("`{s}` is not IP:port")),
        }
    }
}

impl From<Instance> for String {
    fn from(a: Instance) -> String {
        a.0.to_string()
    }
}

/// A SHA-256 digest written as 64 lower-case hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256(pub [u8; 32]);

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

impl fmt::Display for Sha256 {
    /// Lower-case hex, through a table: one write, not one `fmt` call per byte (request
    /// signing formats two of these per storage request).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 64];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = HEX[(b >> 4) as usize];
            out[2 * i + 1] = HEX[(b & 15) as usize];
        }
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

impl TryFrom<String> for Sha256 {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 || !bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err("must be 64 lower-case hex characters".into());
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16).unwrap_or(0) as u8;
            let lo = (pair[1] as char).to_digit(16).unwrap_or(0) as u8;
            out[i] = hi << 4 | lo;
        }
        Ok(Sha256(out))
    }
}

impl From<Sha256> for String {
    fn from(h: Sha256) -> String {
        h.to_string()
    }
}

/// A point in time, in seconds since the Unix epoch, written as RFC 3339 (a TOML
/// offset datetime is accepted too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`; `t` and a space separator are
    /// accepted as RFC 3339 allows.
    pub fn parse_rfc3339(s: &str) -> Result<Timestamp, String> {
        let err = || format!("`{s}` is not an RFC 3339 date-time (e.g. 2026-12-01T00:00:00Z)");
        let b = s.as_bytes();
        if b.len() < 20 {
            return Err(err());
        }
        let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
            let part = s.get(r).ok_or_else(err)?;
            if !part.bytes().all(|c| c.is_ascii_digit()) {
                return Err(err());
            }
            part.parse::<i64>().map_err(|_| err())
        };
        if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
            return Err(err());
        }
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
        let mut i = 19;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            if i == start {
                return Err(err());
            }
        }
        let offset = match b.get(i) {
            Some(b'Z' | b'z') if i + 1 == b.len() => 0,
            Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
                let mins = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
                if mins >= 24 * 60 {
                    return Err(err());
                }
                if *sign == b'+' {
                    mins
                } else {
                    -mins
                }
            }
            _ => return Err(err()),
        };
        if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) || hour > 23 || minute > 59 || second > 60 {
            return Err(err());
        }
        let days = days_from_civil(year, month, day);
        let second = second.min(59); // a leap second counts as the end of its minute
        Ok(Timestamp(days * 86_400 + hour * 3600 + minute * 60 + second - offset * 60))
    }

    /// Formats as `YYYY-MM-DDTHH:MM:SSZ`.
    pub fn to_rfc3339(self) -> String {
        let days = self.0.div_euclid(86_400);
        let secs = self.0.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
    }
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 date-time")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Timestamp, E> {
                Timestamp::parse_rfc3339(v).map_err(E::custom)
            }
            // A TOML datetime arrives as a one-entry map holding its text form.
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Timestamp, A::Error> {
                let Some((_k, v)) = map.next_entry::<String, String>()? else {
                    return Err(serde::de::Error::custom("expected a date-time"));
                };
                Timestamp::parse_rfc3339(&v).map_err(serde::de::Error::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert!(Host::try_from("app.customer.com").is_ok());
        assert!(Host::try_from("xn--bcher-kva.example").is_ok());
        assert!(Host::try_from("App.customer.com").is_err());
        assert!(Host::try_from("localhost").is_err());
        assert!(Host::try_from("a..b").is_err());
        assert!(Host::try_from("-a.b").is_err());
        assert!(Host::try_from("10.0.0.1").is_err());
        assert!(Host::try_from("a_b.example").is_err());
        assert!(Host::try_from(format!("{}.com", "a".repeat(64))).is_err());
    }

    #[test]
    fn urls_and_colours() {
        assert!(HttpsUrl::try_from("https://cdn.example.com/logo.png").is_ok());
        assert!(HttpsUrl::try_from("http://cdn.example.com/logo.png").is_err());
        assert!(HttpsUrl::try_from("https://").is_err());
        assert!(HttpsUrl::try_from("https://a b").is_err());
        assert!(HttpsUrl::try_from("javascript:alert(1)").is_err());
        assert!(HttpsUrl::try_from("https://ß£").is_err(), "non-ASCII: not a URI");
        assert!(HttpsUrl::try_from("https://a.test/x\"onmouseover=1").is_err());
        assert!(HttpsUrl::try_from("https://xn--strae-oqa.test/l%C3%B6go.png?a=1&b=2#x").is_ok());
        assert!(SupportUrl::try_from("mailto:help@example.com").is_ok());
        assert!(SupportUrl::try_from("javascript:alert(1)").is_err());
        assert!(AccentColor::try_from("#0a84ff").is_ok());
        assert!(AccentColor::try_from("#fff").is_ok());
        assert!(AccentColor::try_from("#ffff").is_err());
        assert!(AccentColor::try_from("red").is_err());
    }

    #[test]
    fn sha256_and_ports() {
        let h = "ab".repeat(32);
        assert_eq!(Sha256::try_from(h.clone()).unwrap().to_string(), h);
        assert!(Sha256::try_from("AB".repeat(32)).is_err());
        assert!(Sha256::try_from("ab".repeat(31)).is_err());
        assert!(Port::try_from(0).is_err());
        assert!(Port::try_from(65536).is_err());
        assert_eq!(Port::try_from(65535).unwrap().0, 65535);
        assert!(Instance::try_from("10.0.0.1:0".to_string()).is_err());
        assert!(Instance::try_from("[::1]:8080".to_string()).is_ok());
    }

    #[test]
    fn rfc3339() {
        let t = Timestamp::parse_rfc3339("2026-12-01T00:00:00Z").unwrap();
        assert_eq!(t.0, 1_796_083_200);
        assert_eq!(t.to_rfc3339(), "2026-12-01T00:00:00Z");
        let t2 = Timestamp::parse_rfc3339("2026-12-01T01:30:00.25+01:30").unwrap();
        assert_eq!(t2.0, t.0);
        assert_eq!(Timestamp::parse_rfc3339("1970-01-01T00:00:00Z").unwrap().0, 0);
        assert!(Timestamp::parse_rfc3339("2026-02-30T00:00:00Z").is_err());
        assert!(Timestamp::parse_rfc3339("2026-12-01 00:00:00").is_err());
        assert!(Timestamp::parse_rfc3339("2026-12-01T00:00:00+24:00").is_err());
        assert!(Timestamp::parse_rfc3339("２026-12-01T00:00:00Z").is_err());
    }

    #[test]
    fn password_hash() {
        assert!(PasswordHash::try_from("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA").is_ok());
        assert!(PasswordHash::try_from("$argon2i$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA").is_err());
        assert!(PasswordHash::try_from("hunter2").is_err());
        assert!(PasswordHash::try_from("$argon2id$v=19$m=4194304,t=2,p=1$c2FsdA$aGFzaA").is_err(), "4 GiB per try is refused");
        assert!(PasswordHash::try_from("$argon2id$v=19$t=2,p=1$c2FsdA$aGFzaA").is_err());
    }
}
