//! The caller's deadline, from the `grpc-timeout` header.

use std::time::Duration;

use lodge_actors::SendError;
use tonic::{Request, Status};

/// The budget for the actor call: the request's `grpc-timeout`, capped by `default` (the server's
/// own per-request timeout), less a small margin. tonic enforces the same deadline from the moment
/// the request arrived and would answer CANCELLED; finishing a little earlier lets the caller get
/// the DEADLINE_EXCEEDED it should.
pub fn of<T>(req: &Request<T>, default: Duration) -> Duration {
    let d = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse)
        .map_or(default, |d| d.min(default));
    d.saturating_sub((d / 20).min(Duration::from_millis(50)))
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Maps a failed actor send onto the status a caller should see.
pub fn send_status(e: SendError, actor: &str) -> Status {
    match e {
        SendError::Timeout => Status::deadline_exceeded(format!("{actor}: {e}")),
        SendError::Full => Status::resource_exhausted(format!("{actor}: {e}")),
        SendError::NotRunning | SendError::Closed => Status::unavailable(format!("{actor}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units_parse_and_cap_at_the_default() {
        assert_eq!(parse("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("5x"), None);
        assert_eq!(parse("S"), None);
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("grpc-timeout", "100m".parse().unwrap());
        assert_eq!(of(&req, Duration::from_secs(30)), Duration::from_millis(95));
        req.metadata_mut()
            .insert("grpc-timeout", "1H".parse().unwrap());
        assert_eq!(
            of(&req, Duration::from_secs(30)),
            Duration::from_millis(29_950)
        );
    }
}
