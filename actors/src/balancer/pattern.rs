//! Address, path and header patterns of routes.
//!
//! Each pattern is parsed (validated) once, when a route is written, and matched many times.
//! `parse` errors are short and say what is wrong; they reach users as `INVALID_ARGUMENT`
//! messages, so the caller adds which field (and value) they are about.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use wildmatch::WildMatch;

use crate::quote::echo;

/// The longest domain glob (the DNS limit for a name).
pub const MAX_DOMAIN_LEN: usize = 253;
/// The longest label of a domain glob (the DNS limit for a label).
pub const MAX_LABEL_LEN: usize = 63;
/// The longest path glob, in characters.
pub const MAX_PATH_LEN: usize = 1024;
/// The longest header value glob, in characters.
pub const MAX_HEADER_VALUE_LEN: usize = 1024;

/// `path` without its query string (from the first `?` on).
pub fn path_without_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// The IPv4 address an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) stands for; any other
/// address unchanged.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `ip` with every bit after the first `prefix` cleared.
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// An IP literal, IPv6 optionally in brackets (`[::1]`).
fn parse_ip(s: &str) -> Option<IpAddr> {
    match s.strip_prefix('[') {
        Some(rest) => rest
            .strip_suffix(']')?
            .parse::<Ipv6Addr>()
            .ok()
            .map(IpAddr::V6),
        None => s.parse().ok(),
    }
}

/// A domain glob: lower-case labels of letters, digits, `-`, `*` and `?`. `*` matches any run of
/// characters, dots included; `?` matches one character.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainGlob {
    glob: String,
    matcher: WildMatch,
}

impl DomainGlob {
    /// The glob, in lower case.
    pub fn as_str(&self) -> &str {
        &self.glob
    }

    fn parse(s: &str) -> Result<Self, String> {
        if let Some(c) = s
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '*' | '?' | '.')))
        {
            return Err(format!("invalid character {c:?}"));
        }
        // Only ASCII from here on: lengths in bytes are lengths in characters.
        if s.len() > MAX_DOMAIN_LEN {
            return Err(format!("longer than {MAX_DOMAIN_LEN} characters"));
        }
        for label in s.split('.') {
            if label.is_empty() {
                return Err("empty label (leading, trailing or double dot)".into());
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(format!(
                    "label {} is longer than {MAX_LABEL_LEN} characters",
                    echo(label)
                ));
            }
        }
        if !s.chars().any(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err("a domain glob needs a letter, digit or '-'".into());
        }
        // Names of digits only would be read as IPv4 addresses, and a glob never matches an IP
        // address: `10.0.0.*` would silently match nothing.
        if s.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '*' | '?' | '.'))
        {
            return Err(if s.contains(['*', '?']) {
                "globs do not match IP addresses; use a CIDR block (10.0.0.0/24)".into()
            } else {
                "invalid IPv4 address".into()
            });
        }
        let glob = s.to_ascii_lowercase();
        Ok(Self {
            matcher: WildMatch::new(&glob),
            glob,
        })
    }

    /// Whether host name `name` matches, ignoring ASCII case and one trailing dot.
    fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() {
            return false;
        }
        // Lower-case the value rather than match case-insensitively: the latter folds some
        // non-ASCII characters (the Kelvin sign) onto ASCII letters.
        let name: Cow<'_, str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(name.to_ascii_lowercase())
        } else {
            Cow::Borrowed(name)
        };
        self.matcher.matches(&name)
    }
}

/// An address pattern: what `source_pattern` / `destination_pattern` may hold.
///
/// IPv4-mapped IPv6 patterns (`::ffff:10.0.0.1`, `::ffff:10.0.0.0/104`) are stored as the IPv4
/// address or block they stand for, as mapped values are matched as IPv4.
#[derive(Clone, Debug, PartialEq)]
pub enum AddrPattern {
    /// `""` or `"*"`: every value, host names, IP addresses and `""` alike.
    Any,
    /// One IP address.
    Ip(IpAddr),
    /// A block of IP addresses; `net` has the bits after `prefix` cleared.
    Cidr { net: IpAddr, prefix: u8 },
    /// Host names.
    Domain(DomainGlob),
}

impl AddrPattern {
    /// `""` or `"*"` → `Any`; an IPv4 or IPv6 literal (IPv6 may be bracketed, `[::1]`) → `Ip`;
    /// `a.b.c.d/n` (n ≤ 32) or `v6/n` (n ≤ 128) → `Cidr` (host bits may be set; they are
    /// cleared); anything else must be a domain glob: labels of letters, digits, `-`, `*` and
    /// `?` separated by single dots, at most 253 characters (63 a label), with at least one
    /// letter, digit or `-`, and not only digits (those are IPv4 addresses, which globs never
    /// match). Domain globs are stored in lower case.
    ///
    /// The error says what is wrong, e.g. "prefix length 33 exceeds 32 for IPv4".
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s == "*" {
            return Ok(Self::Any);
        }
        if let Some((addr, prefix)) = s.split_once('/') {
            return Self::parse_cidr(addr, prefix);
        }
        if let Some(ip) = parse_ip(s) {
            return Ok(Self::Ip(canonical(ip)));
        }
        if s.starts_with('[') {
            return Err("invalid IPv6 address in brackets".into());
        }
        match s.matches(':').count() {
            0 => DomainGlob::parse(s).map(Self::Domain),
            1 => Err("':' is not allowed (ports are set separately)".into()),
            _ => Err("invalid IPv6 address".into()),
        }
    }

    fn parse_cidr(addr: &str, prefix: &str) -> Result<Self, String> {
        let Some(net) = parse_ip(addr) else {
            return Err(format!("invalid network address {}", echo(addr)));
        };
        if prefix.is_empty() {
            return Err("missing prefix length after '/'".into());
        }
        if !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("invalid prefix length {}", echo(prefix)));
        }
        let (family, max) = match net {
            IpAddr::V4(_) => ("IPv4", 32),
            IpAddr::V6(_) => ("IPv6", 128),
        };
        // Digits only: a parse error is an overflow.
        let n = prefix.parse::<u32>().unwrap_or(u32::MAX);
        if n > max {
            let shown = if n == u32::MAX {
                echo(prefix)
            } else {
                n.to_string()
            };
            return Err(format!("prefix length {shown} exceeds {max} for {family}"));
        }
        let prefix = n as u8; // ≤ 128
        let net = mask(net, prefix);
        if let (IpAddr::V6(v6), 96..) = (net, prefix) {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return Ok(Self::Cidr {
                    net: IpAddr::V4(v4),
                    prefix: prefix - 96,
                });
            }
        }
        Ok(Self::Cidr { net, prefix })
    }

    /// Whether `value`, an IP address (IPv6 optionally bracketed) or a host name, matches.
    ///
    /// IP and CIDR patterns match only IP values of their own family, an IPv4-mapped IPv6 value
    /// (`::ffff:a.b.c.d`) counting as the IPv4 address. Domain globs match only host names,
    /// ignoring ASCII case and a trailing dot: `*.example.com` matches `a.example.com` and
    /// `a.b.example.com` but not `example.com`. Only `Any` matches `""`.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Ip(_) | Self::Cidr { .. } => parse_ip(value).is_some_and(|v| self.contains(v)),
            Self::Domain(glob) => parse_ip(value).is_none() && glob.matches(value),
        }
    }

    /// Whether the IP address `ip` matches: `Any` matches every address, domain globs none; an
    /// IPv4-mapped IPv6 address counts as the IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match self {
            Self::Any => true,
            Self::Ip(own) => ip == *own,
            Self::Cidr { net, prefix } => {
                ip.is_ipv4() == net.is_ipv4() && mask(ip, *prefix) == *net
            }
            Self::Domain(_) => false,
        }
    }
}

impl fmt::Display for AddrPattern {
    /// The canonical form: `*`, the address, `net/prefix` or the lower-case glob.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Cidr { net, prefix } => write!(f, "{net}/{prefix}"),
            Self::Domain(glob) => f.write_str(glob.as_str()),
        }
    }
}

/// A path glob: `""` matches every path; otherwise it starts with `/` or `*`, has no whitespace
/// or control characters and at most 1024 characters. `*` matches any run of characters, `/`
/// included; `?` matches one character. Matching is case-sensitive and sees the path without
/// its query string (so `?` in a pattern never stands for the query separator).
#[derive(Clone, Debug, PartialEq)]
pub struct PathPattern {
    glob: String,
    /// `None`: any path.
    matcher: Option<WildMatch>,
}

impl PathPattern {
    /// Validates `s` (see the type); the error says what is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Ok(Self {
                glob: String::new(),
                matcher: None,
            });
        }
        if !(s.starts_with('/') || s.starts_with('*')) {
            return Err("must start with '/' or '*'".into());
        }
        if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("invalid character {c:?}"));
        }
        if s.chars().count() > MAX_PATH_LEN {
            return Err(format!("longer than {MAX_PATH_LEN} characters"));
        }
        Ok(Self {
            glob: s.to_owned(),
            matcher: Some(WildMatch::new(s)),
        })
    }

    /// The glob as given (`""`: any).
    pub fn as_str(&self) -> &str {
        &self.glob
    }

    /// Whether `path` (its query string ignored) matches.
    pub fn matches(&self, path: &str) -> bool {
        self.matcher
            .as_ref()
            .is_none_or(|m| m.matches(path_without_query(path)))
    }
}

/// Whether `c` is an RFC 7230 `tchar` (a character of a token, e.g. a header name).
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// A header rule: the header named `name` (case-insensitive) must be present with a value
/// matching a glob (`*` any run of characters, `?` one; case-sensitive). A missing header never
/// matches, not even the glob `*`; the glob `""` matches only an empty value.
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderPattern {
    name: String,
    glob: String,
    matcher: WildMatch,
}

impl HeaderPattern {
    /// Validates a rule: `name` must be an RFC 7230 token (stored in lower case); `value` has no
    /// control characters other than tab and at most 1024 characters. The error says what is
    /// wrong.
    pub fn parse(name: &str, value: &str) -> Result<Self, String> {
        if name.is_empty() {
            return Err("empty header name".into());
        }
        if let Some(c) = name.chars().find(|&c| !is_tchar(c)) {
            return Err(format!(
                "invalid character {c:?} in the name (names are RFC 7230 tokens)"
            ));
        }
        if let Some(c) = value.chars().find(|&c| c.is_control() && c != '\t') {
            return Err(format!("invalid character {c:?} in the value glob"));
        }
        if value.chars().count() > MAX_HEADER_VALUE_LEN {
            return Err(format!(
                "the value glob is longer than {MAX_HEADER_VALUE_LEN} characters"
            ));
        }
        Ok(Self {
            name: name.to_ascii_lowercase(),
            glob: value.to_owned(),
            matcher: WildMatch::new(value),
        })
    }

    /// The header name, in lower case.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value glob as given.
    pub fn value_glob(&self) -> &str {
        &self.glob
    }

    /// Whether `headers` (names in lower case, as in a `Flow`) has the header with a matching
    /// value. A name not in lower case is still found, more slowly.
    pub fn matches(&self, headers: &BTreeMap<String, String>) -> bool {
        let value = headers.get(&self.name).or_else(|| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(&self.name))
                .map(|(_, v)| v)
        });
        value.is_some_and(|v| self.matcher.matches(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse().unwrap())
    }

    #[test]
    fn addr_parse_kinds() {
        let cases: &[(&str, AddrPattern)] = &[
            ("", AddrPattern::Any),
            ("*", AddrPattern::Any),
            ("10.1.2.3", AddrPattern::Ip(v4(10, 1, 2, 3))),
            ("::1", AddrPattern::Ip(v6("::1"))),
            ("[2001:db8::7]", AddrPattern::Ip(v6("2001:db8::7"))),
            ("::ffff:10.1.2.3", AddrPattern::Ip(v4(10, 1, 2, 3))),
            (
                "10.1.2.3/8",
                AddrPattern::Cidr {
                    net: v4(10, 0, 0, 0),
                    prefix: 8,
                },
            ),
            (
                "0.0.0.0/0",
                AddrPattern::Cidr {
                    net: v4(0, 0, 0, 0),
                    prefix: 0,
                },
            ),
            (
                "192.168.1.7/32",
                AddrPattern::Cidr {
                    net: v4(192, 168, 1, 7),
                    prefix: 32,
                },
            ),
            (
                "2001:db8:ffff::1/32",
                AddrPattern::Cidr {
                    net: v6("2001:db8::"),
                    prefix: 32,
                },
            ),
            (
                "[fd00::1]/8",
                AddrPattern::Cidr {
                    net: v6("fd00::"),
                    prefix: 8,
                },
            ),
            (
                "::ffff:10.9.9.9/104",
                AddrPattern::Cidr {
                    net: v4(10, 0, 0, 0),
                    prefix: 8,
                },
            ),
            (
                "::ffff:0:0/96",
                AddrPattern::Cidr {
                    net: v4(0, 0, 0, 0),
                    prefix: 0,
                },
            ),
        ];
        for (s, want) in cases {
            assert_eq!(AddrPattern::parse(s).as_ref(), Ok(want), "{s:?}");
        }
        let AddrPattern::Domain(glob) = AddrPattern::parse("*.Example.COM").unwrap() else {
            panic!("not a domain glob");
        };
        assert_eq!(glob.as_str(), "*.example.com");
    }

    #[test]
    fn addr_display_is_canonical() {
        let cases = [
            ("", "*"),
            ("[::1]", "::1"),
            ("::ffff:1.2.3.4", "1.2.3.4"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("2001:DB8::1/64", "2001:db8::/64"),
            ("API-?.Example.com", "api-?.example.com"),
        ];
        for (s, want) in cases {
            assert_eq!(AddrPattern::parse(s).unwrap().to_string(), want, "{s:?}");
        }
    }

    #[test]
    fn addr_matches() {
        // (pattern, values that match, values that do not)
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("", &["", "1.2.3.4", "::1", "example.com"], &[]),
            ("*", &["", "1.2.3.4", "host"], &[]),
            (
                "10.1.2.3",
                &["10.1.2.3", "::ffff:10.1.2.3", "[::ffff:10.1.2.3]"],
                &["10.1.2.4", "", "host", "10.1.2.3.example.com", "::a01:203"],
            ),
            (
                "2001:db8::7",
                &["2001:db8::7", "2001:DB8:0:0:0:0:0:7", "[2001:db8::7]"],
                &["2001:db8::8", "10.1.2.3", "", "example.com"],
            ),
            (
                "10.0.0.0/8",
                &["10.0.0.0", "10.255.255.255", "10.3.4.5", "::ffff:10.3.4.5"],
                &["11.0.0.0", "9.255.255.255", "::a03:405", "", "ten.example"],
            ),
            (
                "0.0.0.0/0",
                &["0.0.0.0", "255.255.255.255", "::ffff:8.8.8.8"],
                &["::1", "2001:db8::1", "", "example.com"],
            ),
            (
                "192.168.1.7/32",
                &["192.168.1.7"],
                &["192.168.1.6", "192.168.1.8"],
            ),
            (
                "2001:db8::/32",
                &["2001:db8::", "2001:db8:ffff:ffff::1", "[2001:db8::5]"],
                &[
                    "2001:db9::",
                    "2001:db7:ffff::",
                    "10.0.0.1",
                    "::ffff:10.0.0.1",
                ],
            ),
            (
                "::/0",
                &["::", "::1", "2001:db8::1"],
                &["10.0.0.1", "::ffff:10.0.0.1"],
            ),
            ("::1/128", &["::1"], &["::2", "::"]),
            (
                "::ffff:10.0.0.0/104",
                &["10.1.1.1", "::ffff:10.1.1.1"],
                &["11.1.1.1", "::a01:101"],
            ),
            (
                "*.example.com",
                &[
                    "a.example.com",
                    "a.b.example.com",
                    "A.Example.COM",
                    "a.example.com.",
                ],
                &[
                    "example.com",
                    "example.com.",
                    "aexample.com",
                    "a.example.org",
                    "",
                    ".",
                ],
            ),
            (
                "Api-?.Example.com",
                &["api-1.example.com", "API-X.EXAMPLE.COM"],
                &["api-12.example.com", "api-.example.com", "api-1.example.co"],
            ),
            (
                "example.*",
                &["example.com", "example.co.uk"],
                &["example", "www.example.com"],
            ),
            (
                "localhost",
                &["localhost", "LOCALHOST."],
                &["127.0.0.1", "::1", "localhost.."],
            ),
            // The Kelvin sign lowercases to 'k' outside ASCII; only ASCII case is ignored.
            ("k.example", &["K.example"], &["\u{212a}.example"]),
        ];
        for (pattern, yes, no) in cases {
            let p = AddrPattern::parse(pattern).unwrap();
            for v in *yes {
                assert!(p.matches(v), "{pattern:?} should match {v:?}");
            }
            for v in *no {
                assert!(!p.matches(v), "{pattern:?} should not match {v:?}");
            }
        }
    }

    #[test]
    fn addr_rejects() {
        let cases = [
            ("10.0.0.0/33", "prefix length 33 exceeds 32 for IPv4"),
            ("::/129", "prefix length 129 exceeds 128 for IPv6"),
            (
                "10.0.0.0/99999999999",
                "prefix length \"99999999999\" exceeds 32 for IPv4",
            ),
            ("10.0.0.0/", "missing prefix length after '/'"),
            ("10.0.0.0/+8", "invalid prefix length \"+8\""),
            ("10.0.0.0/8/8", "invalid prefix length \"8/8\""),
            ("10.0.0/8", "invalid network address \"10.0.0\""),
            ("example.com/8", "invalid network address \"example.com\""),
            ("/8", "invalid network address \"\""),
            ("[1.2.3.4]", "invalid IPv6 address in brackets"),
            ("[::1", "invalid IPv6 address in brackets"),
            ("2001:db8::g", "invalid IPv6 address"),
            ("fe80::1%eth0", "invalid IPv6 address"),
            (
                "example.com:443",
                "':' is not allowed (ports are set separately)",
            ),
            ("10.0.0.256", "invalid IPv4 address"),
            ("010.0.0.1", "invalid IPv4 address"),
            ("10", "invalid IPv4 address"),
            (
                "10.0.0.*",
                "globs do not match IP addresses; use a CIDR block (10.0.0.0/24)",
            ),
            ("a..b", "empty label (leading, trailing or double dot)"),
            (
                ".example.com",
                "empty label (leading, trailing or double dot)",
            ),
            (
                "example.com.",
                "empty label (leading, trailing or double dot)",
            ),
            ("*.*", "a domain glob needs a letter, digit or '-'"),
            ("??", "a domain glob needs a letter, digit or '-'"),
            ("exa mple.com", "invalid character ' '"),
            ("under_score.com", "invalid character '_'"),
            ("bücher.de", "invalid character 'ü'"),
            ("a\nb", "invalid character '\\n'"),
        ];
        for (s, want) in cases {
            assert_eq!(AddrPattern::parse(s), Err(want.to_owned()), "{s:?}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert_eq!(
            AddrPattern::parse(&long_label),
            Err(format!(
                "label \"{}\" is longer than 63 characters",
                "a".repeat(64)
            ))
        );
        let ok_label = format!("{}.com", "a".repeat(63));
        assert!(AddrPattern::parse(&ok_label).is_ok());
        let long_name = vec!["a".repeat(63); 4].join("."); // 255 characters
        assert_eq!(
            AddrPattern::parse(&long_name),
            Err("longer than 253 characters".to_owned())
        );
        let max_name = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "a".repeat(61));
        assert_eq!(max_name.len(), 253);
        assert!(AddrPattern::parse(&max_name).is_ok());
    }

    #[test]
    fn path_patterns() {
        // (pattern, paths that match, paths that do not)
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("", &["", "/", "/a/b?c=d", "anything"], &[]),
            ("*", &["", "/", "/a/b"], &[]),
            ("/", &["/", "/?q=1"], &["", "/a"]),
            (
                "/api/*",
                &["/api/", "/api/v1/users", "/api/x?y=z"],
                &["/api", "/API/x", "/apix", "/v1/api/x"],
            ),
            (
                "*.m3u8",
                &["/live/a.m3u8", "/a.m3u8?token=1"],
                &["/a.m3u8x", "/a.mp4"],
            ),
            (
                "/v?/items",
                &["/v1/items", "/v2/items"],
                &["/v10/items", "/v/items"],
            ),
            // `?` in a pattern is a wildcard; the query is never part of what is matched.
            ("/a?b", &["/axb"], &["/a?b", "/a"]),
        ];
        for (pattern, yes, no) in cases {
            let p = PathPattern::parse(pattern).unwrap();
            assert_eq!(p.as_str(), *pattern);
            for v in *yes {
                assert!(p.matches(v), "{pattern:?} should match {v:?}");
            }
            for v in *no {
                assert!(!p.matches(v), "{pattern:?} should not match {v:?}");
            }
        }
    }

    #[test]
    fn path_rejects() {
        let long = format!("/{}", "a".repeat(MAX_PATH_LEN));
        let cases = [
            ("api/*", "must start with '/' or '*'"),
            ("?x", "must start with '/' or '*'"),
            ("/a b", "invalid character ' '"),
            ("/a\tb", "invalid character '\\t'"),
            ("/a\u{7f}", "invalid character '\\u{7f}'"),
            (long.as_str(), "longer than 1024 characters"),
        ];
        for (s, want) in cases {
            assert_eq!(PathPattern::parse(s), Err(want.to_owned()), "{s:?}");
        }
        assert!(PathPattern::parse(&long[..MAX_PATH_LEN]).is_ok());
        assert_eq!(path_without_query("/a/b?c?d"), "/a/b");
        assert_eq!(path_without_query("/a/b"), "/a/b");
    }

    #[test]
    fn header_patterns() {
        let headers: BTreeMap<String, String> = [
            ("x-tenant", "Acme-EU"),
            ("x-empty", ""),
            ("content-type", "application/grpc+proto"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        // (name, value glob, matches `headers`)
        let cases = [
            ("X-Tenant", "Acme-*", true),
            ("x-tenant", "Acme-EU", true),
            ("X-TENANT", "acme-*", false), // values are case-sensitive
            ("x-tenant", "*", true),
            ("x-missing", "*", false), // a missing header never matches
            ("x-missing", "", false),
            ("x-empty", "", true),
            ("x-empty", "*", true),
            ("x-empty", "?", false),
            ("Content-Type", "application/grpc*", true),
        ];
        for (name, value, want) in cases {
            let h = HeaderPattern::parse(name, value).unwrap();
            assert_eq!(h.name(), name.to_ascii_lowercase());
            assert_eq!(h.value_glob(), value);
            assert_eq!(h.matches(&headers), want, "{name:?}: {value:?}");
        }
        // A flow whose header names were not lower-cased still matches.
        let upper: BTreeMap<String, String> = [("X-Tenant".to_owned(), "acme".to_owned())].into();
        assert!(HeaderPattern::parse("x-tenant", "acme")
            .unwrap()
            .matches(&upper));
    }

    #[test]
    fn header_rejects() {
        let long = "a".repeat(MAX_HEADER_VALUE_LEN + 1);
        let cases = [
            ("", "x", "empty header name"),
            (
                "X Bad",
                "x",
                "invalid character ' ' in the name (names are RFC 7230 tokens)",
            ),
            (
                "x:y",
                "x",
                "invalid character ':' in the name (names are RFC 7230 tokens)",
            ),
            (
                "é",
                "x",
                "invalid character 'é' in the name (names are RFC 7230 tokens)",
            ),
            ("x", "a\r\nb", "invalid character '\\r' in the value glob"),
            (
                "x",
                long.as_str(),
                "the value glob is longer than 1024 characters",
            ),
        ];
        for (name, value, want) in cases {
            assert_eq!(
                HeaderPattern::parse(name, value),
                Err(want.to_owned()),
                "{name:?}"
            );
        }
        assert!(HeaderPattern::parse("!#$%&'*+-.^_`|~09azAZ", "a\tb").is_ok());
        assert!(HeaderPattern::parse("x", &long[1..]).is_ok());
    }
}
