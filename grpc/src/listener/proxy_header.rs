//! The PROXY protocol header (HAProxy's, versions 1 and 2) that a trusted proxy sends before the
//! client's bytes, naming the client it accepted.
//!
//! Only connections from `server.proxy_protocol_from` are read this way; from those the header is
//! required, so a proxy that is misconfigured is refused rather than mistaken for the client. A
//! `LOCAL` (v2) or `UNKNOWN` (v1) header is the proxy speaking for itself (its health checks):
//! the connection keeps the proxy's own address.
//!
//! Specification: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12 bytes every v2 header starts with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is one line of at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// The fixed part of a v2 header: signature, version and command, family, length.
const V2_FIXED: usize = 16;
/// The v2 length field is 16 bits, but a proxy that sends more than this in TLVs is not one we
/// want to buffer for.
const V2_MAX_PAYLOAD: usize = 4096;

/// What a header said, and the client's bytes that arrived with it.
#[derive(Debug)]
pub struct ProxyHeader {
    /// The client the proxy accepted; `None` when the proxy speaks for itself.
    pub source: Option<SocketAddr>,
    /// Bytes read past the header: the start of the client's stream.
    pub rest: BytesMut,
}

/// Why a connection from a trusted proxy was refused.
#[derive(Debug, PartialEq)]
pub enum HeaderError {
    /// The bytes are not a PROXY header (or the connection closed before one was complete).
    Malformed(String),
    /// Reading failed.
    Io(String),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed(m) => write!(f, "bad PROXY protocol header: {m}"),
            Self::Io(e) => write!(f, "reading the PROXY protocol header: {e}"),
        }
    }
}

/// Reads a header from `io`. The caller bounds the time it may take.
pub async fn read(io: &mut (impl AsyncRead + Unpin)) -> Result<ProxyHeader, HeaderError> {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        match parse(&buf)? {
            Parsed::Complete { len, source } => {
                buf.advance(len);
                return Ok(ProxyHeader { source, rest: buf });
            }
            Parsed::NeedMore => {}
        }
        let n = io
            .read_buf(&mut buf)
            .await
            .map_err(|e| HeaderError::Io(e.to_string()))?;
        if n == 0 {
            return Err(HeaderError::Malformed(format!(
                "the connection closed after {} bytes, before the header ended",
                buf.len()
            )));
        }
    }
}

/// The outcome of looking at the bytes received so far.
#[derive(Debug, PartialEq)]
enum Parsed {
    NeedMore,
    Complete {
        len: usize,
        source: Option<SocketAddr>,
    },
}

fn malformed(m: impl Into<String>) -> HeaderError {
    HeaderError::Malformed(m.into())
}

fn parse(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(Parsed::NeedMore)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return parse_v1(buf);
    }
    Err(malformed(
        "the connection does not start with one (is the proxy configured to send it?)",
    ))
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(malformed(format!("v1 line longer than {V1_MAX} bytes")))
        } else {
            Ok(Parsed::NeedMore)
        };
    };
    let len = end + 2;
    if len > V1_MAX {
        return Err(malformed(format!("v1 line longer than {V1_MAX} bytes")));
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| malformed("v1 line is not ASCII"))?;
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(Parsed::Complete { len, source: None }),
        ["PROXY", family @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| malformed(format!("v1 source address {src:?}")))?;
            if ip.is_ipv4() != (*family == "TCP4") {
                return Err(malformed(format!("v1 source {src} is not {family}")));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| malformed(format!("v1 source port {sport:?}")))?;
            Ok(Parsed::Complete {
                len,
                source: Some(SocketAddr::new(ip, port)),
            })
        }
        _ => Err(malformed(
            "v1 line is not PROXY TCP4|TCP6 SRC DST SPORT DPORT",
        )),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, HeaderError> {
    if buf.len() < V2_FIXED {
        return Ok(Parsed::NeedMore);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err(malformed(format!("v2 header with version {version}")));
    }
    let payload = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if payload > V2_MAX_PAYLOAD {
        return Err(malformed(format!(
            "v2 header of {payload} bytes (at most {V2_MAX_PAYLOAD})"
        )));
    }
    let len = V2_FIXED + payload;
    if buf.len() < len {
        return Ok(Parsed::NeedMore);
    }
    let addrs = &buf[V2_FIXED..len];
    match command {
        // LOCAL: the proxy's own connection; the address block, if any, is ignored.
        0x0 => Ok(Parsed::Complete { len, source: None }),
        0x1 => {
            let source = match buf[13] {
                // TCP over IPv4: src (4), dst (4), src port, dst port.
                0x11 if addrs.len() >= 12 => {
                    let ip = Ipv4Addr::new(addrs[0], addrs[1], addrs[2], addrs[3]);
                    let port = u16::from_be_bytes([addrs[8], addrs[9]]);
                    Some(SocketAddr::new(IpAddr::V4(ip), port))
                }
                // TCP over IPv6: src (16), dst (16), src port, dst port.
                0x21 if addrs.len() >= 36 => {
                    let mut octets = [0u8; 16];
                    octets.copy_from_slice(&addrs[..16]);
                    let port = u16::from_be_bytes([addrs[32], addrs[33]]);
                    Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
                }
                0x11 | 0x21 => return Err(malformed("v2 address block too short")),
                // UNSPEC and other transports: nothing usable, as the specification says.
                _ => None,
            };
            Ok(Parsed::Complete { len, source })
        }
        other => Err(malformed(format!("v2 command {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addrs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        h.extend_from_slice(addrs);
        h
    }

    #[test]
    fn headers_as_haproxy_sends_them() {
        // (the header's bytes, the client it names)
        let v4 = [
            192, 0, 2, 7, // source
            10, 0, 0, 1, // destination
            0xd4, 0x31, // 54321
            0x1c, 0xe8, // 7400
        ];
        let mut v6 = vec![0u8; 36];
        v6[..16].copy_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        v6[32..34].copy_from_slice(&54321u16.to_be_bytes());
        let cases: Vec<(Vec<u8>, Option<&str>)> = vec![
            (
                b"PROXY TCP4 192.0.2.7 10.0.0.1 54321 7400\r\n".to_vec(),
                Some("192.0.2.7:54321"),
            ),
            (
                b"PROXY TCP6 2001:db8::7 2001:db8::1 54321 7400\r\n".to_vec(),
                Some("[2001:db8::7]:54321"),
            ),
            (b"PROXY UNKNOWN\r\n".to_vec(), None),
            (
                b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n".to_vec(),
                None,
            ),
            (v2(1, 0x11, &v4), Some("192.0.2.7:54321")),
            (v2(1, 0x21, &v6), Some("[2001:db8::7]:54321")),
            (v2(0, 0x00, &[]), None),
            // A TLV after the addresses (ALPN "h2") is skipped.
            (
                v2(
                    1,
                    0x11,
                    &[&v4[..], &[0x01, 0x00, 0x02, b'h', b'2']].concat(),
                ),
                Some("192.0.2.7:54321"),
            ),
        ];
        for (bytes, client) in cases {
            let mut with_data = bytes.clone();
            with_data.extend_from_slice(b"PRI * HTTP/2.0");
            let parsed = parse(&with_data).unwrap();
            let want = Parsed::Complete {
                len: bytes.len(),
                source: client.map(|c| c.parse().unwrap()),
            };
            assert_eq!(parsed, want, "{:?}", String::from_utf8_lossy(&bytes));
            // Every strict prefix asks for more, never fails and never completes.
            for cut in 0..bytes.len() {
                assert_eq!(parse(&bytes[..cut]).unwrap(), Parsed::NeedMore, "cut {cut}");
            }
        }
    }

    #[test]
    fn what_is_not_a_header_is_refused_with_the_reason() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                "does not start with one",
            ),
            (b"\x16\x03\x01\x02\x00", "does not start with one"),
            (b"PROXY TCP4 1.2.3.4\r\n", "is not PROXY TCP4"),
            (b"PROXY TCP4 ::1 ::1 1 2\r\n", "is not TCP4"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.5 99999 1\r\n", "source port"),
            (b"PROXY TCP5 1.2.3.4 1.2.3.5 1 1\r\n", "is not PROXY"),
        ];
        for (bytes, want) in cases {
            let e = parse(bytes).unwrap_err().to_string();
            assert!(
                e.contains(want),
                "{e} for {:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let long = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        assert!(parse(&long)
            .unwrap_err()
            .to_string()
            .contains("longer than"));
        let mut h = v2(1, 0x11, &[0; 4]);
        assert!(parse(&h).unwrap_err().to_string().contains("too short"));
        h[12] = 0x31;
        assert!(parse(&h).unwrap_err().to_string().contains("version 3"));
        let mut big = v2(1, 0x11, &[]);
        big[14..16].copy_from_slice(&60000u16.to_be_bytes());
        assert!(parse(&big).unwrap_err().to_string().contains("at most"));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let mut b: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            match rng.u8(0..3) {
                0 => b.splice(0..0, b"PROXY ".iter().copied()).for_each(drop),
                1 => b.splice(0..0, V2_SIGNATURE.iter().copied()).for_each(drop),
                _ => {}
            }
            let _ = parse(&b);
        }
    }

    #[tokio::test]
    async fn read_keeps_the_bytes_after_the_header() {
        let mut input: &[u8] = b"PROXY TCP4 192.0.2.7 10.0.0.1 5 7400\r\nPRI * HTTP/2.0";
        let h = read(&mut input).await.unwrap();
        assert_eq!(h.source, Some("192.0.2.7:5".parse().unwrap()));
        assert_eq!(&h.rest[..], b"PRI * HTTP/2.0");
        let mut short: &[u8] = b"PROXY TCP4";
        assert!(read(&mut short)
            .await
            .unwrap_err()
            .to_string()
            .contains("closed after 10"));
    }
}
