//! Small secrets: comparing them without leaking where they differ, and making new ones.

/// Whether `a` and `b` are equal, in a time that depends on their lengths only (not on where
/// they first differ), so a caller cannot guess a secret byte by byte from answer times.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Kept from being turned back into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// A new random secret of 32 bytes from the operating system's generator, as 64 hex digits.
pub fn random_token() -> String {
    use tokio_rustls::rustls::crypto::ring::default_provider;
    let mut bytes = [0u8; 32];
    default_provider()
        .secure_random
        .fill(&mut bytes)
        .expect("the operating system's random generator");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_only_when_every_byte_is() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"abc", b""));
    }

    #[test]
    fn tokens_are_64_hex_digits_and_differ() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
