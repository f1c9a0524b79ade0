//! Client-provided values inside error messages: quoted, escaped and cut short.
//!
//! A status message travels in the `grpc-message` header, percent-encoded, and clients refuse a
//! header block past a few KiB: an error that repeats a 20 KB path whole reaches its caller as
//! RESOURCE_EXHAUSTED ("header list too large") instead of the error itself. So every value a
//! client sent that an error message repeats goes through [`echo`] (or [`echo_bytes`]), and the
//! server caps whatever status message still comes out too long (`lodge_grpc::status_limit`).

/// How many characters of a client's value an error message repeats.
pub const ECHO_CHARS: usize = 64;

/// `s` for an error message: double-quoted and escaped like a Rust string (`{:?}`: quotes,
/// backslashes and control characters escaped), at most `max_chars` characters of it. A longer
/// value is cut on a character boundary and followed by `… (N bytes)`, N its whole length.
pub fn excerpt(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &s[..cut], s.len()),
    }
}

/// [`excerpt`] of [`ECHO_CHARS`] characters: how error messages show a client's value.
pub fn echo(s: &str) -> String {
    excerpt(s, ECHO_CHARS)
}

/// Bytes (a key of the store) for an error message: [`echo`] when they are UTF-8, otherwise
/// `b"..."` with other than printable ASCII escaped (`\xff`), cut after [`ECHO_CHARS`] bytes the
/// same way.
pub fn echo_bytes(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => echo(s),
        Err(_) => {
            let shown = &b[..b.len().min(ECHO_CHARS)];
            let mut out = format!("b\"{}\"", shown.escape_ascii());
            if shown.len() < b.len() {
                out.push_str(&format!("… ({} bytes)", b.len()));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_quoted_and_escaped_whole() {
        assert_eq!(echo("/api"), "\"/api\"");
        assert_eq!(echo(""), "\"\"");
        assert_eq!(echo("a\"b\\c"), r#""a\"b\\c""#);
        // Control characters never reach a log line or a terminal raw.
        assert_eq!(echo("a\nb\r\t\u{1b}[2J\0"), r#""a\nb\r\t\u{1b}[2J\0""#);
        assert_eq!(
            echo(&"x".repeat(ECHO_CHARS)),
            format!("\"{}\"", "x".repeat(64))
        );
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary_with_their_length() {
        let long = "/".repeat(20_000);
        assert_eq!(
            echo(&long),
            format!("\"{}\"… (20000 bytes)", "/".repeat(64))
        );
        // Multi-byte characters: 64 characters are kept whole, whatever their width in bytes.
        let e = "é".repeat(100); // 2 bytes each
        assert_eq!(echo(&e), format!("\"{}\"… (200 bytes)", "é".repeat(64)));
        let mixed = format!("{}€😀", "a".repeat(63)); // the cut falls after the 3-byte €
        assert_eq!(
            excerpt(&mixed, 64),
            format!("\"{}€\"… ({} bytes)", "a".repeat(63), 63 + 3 + 4)
        );
        assert_eq!(excerpt("😀😀", 1), "\"😀\"… (8 bytes)");
        assert_eq!(excerpt("abc", 0), "\"\"… (3 bytes)");
        // Escaping happens after the cut: an escaped character counts once.
        let ctl = "\n".repeat(70);
        assert_eq!(echo(&ctl), format!("\"{}\"… (70 bytes)", "\\n".repeat(64)));
    }

    #[test]
    fn bytes_are_shown_as_text_when_they_are_utf8_and_escaped_otherwise() {
        assert_eq!(echo_bytes(b"key/1"), "\"key/1\"");
        assert_eq!(echo_bytes(b"k\xffey"), r#"b"k\xffey""#);
        let long = vec![0xffu8; 100];
        assert_eq!(
            echo_bytes(&long),
            format!("b\"{}\"… (100 bytes)", "\\xff".repeat(64))
        );
    }
}
