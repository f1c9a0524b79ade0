//! `lodge token`: mints a token signed with the node's HS256 secret (`auth.hs256_secret_file`),
//! for development, scripts and tests. Production tokens come from the organisation's identity
//! provider (RS256/ES256) with the same claims (docs/security.md).

use std::path::PathBuf;

use lodge_grpc::auth::{mint_hs256, Claims, Role};

/// Arguments of `lodge token`.
#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// File holding the HS256 secret (as `auth.hs256_secret_file`; a trailing newline is
    /// ignored).
    #[arg(long)]
    pub secret_file: PathBuf,
    /// Roles, comma-separated (docs/security.md lists them): observer, kv-read, kv-write,
    /// cluster-operator, registry-client, module, balancer-operator, admin, exec, port-forward,
    /// rsync, agent.
    #[arg(long, value_delimiter = ',', required = true)]
    pub roles: Vec<String>,
    /// Limit the KV roles to keys under these prefixes (repeatable or comma-separated); default:
    /// every key but the node's own (/lodge/).
    #[arg(long = "prefix", value_delimiter = ',')]
    pub prefixes: Vec<String>,
    /// The balancer instances a module token may act as (comma-separated); default: the one
    /// named by --subject.
    #[arg(long, value_delimiter = ',')]
    pub instances: Vec<String>,
    /// Limit the token to these workflow ids (comma-separated); default: any.
    #[arg(long, value_delimiter = ',')]
    pub workflows: Vec<String>,
    /// `sub`: who the token is for.
    #[arg(long, default_value = "developer")]
    pub subject: String,
    /// `aud` (the node's `auth.audience`).
    #[arg(long, default_value = "lodge")]
    pub audience: String,
    /// Lifetime: seconds, or a number with s, m, h or d (e.g. 90s, 30m, 12h, 7d).
    #[arg(long, default_value = "1h", value_parser = parse_ttl, conflicts_with = "ttl_secs")]
    pub ttl: u64,
    /// Lifetime in seconds (as --ttl).
    #[arg(long)]
    pub ttl_secs: Option<u64>,
}

/// Seconds in `s`: a number with an optional unit (s, m, h, d).
fn parse_ttl(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = digits.parse().map_err(|_| {
        format!("{s:?}: expected a number of seconds, or a number with s, m, h or d")
    })?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    match n.checked_mul(scale) {
        Some(0) | None => Err(format!("{s:?}: must be between 1 second and 2^64 seconds")),
        Some(secs) => Ok(secs),
    }
}

/// Prints a token on stdout.
pub fn run(args: TokenArgs) -> i32 {
    match mint(&args) {
        Ok(t) => {
            println!("{t}");
            0
        }
        Err(e) => {
            eprintln!("lodge token: {e}");
            2
        }
    }
}

fn mint(args: &TokenArgs) -> Result<String, String> {
    let mut secret = std::fs::read(&args.secret_file)
        .map_err(|e| format!("--secret-file {}: {e}", args.secret_file.display()))?;
    while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
        secret.pop();
    }
    if secret.len() < 32 {
        return Err(format!(
            "--secret-file {}: {} bytes; the node wants at least 32",
            args.secret_file.display(),
            secret.len()
        ));
    }
    for r in &args.roles {
        if Role::parse(r).is_none() {
            let all: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
            return Err(format!("--roles: {r:?} is not one of {}", all.join(", ")));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let claims = Claims {
        sub: args.subject.clone(),
        exp: now.saturating_add(args.ttl_secs.unwrap_or(args.ttl)),
        aud: vec![args.audience.clone()],
        iss: None,
        roles: args.roles.clone(),
        workflows: (!args.workflows.is_empty()).then(|| args.workflows.clone()),
        prefixes: (!args.prefixes.is_empty()).then(|| args.prefixes.clone()),
        instances: (!args.instances.is_empty()).then(|| args.instances.clone()),
    };
    mint_hs256(&secret, &claims)
}

#[cfg(test)]
mod tests {
    use super::parse_ttl;

    #[test]
    fn ttls_take_units_and_refuse_nonsense() {
        for (given, secs) in [
            ("90", 90),
            ("90s", 90),
            ("30m", 1800),
            ("12h", 43_200),
            ("7d", 604_800),
        ] {
            assert_eq!(parse_ttl(given), Ok(secs), "{given}");
        }
        for bad in ["", "h", "0", "10y", "-5", "1.5h", "99999999999999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
