//! Limits on the connections of one client address, and the address lists (exempt sources,
//! trusted proxies) the listener consults.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use lodge_actors::balancer::pattern::AddrPattern;

/// Limits on the connections of one source IP address (0 turns a limit off).
#[derive(Clone)]
pub struct PerIpLimits {
    /// New connections allowed within `window` (`server.per_ip_connection_rate`).
    pub rate: u32,
    /// `server.per_ip_window_ms`.
    pub window: Duration,
    /// Connections open at once (`server.per_ip_max_connections`).
    pub max_open: u32,
    /// Where refusals are counted.
    pub metrics: lodge_actors::registry::RegistryMetrics,
}

/// Which per-IP limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpLimit {
    /// Too many new connections within the window.
    Rate,
    /// Too many open at once.
    Concurrency,
}

impl IpLimit {
    /// The label in `lodge_limit_rejections{limit}`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Rate => "ip_rate",
            Self::Concurrency => "ip_concurrency",
        }
    }
}

/// A list of IP networks (`10.0.0.0/8`, `::1`).
#[derive(Clone, Debug, Default)]
pub struct Networks(Vec<AddrPattern>);

impl Networks {
    /// Parses `entries`, each an IP address or a CIDR block; the error names the first bad entry
    /// by its index and says what is wrong with it.
    pub fn parse(entries: &[String]) -> Result<Self, (usize, String)> {
        entries
            .iter()
            .enumerate()
            .map(|(i, e)| match AddrPattern::parse(e.trim()) {
                Ok(p @ (AddrPattern::Ip(_) | AddrPattern::Cidr { .. })) => Ok(p),
                Ok(_) => Err((
                    i,
                    format!(
                        "{e:?} is not an IP address or network (for every address write \
                         0.0.0.0/0 and ::/0)"
                    ),
                )),
                Err(why) => Err((i, format!("{e:?}: {why}"))),
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Whether `ip` is in one of the networks (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }
}

/// Connections per source IP: how many are open, and when recent ones arrived.
#[derive(Default)]
pub(super) struct IpTable {
    by_ip: HashMap<IpAddr, IpEntry>,
    admitted: u64,
}

#[derive(Default)]
struct IpEntry {
    open: u32,
    /// Arrival times within the window, oldest first.
    recent: VecDeque<Instant>,
}

impl IpTable {
    /// Takes a connection from `ip`, or names the limit that refuses it.
    pub(super) fn admit(
        &mut self,
        ip: IpAddr,
        limits: &PerIpLimits,
        now: Instant,
    ) -> Result<(), IpLimit> {
        self.admitted += 1;
        if self.admitted.is_multiple_of(1024) {
            // Addresses that came once and left would otherwise stay forever.
            self.by_ip.retain(|_, e| {
                e.open > 0
                    || e.recent
                        .back()
                        .is_some_and(|t| now.duration_since(*t) < limits.window)
            });
        }
        let e = self.by_ip.entry(ip).or_default();
        while e
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= limits.window)
        {
            e.recent.pop_front();
        }
        if limits.max_open > 0 && e.open >= limits.max_open {
            return Err(IpLimit::Concurrency);
        }
        if limits.rate > 0 && e.recent.len() >= limits.rate as usize {
            return Err(IpLimit::Rate);
        }
        e.open += 1;
        if limits.rate > 0 {
            e.recent.push_back(now);
        }
        Ok(())
    }

    pub(super) fn release(&mut self, ip: IpAddr) {
        if let Some(e) = self.by_ip.get_mut(&ip) {
            e.open = e.open.saturating_sub(1);
            // Forgotten once idle, so the table holds only addresses with open connections (or
            // recent arrivals, which the next connection from them prunes).
            if e.open == 0 && e.recent.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: u32, max_open: u32) -> PerIpLimits {
        PerIpLimits {
            rate,
            window: Duration::from_secs(10),
            max_open,
            metrics: Default::default(),
        }
    }

    #[test]
    fn per_ip_rate_refuses_the_excess_until_the_window_passes() {
        let mut t = IpTable::default();
        let l = limits(3, 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            t.admit(a, &l, t0).unwrap();
        }
        assert_eq!(t.admit(a, &l, t0), Err(IpLimit::Rate));
        // Another address has its own budget.
        assert!(t.admit(b, &l, t0).is_ok());
        assert!(t.admit(a, &l, t0 + Duration::from_secs(10)).is_ok());
    }

    #[test]
    fn per_ip_concurrency_frees_a_slot_when_a_connection_closes() {
        let mut t = IpTable::default();
        let l = limits(0, 2);
        let a: IpAddr = "::1".parse().unwrap();
        let now = Instant::now();
        t.admit(a, &l, now).unwrap();
        t.admit(a, &l, now).unwrap();
        assert_eq!(t.admit(a, &l, now), Err(IpLimit::Concurrency));
        t.release(a);
        assert!(t.admit(a, &l, now).is_ok());
        t.release(a);
        t.release(a);
        assert!(
            t.by_ip.is_empty(),
            "an address with nothing open is forgotten"
        );
    }

    #[test]
    fn networks_hold_addresses_and_blocks_and_name_a_bad_entry() {
        let n =
            Networks::parse(&["127.0.0.0/8".into(), "::1".into(), " 10.1.2.3 ".into()]).unwrap();
        for (ip, inside) in [
            ("127.0.0.1", true),
            ("127.255.0.9", true),
            ("::ffff:127.0.0.1", true),
            ("::1", true),
            ("10.1.2.3", true),
            ("10.1.2.4", false),
            ("128.0.0.1", false),
            ("::2", false),
        ] {
            assert_eq!(n.contains(ip.parse().unwrap()), inside, "{ip}");
        }
        assert!(!Networks::default().contains("127.0.0.1".parse().unwrap()));
        for (entries, index, why) in [
            (vec!["::1", "*"], 1, "0.0.0.0/0"),
            (vec!["example.com"], 0, "not an IP address or network"),
            (vec!["10.0.0.0/33"], 0, "exceeds 32"),
            (vec!["10.0.0.0/"], 0, "missing prefix"),
        ] {
            let entries: Vec<String> = entries.into_iter().map(String::from).collect();
            let (i, e) = Networks::parse(&entries).unwrap_err();
            assert_eq!(i, index, "{e}");
            assert!(e.contains(why), "{e}");
        }
    }
}
