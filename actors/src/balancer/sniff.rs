//! Telling a connection's protocol from its first bytes.
//!
//! The L4 data plane accepts a TCP connection, reads what the client sends first and calls
//! [`sniff`] with everything read so far, again after every read, until the answer is not
//! [`Sniff::NeedMore`]. The answer names the protocol and, where the protocol carries them, the
//! routing keys: the TLS SNI or HTTP `Host` name, the HTTP path and headers, the PostgreSQL startup
//! parameters, the Redis command.
//!
//! The contract that makes the repeated calls safe: for growing prefixes of one stream the answer
//! is `NeedMore` until it is decided, and then stays the same. In particular `Unknown` is never
//! given for a prefix that a longer one would recognise, except that a stream still undecided after
//! [`MAX_SNIFF`] bytes is `Unknown` (so a client cannot make the balancer buffer without limit).
//!
//! Each protocol has one small function that answers for it alone; [`sniff`] asks them in a fixed
//! order and takes the first `Known`, else `NeedMore` if any can still match, else `Unknown`. The
//! first byte already rules out most of them. Their languages are disjoint except in corners
//! (a MongoDB header can start with the RTMP version byte; a PostgreSQL CancelRequest header can
//! also pass as a MongoDB header); the order puts the protocol that decides from fewer bytes first
//! there, so that an answer never flips from one protocol to another as the prefix grows.
//!
//! Detected: HTTP/1.x (and WebSocket upgrades), HTTP/2 with prior knowledge, TLS (ClientHello),
//! PostgreSQL, MongoDB, Redis (RESP and inline commands) and RTMP. Garbage is Unknown as soon as
//! no protocol can still match, which takes at least four bytes: any three bytes can start the
//! little-endian length of a MongoDB message, and binary garbage can need up to sixteen (the whole
//! MongoDB header).
//!
//! Not detected: **MySQL**. Its server speaks first (the handshake packet) and a client sends
//! nothing until it has seen it, so there are no client bytes to look at. The caller handles that by
//! falling back to the listener's configured protocol when the client stays silent for a while.
//! The same fallback covers any other server-first protocol (SMTP, FTP, SSH's banner exchange).

use std::collections::BTreeMap;

use super::flow::Protocol;

/// Longest prefix the sniffer looks at; a prefix this long that is still undecided is Unknown.
pub const MAX_SNIFF: usize = 16 * 1024;

/// The answer for one prefix of a connection's first bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sniff {
    /// The prefix is too short to decide; read more and call again with the longer prefix.
    NeedMore,
    /// Recognised.
    Known(Sniffed),
    /// Not a protocol the balancer recognises (also: undecided after MAX_SNIFF bytes).
    Unknown,
}

/// A recognised protocol and the routing keys found in its first message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sniffed {
    pub protocol: Protocol,
    /// Destination host name: TLS SNI, or HTTP Host header (without port, lower case); None if absent.
    ///
    /// An IPv6 literal comes without its brackets (`[::1]:8080` gives `::1`) so that it can be
    /// matched as an address; a trailing root dot is dropped. A name with characters that cannot
    /// be in a host name counts as absent.
    pub host: Option<String>,
    /// HTTP request path (origin-form, including query); "" for other protocols.
    ///
    /// An absolute-form target (`http://host/path`, as sent to proxies) gives its path part (and
    /// its host wins over the `Host` header, as RFC 9112 says); `OPTIONS *` gives `*`; `CONNECT`
    /// gives "" and its target's host.
    pub path: String,
    /// HTTP request headers with lower-case names (a repeated header: values joined with ", ");
    /// for PostgreSQL the startup parameters (`user`, `database`, ...); for Redis `command` (upper case,
    /// e.g. "PING"). Empty otherwise.
    pub headers: BTreeMap<String, String>,
}

impl Sniffed {
    fn new(protocol: Protocol) -> Self {
        Self {
            protocol,
            ..Self::default()
        }
    }
}

/// The per-protocol sniffers, in the order [`sniff`] asks them (see the module doc for why the
/// order matters: PostgreSQL before MongoDB before TLS and RTMP).
const SNIFFERS: [fn(&[u8]) -> Sniff; 7] = [http2, http1, redis, postgres, mongodb, tls, rtmp];

/// Decides the protocol of a connection from the bytes the client sent first.
///
/// `prefix` is everything read so far; bytes past [`MAX_SNIFF`] are ignored.
pub fn sniff(prefix: &[u8]) -> Sniff {
    let prefix = &prefix[..prefix.len().min(MAX_SNIFF)];
    if prefix.is_empty() {
        return Sniff::NeedMore;
    }
    let mut need_more = false;
    for sniffer in SNIFFERS {
        match sniffer(prefix) {
            known @ Sniff::Known(_) => return known,
            Sniff::NeedMore => need_more = true,
            Sniff::Unknown => {}
        }
    }
    if need_more && prefix.len() < MAX_SNIFF {
        Sniff::NeedMore
    } else {
        Sniff::Unknown
    }
}

/// `?` for the sniffers: the value of an `Ok`, or return the undecided answer in the `Err`.
macro_rules! step {
    ($e:expr) => {
        match $e {
            Ok(value) => value,
            Err(undecided) => return undecided,
        }
    };
}

/// `Err(NeedMore)` when `p` ends inside `lit` at `*at`, `Err(Unknown)` when it differs, else moves
/// past it.
fn expect(p: &[u8], at: &mut usize, lit: &[u8]) -> Result<(), Sniff> {
    for (k, &want) in lit.iter().enumerate() {
        match p.get(*at + k) {
            None => return Err(Sniff::NeedMore),
            Some(&got) if got != want => return Err(Sniff::Unknown),
            Some(_) => {}
        }
    }
    *at += lit.len();
    Ok(())
}

/// Whether some continuation of `partial` could equal one of `candidates`.
fn could_be(partial: &[u8], candidates: &[[u8; 4]]) -> bool {
    candidates.iter().any(|c| c.starts_with(partial))
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 with prior knowledge

/// The client connection preface of HTTP/2 with prior knowledge (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/2 with prior knowledge (cleartext h2, as gRPC uses it): the fixed preface.
fn http2(p: &[u8]) -> Sniff {
    if p.starts_with(H2_PREFACE) {
        Sniff::Known(Sniffed::new(Protocol::Http2))
    } else if H2_PREFACE.starts_with(p) {
        Sniff::NeedMore
    } else {
        Sniff::Unknown
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.x

/// The request methods the sniffer accepts. httparse takes any token as a method; a real method
/// followed by a space is what makes a stream look like HTTP in the first place.
const METHODS: [&[u8]; 9] = [
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];

/// Header slots tried first; a request with more headers is parsed again with one slot per line.
const USUAL_HEADERS: usize = 64;

/// HTTP/1.0 and 1.1 requests, decided once the whole header block has arrived (the Host header and
/// an `Upgrade` can come anywhere in it).
fn http1(p: &[u8]) -> Sniff {
    let mut method_seen = false;
    let mut may_be_method = false;
    for method in METHODS {
        if p.len() > method.len() {
            if p.starts_with(method) && p[method.len()] == b' ' {
                method_seen = true;
                break;
            }
        } else if method.starts_with(p) {
            may_be_method = true;
        }
    }
    if !method_seen {
        return if may_be_method {
            Sniff::NeedMore
        } else {
            Sniff::Unknown
        };
    }
    let mut usual = [httparse::EMPTY_HEADER; USUAL_HEADERS];
    match parse_http_head(p, &mut usual) {
        Err(httparse::Error::TooManyHeaders) => {
            // Every header takes a line, so this many slots are enough.
            let lines = p.iter().filter(|&&b| b == b'\n').count();
            let mut many = vec![httparse::EMPTY_HEADER; lines];
            match parse_http_head(p, &mut many) {
                Ok(sniff) => sniff,
                Err(_) => Sniff::Unknown,
            }
        }
        Ok(sniff) => sniff,
        Err(_) => Sniff::Unknown,
    }
}

/// Parses the request head in `p` into `slots`; httparse answers `Partial` for any prefix of a
/// valid head and fails at the first byte that cannot belong to one, which is exactly the
/// NeedMore/Unknown split.
fn parse_http_head<'a>(
    p: &'a [u8],
    slots: &mut [httparse::Header<'a>],
) -> Result<Sniff, httparse::Error> {
    let mut request = httparse::Request::new(slots);
    if request.parse(p)?.is_partial() {
        return Ok(Sniff::NeedMore);
    }
    let method = request.method.unwrap_or_default();
    let target = request.path.unwrap_or_default();

    let mut sniffed = Sniffed::new(Protocol::Http);
    let mut host_header = None;
    for header in request.headers.iter() {
        let name = header.name.to_ascii_lowercase();
        let value = String::from_utf8_lossy(header.value).trim().to_string();
        if name == "host" && host_header.is_none() {
            host_header = Some(value.clone());
        }
        sniffed
            .headers
            .entry(name)
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert(value);
    }

    // The request target's forms (RFC 9112 §3.2).
    let mut target_host = None;
    if method == "CONNECT" {
        target_host = Some(authority_host(target));
    } else if let Some((_scheme, rest)) = target.split_once("://") {
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        target_host = Some(authority_host(&rest[..end]));
        sniffed.path = match &rest[end..] {
            "" => "/".to_string(),
            path if path.starts_with('/') => path.to_string(),
            query => format!("/{query}"),
        };
    } else {
        sniffed.path = target.to_string();
    }
    sniffed.host = match target_host {
        Some(host) => host,
        None => host_header.as_deref().and_then(authority_host),
    };

    let has_token = |name: &str, token: &str| {
        sniffed.headers.get(name).is_some_and(|value| {
            value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    };
    if has_token("upgrade", "websocket") && has_token("connection", "upgrade") {
        sniffed.protocol = Protocol::Websocket;
    }
    Ok(Sniff::Known(sniffed))
}

/// The host of an authority (`[user@]host[:port]`, the `Host` header's and a proxy target's form):
/// without port and brackets, lower case; None when there is none or it is not well formed.
fn authority_host(authority: &str) -> Option<String> {
    let authority = authority.trim();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let is_port = |s: &str| s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = authority.strip_prefix('[') {
        let (literal, after) = rest.split_once(']')?;
        let port_ok = after.is_empty() || after.strip_prefix(':').is_some_and(is_port);
        let literal_ok = literal.contains(':')
            && literal
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        return (port_ok && literal_ok).then(|| literal.to_ascii_lowercase());
    }
    let host = match authority.split_once(':') {
        Some((host, port)) if is_port(port) => host,
        Some(_) => return None,
        None => authority,
    };
    host_name(host.as_bytes())
}

/// `name` as a routing key: lower case, no trailing root dot; None when empty, too long or holding
/// anything but letters, digits, `-`, `_` and `.`.
fn host_name(name: &[u8]) -> Option<String> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    valid.then(|| String::from_utf8_lossy(name).to_ascii_lowercase())
}

// ---------------------------------------------------------------------------------------------
// Redis

/// The commands an inline (telnet-style) Redis request may start with. Inline requests are plain
/// text, so only a known first word makes one; these are what a person or a health check types.
const REDIS_INLINE: [&str; 10] = [
    "PING", "AUTH", "HELLO", "SELECT", "GET", "SET", "INFO", "QUIT", "CLIENT", "COMMAND",
];

/// Most digits accepted in a RESP count or length.
const RESP_DIGITS: usize = 7;

/// Longest command name accepted in a RESP request (real ones are at most ~25 bytes).
const RESP_MAX_COMMAND: usize = 64;

/// Redis: a RESP array of bulk strings (what every client library sends) or an inline command.
fn redis(p: &[u8]) -> Sniff {
    if p[0] == b'*' {
        redis_resp(p)
    } else {
        redis_inline(p)
    }
}

/// `*<n>\r\n$<len>\r\n<command>\r\n...`: decided once the first bulk string, the command name, is
/// complete.
fn redis_resp(p: &[u8]) -> Sniff {
    let mut at = 1;
    let count = step!(resp_number(p, &mut at));
    if count == 0 {
        return Sniff::Unknown;
    }
    step!(expect(p, &mut at, b"$"));
    let len = step!(resp_number(p, &mut at));
    if !(1..=RESP_MAX_COMMAND).contains(&len) {
        return Sniff::Unknown;
    }
    let name = &p[at..p.len().min(at + len)];
    let name_byte = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'|');
    if !name.iter().all(name_byte) {
        return Sniff::Unknown;
    }
    if name.len() < len {
        return Sniff::NeedMore;
    }
    at += len;
    step!(expect(p, &mut at, b"\r\n"));
    let mut sniffed = Sniffed::new(Protocol::Redis);
    sniffed.headers.insert(
        "command".to_string(),
        String::from_utf8_lossy(name).to_ascii_uppercase(),
    );
    Sniff::Known(sniffed)
}

/// A RESP decimal and its `\r\n`, starting at `*at`.
fn resp_number(p: &[u8], at: &mut usize) -> Result<usize, Sniff> {
    let start = *at;
    while p.get(*at).is_some_and(u8::is_ascii_digit) {
        *at += 1;
        if *at - start > RESP_DIGITS {
            return Err(Sniff::Unknown);
        }
    }
    if *at == p.len() {
        return Err(Sniff::NeedMore);
    }
    if *at == start {
        return Err(Sniff::Unknown);
    }
    let digits = &p[start..*at];
    expect(p, at, b"\r\n")?;
    Ok(digits
        .iter()
        .fold(0, |n, &d| n * 10 + usize::from(d - b'0')))
}

/// A line of text whose first word is a known command, decided at its end. Redis accepts a bare
/// `\n` as well as `\r\n`, and so does this. A line ending in an `HTTP/x.y` word is an HTTP
/// request line (`GET / HTTP/1.1`), left to the HTTP sniffer.
fn redis_inline(p: &[u8]) -> Sniff {
    let word_end = p
        .iter()
        .position(|&b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'));
    let word = &p[..word_end.unwrap_or(p.len())];
    let Some(word_end) = word_end else {
        let may_be = REDIS_INLINE.iter().any(|c| {
            c.len() >= word.len() && c.as_bytes()[..word.len()].eq_ignore_ascii_case(word)
        });
        return if may_be {
            Sniff::NeedMore
        } else {
            Sniff::Unknown
        };
    };
    let Some(command) = REDIS_INLINE
        .iter()
        .find(|c| c.as_bytes().eq_ignore_ascii_case(word))
    else {
        return Sniff::Unknown;
    };
    let rest = &p[word_end..];
    let line_end = rest.iter().position(|&b| b == b'\n');
    let line = &rest[..line_end.unwrap_or(rest.len())];
    let body = match (line_end, line.split_last()) {
        (Some(_), Some((b'\r', body))) => body,
        // Still open: a `\r` may be the start of the line ending.
        (None, Some((b'\r', body))) => body,
        _ => line,
    };
    if body.iter().any(|&b| b.is_ascii_control() && b != b'\t') {
        return Sniff::Unknown;
    }
    if line_end.is_none() {
        return Sniff::NeedMore;
    }
    let last_word = body
        .split(|&b| b == b' ' || b == b'\t')
        .rfind(|w| !w.is_empty());
    if last_word.is_some_and(|w| w.starts_with(b"HTTP/")) {
        return Sniff::Unknown;
    }
    let mut sniffed = Sniffed::new(Protocol::Redis);
    sniffed
        .headers
        .insert("command".to_string(), command.to_string());
    Sniff::Known(sniffed)
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// StartupMessage protocol version 3.0 (196608); any 3.x minor version is accepted, since newer
/// clients (protocol 3.2) send one and servers negotiate it down.
const PG_PROTOCOL_3: [u8; 2] = [0, 3];
const PG_SSL_REQUEST: [u8; 4] = 80_877_103u32.to_be_bytes();
const PG_GSSENC_REQUEST: [u8; 4] = 80_877_104u32.to_be_bytes();
const PG_CANCEL_REQUEST: [u8; 4] = 80_877_102u32.to_be_bytes();

/// The length bounds of a client's first message (libpq and the server cap startup packets at
/// 10000 bytes).
const PG_LENGTH: std::ops::RangeInclusive<u32> = 8..=10_000;

/// PostgreSQL's untyped first message: Int32 length (itself included), Int32 code, then the body.
/// SSLRequest, GSSENCRequest and CancelRequest are decided from the header; a StartupMessage
/// waits for its whole body to read the parameters.
fn postgres(p: &[u8]) -> Sniff {
    // The length is at most 10000, so its first two bytes are zero.
    if p.iter().take(2).any(|&b| b != 0) {
        return Sniff::Unknown;
    }
    let Some(len) = p.get(..4) else {
        return Sniff::NeedMore;
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
    if !PG_LENGTH.contains(&len) {
        return Sniff::Unknown;
    }
    let code = &p[4..p.len().min(8)];
    let startup = code.iter().zip(PG_PROTOCOL_3).all(|(&a, b)| a == b);
    let special = [PG_SSL_REQUEST, PG_GSSENC_REQUEST, PG_CANCEL_REQUEST];
    if !startup && !could_be(code, &special) {
        return Sniff::Unknown;
    }
    if code.len() < 4 {
        return Sniff::NeedMore;
    }
    let decided = match code {
        c if c == PG_SSL_REQUEST || c == PG_GSSENC_REQUEST => len == 8,
        // Process id and secret key; protocol 3.2 allows keys of up to 256 bytes.
        c if c == PG_CANCEL_REQUEST => (16..=8 + 4 + 256).contains(&len),
        _ => {
            let len = len as usize;
            if len < 9 {
                return Sniff::Unknown;
            }
            let Some(message) = p.get(..len) else {
                return Sniff::NeedMore;
            };
            return match startup_parameters(&message[8..]) {
                Some(headers) => Sniff::Known(Sniffed {
                    headers,
                    ..Sniffed::new(Protocol::Postgres)
                }),
                None => Sniff::Unknown,
            };
        }
    };
    if decided {
        Sniff::Known(Sniffed::new(Protocol::Postgres))
    } else {
        Sniff::Unknown
    }
}

/// A StartupMessage body: `name\0value\0` pairs ending in a lone `\0` that is its last byte. Any
/// other shape is not a StartupMessage (a message libpq sends always has this one).
fn startup_parameters(mut body: &[u8]) -> Option<BTreeMap<String, String>> {
    let mut parameters = BTreeMap::new();
    loop {
        match body {
            [0] => return Some(parameters),
            [0, ..] | [] => return None,
            _ => {}
        }
        let name_end = body.iter().position(|&b| b == 0)?;
        let name = &body[..name_end];
        let rest = &body[name_end + 1..];
        let value_end = rest.iter().position(|&b| b == 0)?;
        parameters.insert(
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(&rest[..value_end]).into_owned(),
        );
        body = &rest[value_end + 1..];
    }
}

// ---------------------------------------------------------------------------------------------
// MongoDB

/// OP_MSG (every current driver), OP_QUERY (the legacy `isMaster` handshake), OP_COMPRESSED.
const MONGO_OPCODES: [[u8; 4]; 3] = [
    2013u32.to_le_bytes(),
    2004u32.to_le_bytes(),
    2012u32.to_le_bytes(),
];

/// The bounds of a message's length (the server's maxMessageSizeBytes is 48 000 000).
const MONGO_LENGTH: std::ops::RangeInclusive<u32> = 16..=48_000_000;

/// MongoDB's wire header, little-endian: messageLength, requestID, responseTo (0 in a request),
/// opCode. Decided from the 16 header bytes.
fn mongodb(p: &[u8]) -> Sniff {
    if let Some(len) = p.get(..4) {
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
        if !MONGO_LENGTH.contains(&len) {
            return Sniff::Unknown;
        }
    }
    if p.iter().skip(8).take(4).any(|&b| b != 0) {
        return Sniff::Unknown;
    }
    if p.len() > 12 && !could_be(&p[12..p.len().min(16)], &MONGO_OPCODES) {
        return Sniff::Unknown;
    }
    if p.len() < 16 {
        Sniff::NeedMore
    } else {
        Sniff::Known(Sniffed::new(Protocol::Mongodb))
    }
}

// ---------------------------------------------------------------------------------------------
// TLS

/// Largest TLSPlaintext fragment (RFC 8446 §5.1).
const TLS_MAX_RECORD: usize = 1 << 14;

/// Smallest first record accepted: the handshake header and the ClientHello's version. (A client
/// that splits its ClientHello into tinier records, as some anti-censorship tools do, is Unknown.)
/// Checking the client version's first byte (3) also keeps a ClientHello from passing as a
/// MongoDB header, whose responseTo is zero there.
const TLS_MIN_RECORD: usize = 6;

/// TLS, from the record that carries the ClientHello:
///
/// ```text
/// record:     type u8 = 22 (handshake) | version u16 = 0x0300..=0x0304 | length u16 | fragment
/// handshake:  msg_type u8 = 1 (client_hello) | length u24 | body
/// body:       client_version u16 (0x03xx) | random [32] | session_id <0..32> (u8 length)
///             | cipher_suites (u16 length) | compression_methods (u8 length)
///             | extensions (u16 length, optional): { type u16 | data (u16 length) }*
/// server_name extension (type 0) data:
///             server_name_list (u16 length): { name_type u8 (0 = host_name) | name (u16 length) }*
/// ```
///
/// Waits for the whole first record, or for [`MAX_SNIFF`] bytes when the record is longer. Once
/// the record header, the handshake type and the client version are right, the answer is Https;
/// the host is whatever the server_name extension says if it lies within the bytes seen, else
/// None (a ClientHello spread over several records, or longer than MAX_SNIFF, or with lengths that
/// do not add up).
fn tls(p: &[u8]) -> Sniff {
    // Header bytes as far as they have arrived: position, allowed values.
    let valid = |at: usize, ok: &dyn Fn(u8) -> bool| p.get(at).is_none_or(|&b| ok(b));
    let header_ok = valid(0, &|b| b == 0x16)
        && valid(1, &|b| b == 3)
        && valid(2, &|b| b <= 4)
        && valid(3, &|b| usize::from(b) << 8 <= TLS_MAX_RECORD)
        && valid(5, &|b| b == 1)
        && valid(9, &|b| b == 3)
        && valid(10, &|b| b <= 4);
    if !header_ok {
        return Sniff::Unknown;
    }
    let Some(&[hi, lo]) = p.get(3..5) else {
        return Sniff::NeedMore;
    };
    let record_len = usize::from(u16::from_be_bytes([hi, lo]));
    if !(TLS_MIN_RECORD..=TLS_MAX_RECORD).contains(&record_len) {
        return Sniff::Unknown;
    }
    let record_end = 5 + record_len;
    if p.len() < record_end.min(MAX_SNIFF) {
        return Sniff::NeedMore;
    }
    let fragment = &p[5..record_end.min(p.len())];
    let handshake_len =
        usize::from(fragment[1]) << 16 | usize::from(fragment[2]) << 8 | usize::from(fragment[3]);
    let body = &fragment[4..fragment.len().min(4 + handshake_len)];
    Sniff::Known(Sniffed {
        host: client_hello_sni(body),
        ..Sniffed::new(Protocol::Https)
    })
}

/// The host_name in a ClientHello body (possibly cut short), if it can be read whole.
fn client_hello_sni(body: &[u8]) -> Option<String> {
    let mut hello = Reader(body);
    hello.take(2 + 32)?;
    let session_id = hello.vec8()?;
    if session_id.len() > 32 {
        return None;
    }
    hello.vec16()?;
    hello.vec8()?;
    // What arrived of the extensions, when the block is longer than what is here.
    let extensions_len = hello.u16()?;
    let mut extensions = Reader(&hello.0[..hello.0.len().min(extensions_len)]);
    while let (Some(kind), Some(data)) = (extensions.u16(), extensions.vec16()) {
        if kind != 0 {
            continue;
        }
        let mut list = Reader(data);
        let mut names = Reader(list.vec16()?);
        while let (Some(name_type), Some(name)) = (names.u8(), names.vec16()) {
            if name_type == 0 {
                return host_name(name);
            }
        }
        return None;
    }
    None
}

/// Reads big-endian integers and length-prefixed vectors; None when the bytes run out.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<usize> {
        let b = self.take(2)?;
        Some(usize::from(b[0]) << 8 | usize::from(b[1]))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

// ---------------------------------------------------------------------------------------------
// RTMP

/// C0 (the version byte) and C1 (1536 bytes of time, zero/version and random data).
const RTMP_C0_C1: usize = 1 + 1536;

/// RTMP: C0 is 3 (plain) or 6 (RTMPE), then C1. One version byte is weak evidence, so nothing is
/// decided before the whole of C1 has arrived, which a real client sends at once.
fn rtmp(p: &[u8]) -> Sniff {
    if !matches!(p[0], 0x03 | 0x06) {
        Sniff::Unknown
    } else if p.len() < RTMP_C0_C1 {
        Sniff::NeedMore
    } else {
        Sniff::Known(Sniffed::new(Protocol::Rtmp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello: `openssl s_client -connect 127.0.0.1:PORT -servername db.example.com`
    /// (OpenSSL 3.0.19) against a socket that dumped the first bytes it received.
    const OPENSSL_HELLO_SNI: &str = "\
        160301013b0100013703030863da3a542cceef533c204121543ebae8753e0c91d06778999ebe39df72ec9e\
        20561d4b2931d494e5c6bd8b102454865fc4d4369e83bd97397352fc2c42032607003e130213031301c02c\
        c030009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d00\
        9c003d003c0035002f00ff010000b000000013001100000e64622e6578616d706c652e636f6d000b000403\
        000102000a00160014001d0017001e0019001801000101010201030104002300000016000000170000000d\
        002a0028040305030603080708080809080a080b080408050806040105010601030303010302040205020602\
        002b0009080304030303020301002d00020101003300260024001d002054533eda33c7d6d880174291c0ff\
        ba5698a785e6b99f811847dd0bcca03b1637";

    /// The same client with `-noservername`: no server_name extension.
    const OPENSSL_HELLO_NO_SNI: &str = "\
        1603010124010001200303bff66938287ee20dfe6f8ce6338d494f3c23052280ea6b8e61e211fcc29dbaeb\
        207e721a50c54b31d377f8a46d56da989f171b560e837174c25c2f1e28e8ac9e24003e130213031301c02c\
        c030009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d00\
        9c003d003c0035002f00ff01000099000b000403000102000a00160014001d0017001e0019001801000101\
        010201030104002300000016000000170000000d002a0028040305030603080708080809080a080b080408\
        050806040105010601030303010302040205020602002b0009080304030303020301002d00020101003300\
        260024001d0020635c885b232b385cbfff9986911a92fe4774dfcea49cceb1085bcf38f8371b56";

    /// Captured from curl 7.88.1 (`curl http://db.example.com:47015/api/v1/items?limit=10`).
    const CURL_GET: &[u8] = b"GET /api/v1/items?limit=10 HTTP/1.1\r\n\
        Host: db.example.com:47015\r\n\
        User-Agent: curl/7.88.1\r\n\
        Accept: */*\r\n\r\n";

    /// Captured from curl 7.88.1 (`curl -H 'Content-Type: application/json' -d ...`).
    const CURL_POST_HEAD: &[u8] = b"POST /v1/modules HTTP/1.1\r\n\
        Host: 127.0.0.1:47016\r\n\
        User-Agent: curl/7.88.1\r\n\
        Accept: */*\r\n\
        Content-Type: application/json\r\n\
        Content-Length: 16\r\n\r\n";
    const CURL_POST_BODY: &[u8] = b"{\"name\":\"lodge\"}";

    /// The opening handshake of RFC 6455 §1.2.
    const WEBSOCKET: &[u8] = b"GET /chat HTTP/1.1\r\n\
        Host: server.example.com\r\n\
        Upgrade: websocket\r\n\
        Connection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Origin: http://example.com\r\n\
        Sec-WebSocket-Protocol: chat, superchat\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    /// Captured from psql 15 (`psql "host=... user=alice dbname=orders sslmode=disable
    /// application_name=psql"`).
    const PSQL_STARTUP: &[u8] = b"\x00\x00\x00\x3a\x00\x03\x00\x00user\x00alice\x00\
        database\x00orders\x00application_name\x00psql\x00\x00";

    /// Captured from psql 15 with `sslmode=require`.
    const PSQL_SSL_REQUEST: &[u8] = b"\x00\x00\x00\x08\x04\xd2\x16\x2f";

    /// OP_MSG `{hello: 1, helloOk: true, $db: "admin"}`, requestID 1.
    const MONGO_OP_MSG_HELLO: &[u8] = b"\x3e\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\
        \xdd\x07\x00\x00\x00\x00\x00\x00\x00\x29\x00\x00\x00\x10hello\x00\x01\x00\x00\x00\
        \x08helloOk\x00\x01\x02$db\x00\x06\x00\x00\x00admin\x00\x00";

    /// OP_QUERY `{isMaster: 1}` on `admin.$cmd` (the legacy driver handshake), requestID 7.
    const MONGO_OP_QUERY_ISMASTER: &[u8] = b"\x3a\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00\
        \xd4\x07\x00\x00\x00\x00\x00\x00admin.$cmd\x00\x00\x00\x00\x00\xff\xff\xff\xff\
        \x13\x00\x00\x00\x10isMaster\x00\x01\x00\x00\x00\x00";

    fn hex(s: &str) -> Vec<u8> {
        let s: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        s.chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    fn known(
        protocol: Protocol,
        host: Option<&str>,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Sniff {
        Sniff::Known(Sniffed {
            protocol,
            host: host.map(str::to_string),
            path: path.to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    fn redis_command(command: &str) -> Sniff {
        known(Protocol::Redis, None, "", &[("command", command)])
    }

    /// An RTMP C0+C1 as a client sends it: version, 4 bytes of time, 4 zero bytes, random bytes.
    fn rtmp_c0_c1(version: u8) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(1935);
        let mut c = vec![version, 0, 0, 0x1f, 0x40, 0, 0, 0, 0];
        c.extend((0..1528).map(|_| rng.u8(..)));
        assert_eq!(c.len(), 1537);
        c
    }

    /// A TLS 1.3-style ClientHello handshake message with an optional server_name and a padding
    /// extension of `padding` bytes (before or after the server_name).
    fn client_hello(sni: Option<&str>, padding: usize, sni_last: bool) -> Vec<u8> {
        let mut server_name = Vec::new();
        if let Some(name) = sni {
            let name = name.as_bytes();
            let entry_len = 1 + 2 + name.len();
            server_name.extend(0u16.to_be_bytes());
            server_name.extend(((2 + entry_len) as u16).to_be_bytes());
            server_name.extend((entry_len as u16).to_be_bytes());
            server_name.push(0);
            server_name.extend((name.len() as u16).to_be_bytes());
            server_name.extend(name);
        }
        let mut pad = Vec::new();
        if padding > 0 {
            pad.extend(21u16.to_be_bytes());
            pad.extend((padding as u16).to_be_bytes());
            pad.resize(4 + padding, 0);
        }
        let extensions = if sni_last {
            [pad, server_name].concat()
        } else {
            [server_name, pad].concat()
        };
        let mut body = vec![3, 3];
        body.extend([0x5a; 32]);
        body.push(32);
        body.extend([0xa5; 32]);
        body.extend([0, 2, 0x13, 0x01]);
        body.extend([1, 0]);
        body.extend((extensions.len() as u16).to_be_bytes());
        body.extend(extensions);
        let mut handshake = vec![1];
        handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend(body);
        handshake
    }

    /// `handshake` framed into TLS records of at most `max` bytes each.
    fn records(handshake: &[u8], max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for fragment in handshake.chunks(max) {
            out.extend([0x16, 3, 1]);
            out.extend((fragment.len() as u16).to_be_bytes());
            out.extend(fragment);
        }
        out
    }

    /// Checks the incremental contract on every prefix of `stream`: once Unknown always Unknown,
    /// once Known always the same Known. Returns the answers.
    fn check_stream(stream: &[u8]) -> Vec<Sniff> {
        let answers: Vec<Sniff> = (0..=stream.len()).map(|k| sniff(&stream[..k])).collect();
        assert_eq!(answers[0], Sniff::NeedMore);
        for k in 1..answers.len() {
            let (before, now) = (&answers[k - 1], &answers[k]);
            if *before != Sniff::NeedMore {
                let start = &stream[..stream.len().min(64)];
                assert_eq!(
                    before, now,
                    "answer changed at {k} bytes of {start:02x?}..."
                );
            }
        }
        answers
    }

    /// `sample` answers NeedMore for every prefix shorter than `decide_at` and `want` from there
    /// on, also with more bytes after it.
    fn assert_decides(sample: &[u8], decide_at: usize, want: &Sniff) {
        assert!(matches!(want, Sniff::Known(_)));
        let answers = check_stream(sample);
        for (k, answer) in answers.iter().enumerate() {
            if k < decide_at {
                assert_eq!(*answer, Sniff::NeedMore, "prefix of {k} bytes");
            } else {
                assert_eq!(answer, want, "prefix of {k} bytes");
            }
        }
        let mut longer = sample.to_vec();
        longer.extend(b"\r\n\x00\xff trailing bytes");
        assert_eq!(sniff(&longer), *want);
    }

    /// The valid samples with the length at which each is decided and the answer.
    fn samples() -> Vec<(&'static str, Vec<u8>, usize, Sniff)> {
        let sni = hex(OPENSSL_HELLO_SNI);
        let no_sni = hex(OPENSSL_HELLO_NO_SNI);
        let mut h2 = H2_PREFACE.to_vec();
        // The client's first SETTINGS frame (SETTINGS_MAX_CONCURRENT_STREAMS = 100).
        h2.extend(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64");
        let post = [CURL_POST_HEAD, CURL_POST_BODY].concat();
        let set = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n".to_vec();
        vec![
            (
                "curl GET",
                CURL_GET.to_vec(),
                CURL_GET.len(),
                known(
                    Protocol::Http,
                    Some("db.example.com"),
                    "/api/v1/items?limit=10",
                    &[
                        ("host", "db.example.com:47015"),
                        ("user-agent", "curl/7.88.1"),
                        ("accept", "*/*"),
                    ],
                ),
            ),
            (
                "curl POST",
                post,
                CURL_POST_HEAD.len(),
                known(
                    Protocol::Http,
                    Some("127.0.0.1"),
                    "/v1/modules",
                    &[
                        ("host", "127.0.0.1:47016"),
                        ("user-agent", "curl/7.88.1"),
                        ("accept", "*/*"),
                        ("content-type", "application/json"),
                        ("content-length", "16"),
                    ],
                ),
            ),
            (
                "websocket",
                WEBSOCKET.to_vec(),
                WEBSOCKET.len(),
                known(
                    Protocol::Websocket,
                    Some("server.example.com"),
                    "/chat",
                    &[
                        ("host", "server.example.com"),
                        ("upgrade", "websocket"),
                        ("connection", "Upgrade"),
                        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                        ("origin", "http://example.com"),
                        ("sec-websocket-protocol", "chat, superchat"),
                        ("sec-websocket-version", "13"),
                    ],
                ),
            ),
            ("h2", h2, 24, known(Protocol::Http2, None, "", &[])),
            (
                "tls sni",
                sni.clone(),
                sni.len(),
                known(Protocol::Https, Some("db.example.com"), "", &[]),
            ),
            (
                "tls no sni",
                no_sni.clone(),
                no_sni.len(),
                known(Protocol::Https, None, "", &[]),
            ),
            (
                "psql startup",
                PSQL_STARTUP.to_vec(),
                PSQL_STARTUP.len(),
                known(
                    Protocol::Postgres,
                    None,
                    "",
                    &[
                        ("user", "alice"),
                        ("database", "orders"),
                        ("application_name", "psql"),
                    ],
                ),
            ),
            (
                "psql ssl request",
                PSQL_SSL_REQUEST.to_vec(),
                8,
                known(Protocol::Postgres, None, "", &[]),
            ),
            (
                "mongo op_msg",
                MONGO_OP_MSG_HELLO.to_vec(),
                16,
                known(Protocol::Mongodb, None, "", &[]),
            ),
            (
                "mongo op_query",
                MONGO_OP_QUERY_ISMASTER.to_vec(),
                16,
                known(Protocol::Mongodb, None, "", &[]),
            ),
            (
                "redis-cli ping",
                b"*1\r\n$4\r\nPING\r\n".to_vec(),
                14,
                redis_command("PING"),
            ),
            ("redis-cli set", set, 13, redis_command("SET")),
            (
                "inline ping",
                b"PING\r\n".to_vec(),
                6,
                redis_command("PING"),
            ),
            (
                "inline set",
                b"set k v\r\n".to_vec(),
                9,
                redis_command("SET"),
            ),
            (
                "rtmp",
                rtmp_c0_c1(3),
                1537,
                known(Protocol::Rtmp, None, "", &[]),
            ),
            (
                "rtmpe",
                rtmp_c0_c1(6),
                1537,
                known(Protocol::Rtmp, None, "", &[]),
            ),
        ]
    }

    #[test]
    fn samples_decide_exactly_when_complete() {
        for (name, bytes, decide_at, want) in samples() {
            println!("{name}");
            assert_decides(&bytes, decide_at, &want);
        }
    }

    #[test]
    fn empty_prefix_needs_more() {
        assert_eq!(sniff(b""), Sniff::NeedMore);
    }

    #[test]
    fn http_host_forms() {
        let host = |request: &[u8]| match sniff(request) {
            Sniff::Known(s) => s.host,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            host(b"GET / HTTP/1.1\r\nHost: Example.COM\r\n\r\n").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            host(b"GET / HTTP/1.1\r\nHost: [2001:DB8::1]:8443\r\n\r\n").as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(
            host(b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n").as_deref(),
            Some("::1")
        );
        assert_eq!(
            host(b"GET / HTTP/1.0\r\nHost: example.com.:80\r\n\r\n").as_deref(),
            Some("example.com")
        );
        assert_eq!(host(b"GET / HTTP/1.0\r\n\r\n"), None);
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n"), None);
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n"), None);
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: a:b:c\r\n\r\n"), None);
    }

    #[test]
    fn http_targets_and_repeated_headers() {
        assert_eq!(
            sniff(
                b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nAccept: text/html\r\n\
                  accept: */*\r\n\r\n"
            ),
            known(
                Protocol::Http,
                Some("example.com"),
                "/a?b=1",
                &[("host", "example.com"), ("accept", "text/html, */*")],
            )
        );
        // Absolute form: the target's host wins over the Host header.
        assert_eq!(
            sniff(b"GET http://Proxy.Example.com:8080?x=1 HTTP/1.1\r\nHost: other\r\n\r\n"),
            known(
                Protocol::Http,
                Some("proxy.example.com"),
                "/?x=1",
                &[("host", "other")],
            )
        );
        assert_eq!(
            sniff(b"CONNECT db.example.com:443 HTTP/1.1\r\nHost: db.example.com:443\r\n\r\n"),
            known(
                Protocol::Http,
                Some("db.example.com"),
                "",
                &[("host", "db.example.com:443")],
            )
        );
        assert_eq!(
            sniff(b"OPTIONS * HTTP/1.1\r\n\r\n"),
            known(Protocol::Http, None, "*", &[])
        );
    }

    #[test]
    fn websocket_needs_both_upgrade_and_connection() {
        let protocol = |request: &[u8]| match sniff(request) {
            Sniff::Known(s) => s.protocol,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            protocol(
                b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n\
                  Upgrade: WebSocket\r\n\r\n"
            ),
            Protocol::Websocket
        );
        assert_eq!(
            protocol(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"),
            Protocol::Http
        );
        assert_eq!(
            protocol(b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"),
            Protocol::Http
        );
    }

    #[test]
    fn many_headers_are_all_read() {
        let mut request = b"GET / HTTP/1.1\r\nHost: many.example\r\n".to_vec();
        for n in 0..200 {
            request.extend(format!("X-H{n}: {n}\r\n").as_bytes());
        }
        request.extend(b"\r\n");
        let Sniff::Known(s) = sniff(&request) else {
            panic!("not known");
        };
        assert_eq!(s.headers.len(), 201);
        assert_eq!(s.headers["x-h199"], "199");
        assert_eq!(s.host.as_deref(), Some("many.example"));
    }

    #[test]
    fn malformed_http_is_unknown() {
        for garbage in [
            &b"GETS / HTTP/1.1\r\n\r\n"[..],
            b"GET /\x01 HTTP/1.1\r\n",
            b"GET / HTTP/9.9\r\n",
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            b"get / HTTP/1.1\r\n\r\n",
            b"POSTX",
            b"PUT\r\n",
        ] {
            assert_eq!(sniff(garbage), Sniff::Unknown, "{garbage:?}");
            check_stream(garbage);
        }
        // A request line is not a Redis inline GET.
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniff::NeedMore);
    }

    #[test]
    fn undecided_http_header_past_max_sniff_is_unknown() {
        let mut request = b"GET / HTTP/1.1\r\nHost: big.example\r\nX-Big: ".to_vec();
        request.resize(MAX_SNIFF + 100, b'a');
        for k in (1..MAX_SNIFF).step_by(997).chain([MAX_SNIFF - 1]) {
            assert_eq!(sniff(&request[..k]), Sniff::NeedMore, "{k} bytes");
        }
        assert_eq!(sniff(&request[..MAX_SNIFF]), Sniff::Unknown);
        assert_eq!(sniff(&request), Sniff::Unknown);
        // The end of the head past MAX_SNIFF is not looked at.
        request.extend(b"\r\n\r\n");
        assert_eq!(sniff(&request), Sniff::Unknown);
    }

    #[test]
    fn h2_preface_prefixes() {
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r"), Sniff::NeedMore);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nXX"), Sniff::Unknown);
        assert_eq!(sniff(b"PRIX"), Sniff::Unknown);
    }

    #[test]
    fn tls_sni_is_lower_cased() {
        let hello = records(&client_hello(Some("DB.Example.COM"), 0, false), 1 << 14);
        assert_decides(
            &hello,
            hello.len(),
            &known(Protocol::Https, Some("db.example.com"), "", &[]),
        );
    }

    #[test]
    fn tls_client_hello_over_several_records() {
        let real = hex(OPENSSL_HELLO_SNI);
        let handshake = &real[5..];
        // The first record ends before the server_name extension: no host.
        let split = records(handshake, 40);
        assert_decides(&split, 45, &known(Protocol::Https, None, "", &[]));
        // The first record holds the server_name extension: host.
        let split = records(handshake, handshake.len() - 10);
        assert_decides(
            &split,
            5 + handshake.len() - 10,
            &known(Protocol::Https, Some("db.example.com"), "", &[]),
        );
    }

    #[test]
    fn tls_client_hello_longer_than_max_sniff() {
        // A full-size first record (16384 bytes + header) ends past MAX_SNIFF: decided at
        // MAX_SNIFF with what is there.
        let early = records(
            &client_hello(Some("big.example.com"), 20_000, false),
            1 << 14,
        );
        assert_eq!(early[3..5], [0x40, 0x00]);
        assert_decides(
            &early[..MAX_SNIFF + 500],
            MAX_SNIFF,
            &known(Protocol::Https, Some("big.example.com"), "", &[]),
        );
        let late = records(
            &client_hello(Some("big.example.com"), 20_000, true),
            1 << 14,
        );
        assert_eq!(
            sniff(&late[..MAX_SNIFF - 1]),
            Sniff::NeedMore,
            "waits for MAX_SNIFF"
        );
        assert_eq!(sniff(&late), known(Protocol::Https, None, "", &[]));
    }

    #[test]
    fn tls_bad_inner_lengths_are_https_without_host() {
        let mut hello = hex(OPENSSL_HELLO_SNI);
        // The session id length (after the record and handshake headers, version, random).
        assert_eq!(hello[5 + 4 + 2 + 32], 32);
        hello[5 + 4 + 2 + 32] = 0xff;
        assert_eq!(sniff(&hello), known(Protocol::Https, None, "", &[]));
        let mut hello = hex(OPENSSL_HELLO_SNI);
        // The handshake length claims more than the record: the rest is in the next record.
        hello[6] = 0x7f;
        assert_eq!(
            sniff(&hello),
            known(Protocol::Https, Some("db.example.com"), "", &[])
        );
    }

    #[test]
    fn tls_bad_record_header_is_unknown() {
        let real = hex(OPENSSL_HELLO_SNI);
        let with = |at: usize, value: u8| {
            let mut hello = real.clone();
            hello[at] = value;
            hello
        };
        assert_eq!(sniff(&with(2, 5)), Sniff::Unknown, "record version");
        assert_eq!(sniff(&with(1, 2)), Sniff::Unknown, "record version");
        assert_eq!(
            sniff(&with(3, 0x41)[..4]),
            Sniff::Unknown,
            "record too long"
        );
        assert_eq!(
            sniff(&[0x16, 3, 1, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            Sniff::Unknown,
            "empty record"
        );
        assert_eq!(sniff(&with(5, 2)), Sniff::Unknown, "ServerHello");
        assert_eq!(sniff(&with(9, 0)), Sniff::Unknown, "client version");
    }

    #[test]
    fn postgres_messages() {
        let cancel = b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x30\x39\x12\x34\x56\x78";
        assert_decides(cancel, 8, &known(Protocol::Postgres, None, "", &[]));
        let gss = b"\x00\x00\x00\x08\x04\xd2\x16\x30";
        assert_decides(gss, 8, &known(Protocol::Postgres, None, "", &[]));
        // Protocol 3.2 (PostgreSQL 18 clients that ask for it).
        let v32 = b"\x00\x00\x00\x12\x00\x03\x00\x02user\x00bob\x00\x00";
        assert_decides(
            v32,
            v32.len(),
            &known(Protocol::Postgres, None, "", &[("user", "bob")]),
        );
        for bad in [
            &b"\x00\x00\x30\x00\x00\x03\x00\x00"[..], // 12288 > 10000
            b"\x00\x00\x00\x07\x00\x03\x00\x00",      // < 8
            b"\x00\x00\x00\x09\x04\xd2\x16\x2f",      // SSLRequest of 9 bytes
            b"\x00\x00\x00\x0c\x00\x02\x00\x00",      // protocol 2.0
            b"\x00\x00\x00\x0e\x00\x03\x00\x00user\x00x", // no terminators
            b"\x00\x00\x00\x0a\x00\x03\x00\x00\x00\x00", // empty parameter name
        ] {
            // Bytes that no MongoDB header has (responseTo is 0), so that only PostgreSQL decides.
            let bad = [bad, &[0xff; 8]].concat();
            assert_eq!(sniff(&bad), Sniff::Unknown, "{bad:02x?}");
            check_stream(&bad);
        }
    }

    #[test]
    fn mongodb_headers() {
        let mut reply = MONGO_OP_MSG_HELLO.to_vec();
        reply[8] = 1; // responseTo: a server's reply, not a client's request
        assert_eq!(sniff(&reply), Sniff::Unknown);
        let mut op = MONGO_OP_MSG_HELLO.to_vec();
        op[12] = 0xda; // opCode 2010 (OP_COMMAND, gone)
        assert_eq!(sniff(&op), Sniff::Unknown);
        let mut short = MONGO_OP_MSG_HELLO.to_vec();
        short[..4].copy_from_slice(&15u32.to_le_bytes());
        assert_eq!(sniff(&short), Sniff::Unknown);
        let compressed = b"\x30\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\xdc\x07\x00\x00";
        assert_decides(compressed, 16, &known(Protocol::Mongodb, None, "", &[]));
    }

    #[test]
    fn redis_requests() {
        assert_decides(
            b"*2\r\n$4\r\nauth\r\n$6\r\nsecret\r\n",
            14,
            &redis_command("AUTH"),
        );
        assert_decides(b"PING\n", 5, &redis_command("PING"));
        assert_decides(b"hello 3\r\n", 9, &redis_command("HELLO"));
        for bad in [
            &b"*0\r\n"[..],
            b"*1\r\n:4\r\n",
            b"*1\r\n$0\r\n\r\n",
            b"*1\r\n$4\r\nPI G\r\n",
            b"*1\r\n$4\r\nPINGX",
            b"*12345678\r\n",
            b"*x\r\n",
            b"HELO example.com\r\n",
            b"PING\x00\r\n",
            b"PING\rX",
        ] {
            assert_eq!(sniff(bad), Sniff::Unknown, "{bad:?}");
            check_stream(bad);
        }
    }

    #[test]
    fn rtmp_waits_for_c1() {
        let c = rtmp_c0_c1(3);
        assert_eq!(sniff(&c[..1536]), Sniff::NeedMore);
        assert_eq!(sniff(&[0x03]), Sniff::NeedMore);
        assert_eq!(sniff(&[0x04, 0, 0, 0x10]), Sniff::Unknown);
    }

    #[test]
    fn zeros_are_unknown() {
        assert_eq!(sniff(&[0; 4]), Sniff::Unknown);
        assert_eq!(sniff(&[0; 32]), Sniff::Unknown);
        check_stream(&[0; 32]);
        // Two zero bytes are how every PostgreSQL message starts: not decidable yet.
        assert_eq!(sniff(b"\x00\x00"), Sniff::NeedMore);
        // Nor are any three bytes: they can start a MongoDB message length (little-endian).
        assert_eq!(sniff(b"\xff\xfe\xfd"), Sniff::NeedMore);
        assert_eq!(sniff(b"\xff\xfe\xfd\xfc"), Sniff::Unknown);
    }

    #[test]
    fn overlaps_keep_the_first_answer() {
        // A MongoDB header whose length starts with the RTMP version byte: MongoDB from 16
        // bytes on, also once 1537 bytes would make it RTMP.
        let mut mongo =
            b"\x03\x01\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00\xdd\x07\x00\x00".to_vec();
        mongo.resize(2000, 0x41);
        assert_decides(&mongo, 16, &known(Protocol::Mongodb, None, "", &[]));
        // A PostgreSQL CancelRequest of 256 bytes that also passes as a MongoDB header:
        // PostgreSQL from 8 bytes on.
        let cancel = b"\x00\x00\x01\x00\x04\xd2\x16\x2e\x00\x00\x00\x00\xdd\x07\x00\x00";
        assert_decides(cancel, 8, &known(Protocol::Postgres, None, "", &[]));
    }

    #[test]
    fn random_bytes_never_panic_and_keep_the_contract() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        for _ in 0..3000 {
            let len = rng.usize(..200);
            let bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            check_stream(&bytes);
        }
        // Random text-ish bytes reach further into the text parsers.
        let alphabet = b"GETPOSINaeg*$0123456789 /:\r\n\t.HTTP/1";
        for _ in 0..3000 {
            let len = rng.usize(..120);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            check_stream(&bytes);
        }
    }

    #[test]
    fn mutated_samples_never_panic_and_keep_the_contract() {
        let mut rng = fastrand::Rng::with_seed(42);
        for (_, sample, _, _) in samples() {
            let rounds = if sample.len() > 1000 { 5 } else { 60 };
            for _ in 0..rounds {
                let mut bytes = sample.clone();
                for _ in 0..rng.usize(1..4) {
                    let at = rng.usize(..bytes.len());
                    match rng.u8(..3) {
                        0 => bytes[at] = rng.u8(..),
                        1 => bytes[at] ^= 1 << rng.u8(..8),
                        _ => bytes.truncate(at.max(1)),
                    }
                }
                check_stream(&bytes);
            }
        }
    }
}
