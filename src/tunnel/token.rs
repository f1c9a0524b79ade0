//! `lodge token`: mints a token signed with the node's HS256 secret, for development, scripts and
//! tests. Production tokens come from the organisation's identity provider (RS256/ES256).

use std::path::PathBuf;

use lodge_grpc::auth::{mint_hs256, Claims, Role};

/// Arguments of `lodge token`.
#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// File holding the HS256 secret (as `router.auth.hs256_secret_file`; a trailing newline is
    /// ignored).
    #[arg(long)]
    pub secret_file: PathBuf,
    /// Roles, comma-separated: exec, port-forward, rsync, agent, admin.
    #[arg(long, value_delimiter = ',', required = true)]
    pub roles: Vec<String>,
    /// Limit the token to these workflow ids (comma-separated); default: any.
    #[arg(long, value_delimiter = ',')]
    pub workflows: Vec<String>,
    /// `sub`: who the token is for.
    #[arg(long, default_value = "developer")]
    pub subject: String,
    /// `aud` (the node's `router.auth.audience`).
    #[arg(long, default_value = "lodge")]
    pub audience: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl_secs: u64,
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
            return Err(format!(
                "--roles: {r:?} is not one of exec, port-forward, rsync, agent, admin"
            ));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let claims = Claims {
        sub: args.subject.clone(),
        exp: now + args.ttl_secs,
        aud: vec![args.audience.clone()],
        iss: None,
        roles: args.roles.clone(),
        workflows: (!args.workflows.is_empty()).then(|| args.workflows.clone()),
    };
    mint_hs256(&secret, &claims)
}
