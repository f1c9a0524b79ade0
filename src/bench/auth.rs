//! Auth on, for the benches that measure its cost (`kv`, `heartbeat`): a fresh HS256 secret,
//! the environment that turns `[auth]` on with it, and tokens as a client would hold them.

use lodge_grpc::auth::{mint_hs256, Claims, Role};

use super::Outcome;

/// A secret in a temporary file, removed on drop.
pub(super) struct BenchAuth {
    _dir: tempfile::TempDir,
    path: String,
    secret: Vec<u8>,
}

impl BenchAuth {
    /// A new random secret.
    pub(super) fn new() -> Outcome<Self> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let secret: Vec<u8> = (0..48).map(|_| fastrand::alphanumeric() as u8).collect();
        let path = dir.path().join("secret");
        std::fs::write(&path, &secret).map_err(|e| e.to_string())?;
        Ok(Self {
            path: path.display().to_string(),
            _dir: dir,
            secret,
        })
    }

    /// `LODGE_*` settings that turn auth on with this secret.
    pub(super) fn env(&self) -> [(&str, &str); 2] {
        [
            ("LODGE_AUTH__ENABLED", "true"),
            ("LODGE_AUTH__HS256_SECRET_FILE", self.path.as_str()),
        ]
    }

    /// A token with `roles`, valid for a day, limited to keys under `prefix` if given.
    pub(super) fn token(&self, roles: &[Role], prefix: Option<&str>) -> Outcome<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs();
        mint_hs256(
            &self.secret,
            &Claims {
                sub: "bench".into(),
                exp: now + 86_400,
                aud: vec!["lodge".into()],
                iss: None,
                roles: roles.iter().map(|r| r.as_str().to_string()).collect(),
                workflows: None,
                prefixes: prefix.map(|p| vec![p.to_string()]),
                instances: None,
            },
        )
    }
}
