//! Bearer tokens: a JWT on every call, checked for signature, expiry and audience, carrying the
//! roles the caller may use.
//!
//! - HS256 with a shared secret, or RS256 / ES256 with a public key (PEM); the key decides the
//!   algorithm, and a token signed with any other algorithm is refused (no algorithm confusion).
//! - Claims: `exp` and `aud` required; `roles` (a list, or one space-separated string) from
//!   [`Role`]; optional `prefixes` (the keys the KV roles are limited to), `workflows` (the router
//!   workflows the token may use) and `instances` (the balancer instances a module token may
//!   register).
//! - No token or a bad one: UNAUTHENTICATED; a valid token without the role: PERMISSION_DENIED.
//!   Neither the token nor its claims are logged; messages name what is wrong, not the token.

use std::collections::HashMap;
use std::sync::RwLock;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;
use tonic::Status;

use super::caller::{Caller, Via};
use super::roles::{Role, Roles};

/// How bearer tokens are checked (the `[auth]` section).
#[derive(Clone, Debug, Default)]
pub struct AuthSettings {
    /// False only for local development: every call is then allowed.
    pub enabled: bool,
    /// HS256 shared secret.
    pub hs256_secret: Option<Vec<u8>>,
    /// RS256 or ES256 public key (PEM, SubjectPublicKeyInfo or PKCS#1 for RSA).
    pub public_key_pem: Option<Vec<u8>>,
    /// Required `aud`.
    pub audience: String,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
}

/// The claims Lodge reads.
#[derive(Debug, Deserialize, Serialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sub: String,
    pub exp: u64,
    /// One audience or a list (RFC 7519 allows both); the validation checks it.
    #[serde(deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, deserialize_with = "roles_list")]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflows: Option<Vec<String>>,
    /// Key prefixes the KV roles are limited to (absent: every key but the node's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefixes: Option<Vec<String>>,
    /// Balancer instances a module token may register (absent: the one named by `sub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<Vec<String>>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Aud {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Aud::deserialize(d)? {
        Aud::One(a) => vec![a],
        Aud::Many(l) => l,
    })
}

/// `roles` as a list or as one space-separated string (OAuth's `scope` style).
fn roles_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Roles {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Roles::deserialize(d)? {
        Roles::List(l) => l,
        Roles::Text(t) => t.split_whitespace().map(String::from).collect(),
    })
}

enum Mode {
    Disabled,
    Jwt {
        key: DecodingKey,
        validation: Box<Validation>,
    },
    /// Enabled with no key configured: every call is refused, with a message saying why.
    Unconfigured,
}

/// Checks the tokens of incoming calls.
pub struct Authenticator {
    mode: Mode,
    /// Tokens already verified, until they expire: a client presents the same token on every
    /// call, and checking its signature and claims each time costs more than the call's own work
    /// on the fastest RPCs (a heartbeat). Keyed by the whole token, so only the very same bytes
    /// hit; emptied when full.
    verified: RwLock<HashMap<Box<str>, Verified>>,
}

/// A verified token's caller and its `exp`.
struct Verified {
    caller: Caller,
    exp: u64,
}

/// Verified tokens kept at most (a node's distinct clients, with room to spare).
const VERIFIED_MAX: usize = 4096;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Authenticator {
    /// An authenticator for `s`; an error names the setting that is wrong.
    pub fn new(s: &AuthSettings) -> Result<Self, String> {
        if !s.enabled {
            return Ok(Self {
                mode: Mode::Disabled,
                verified: Default::default(),
            });
        }
        let (key, alg) = match (&s.hs256_secret, &s.public_key_pem) {
            (Some(_), Some(_)) => {
                return Err(
                    "auth: set either hs256_secret(_file) or public_key_file, not both".into(),
                )
            }
            (None, None) => {
                return Ok(Self {
                    mode: Mode::Unconfigured,
                    verified: Default::default(),
                })
            }
            (Some(secret), None) => {
                if secret.len() < 32 {
                    return Err(format!(
                        "auth.hs256_secret: {} bytes; use at least 32",
                        secret.len()
                    ));
                }
                (DecodingKey::from_secret(secret), Algorithm::HS256)
            }
            (None, Some(pem)) => match DecodingKey::from_rsa_pem(pem) {
                Ok(k) => (k, Algorithm::RS256),
                Err(_) => match DecodingKey::from_ec_pem(pem) {
                    Ok(k) => (k, Algorithm::ES256),
                    Err(e) => {
                        return Err(format!(
                            "auth.public_key_file: not an RSA or P-256 public key in PEM: {e}"
                        ))
                    }
                },
            },
        };
        if s.audience.is_empty() {
            return Err("auth.audience: required when auth is enabled".into());
        }
        let mut v = Validation::new(alg);
        v.set_audience(&[&s.audience]);
        v.set_required_spec_claims(&["exp", "aud"]);
        v.leeway = s.leeway_secs;
        if let Some(iss) = &s.issuer {
            v.set_issuer(&[iss]);
        }
        Ok(Self {
            mode: Mode::Jwt {
                key,
                validation: Box::new(v),
            },
            verified: Default::default(),
        })
    }

    /// Whether calls are checked at all.
    pub fn enabled(&self) -> bool {
        !matches!(self.mode, Mode::Disabled)
    }

    /// Whether a key is configured to check tokens with.
    pub fn has_key(&self) -> bool {
        matches!(self.mode, Mode::Jwt { .. })
    }

    /// The caller of a request, from its `authorization: Bearer` header.
    pub fn authenticate(&self, md: &MetadataMap) -> Result<Caller, Status> {
        self.check(md.get("authorization").map(|v| v.as_bytes()))
    }

    /// The caller presenting the `authorization` header `header`.
    pub fn authenticate_header(&self, header: &http::HeaderValue) -> Result<Caller, Status> {
        self.check(Some(header.as_bytes()))
    }

    fn check(&self, header: Option<&[u8]>) -> Result<Caller, Status> {
        let (key, validation) = match &self.mode {
            Mode::Disabled => return Ok(Caller::open()),
            Mode::Unconfigured => {
                return Err(Status::unauthenticated(
                    "this node has no auth key configured (auth.hs256_secret or auth.public_key_file), so it accepts no token",
                ))
            }
            Mode::Jwt { key, validation } => (key, validation),
        };
        let header = header.ok_or_else(|| {
            Status::unauthenticated(
                "authorization: missing: send the header \"authorization: Bearer <JWT>\"",
            )
        })?;
        let token = std::str::from_utf8(header)
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Status::unauthenticated("authorization: expected \"Bearer <JWT>\""))?;
        let now = unix_now();
        if let Some(v) = self.verified.read().unwrap().get(token) {
            // Past `exp` it is checked again in full, and refused as expired (leeway included).
            if now < v.exp {
                return Ok(v.caller.clone());
            }
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            let why = match e.kind() {
                K::ExpiredSignature => "expired".to_string(),
                K::InvalidAudience => "wrong audience (aud)".to_string(),
                K::InvalidIssuer => "wrong issuer (iss)".to_string(),
                K::InvalidSignature => "bad signature".to_string(),
                K::InvalidAlgorithm => {
                    "signed with an algorithm this node does not accept".to_string()
                }
                K::ImmatureSignature => "not valid yet (nbf)".to_string(),
                K::MissingRequiredClaim(c) => format!("missing claim {c}"),
                _ => format!("malformed ({e})"),
            };
            Status::unauthenticated(format!("authorization: token {why}"))
        })?;
        let c = data.claims;
        let exp = c.exp;
        // Unknown roles are ignored: a token may carry roles for other services.
        let roles: Roles = c.roles.iter().filter_map(|r| Role::parse(r)).collect();
        let prefixes = c
            .prefixes
            .map(|l| l.into_iter().map(String::into_bytes).collect());
        let subject = if c.sub.is_empty() { "-".into() } else { c.sub };
        let caller = Caller::user(subject, Via::Token, roles, prefixes, c.workflows)
            .with_instances(c.instances);
        let mut verified = self.verified.write().unwrap();
        if verified.len() >= VERIFIED_MAX {
            verified.clear();
        }
        verified.insert(
            token.into(),
            Verified {
                caller: caller.clone(),
                exp,
            },
        );
        Ok(caller)
    }
}

/// Signs `claims` with an HS256 secret (development tokens, tests).
pub fn mint_hs256(secret: &[u8], claims: &Claims) -> Result<String, String> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| format!("cannot sign the token: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn claims(roles: &[&str]) -> Claims {
        Claims {
            sub: "alice".into(),
            exp: now() + 600,
            aud: vec!["lodge".into()],
            iss: None,
            roles: roles.iter().map(|r| r.to_string()).collect(),
            workflows: None,
            prefixes: None,
            instances: None,
        }
    }

    fn hs() -> Authenticator {
        Authenticator::new(&AuthSettings {
            enabled: true,
            hs256_secret: Some(SECRET.to_vec()),
            audience: "lodge".into(),
            ..Default::default()
        })
        .unwrap()
    }

    fn md(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    fn code(r: Result<Caller, Status>) -> tonic::Code {
        r.err().map_or(tonic::Code::Ok, |s| s.code())
    }

    #[test]
    fn a_verified_token_is_remembered_until_it_expires() {
        let a = hs();
        let t = mint_hs256(SECRET, &claims(&["exec"])).unwrap();
        assert_eq!(a.authenticate(&md(&t)).unwrap().subject, "alice");
        assert_eq!(a.verified.read().unwrap().len(), 1);
        assert_eq!(a.authenticate(&md(&t)).unwrap().subject, "alice");
        // A remembered token past its exp is checked in full again, and refused.
        let mut old = claims(&["exec"]);
        old.exp = now() - 3600;
        let t = mint_hs256(SECRET, &old).unwrap();
        let caller = Caller::user("mallory".into(), Via::Token, Roles::NONE, None, None);
        a.verified.write().unwrap().insert(
            t.as_str().into(),
            Verified {
                caller,
                exp: old.exp,
            },
        );
        let e = a.authenticate(&md(&t)).unwrap_err();
        assert!(e.message().contains("expired"), "{}", e.message());
        // Only the very same bytes hit: a forged signature on the same claims does not.
        let good = mint_hs256(SECRET, &claims(&["admin"])).unwrap();
        a.authenticate(&md(&good)).unwrap();
        let forged = format!("{}x", good);
        assert_eq!(
            code(a.authenticate(&md(&forged))),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn a_valid_token_grants_its_roles_only() {
        let t = mint_hs256(SECRET, &claims(&["exec", "rsync"])).unwrap();
        let caller = hs().authenticate(&md(&t)).unwrap();
        assert_eq!(caller.subject, "alice");
        assert!(caller.require(Role::Exec, Some("w")).is_ok());
        let denied = caller.require(Role::PortForward, Some("w")).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("port-forward"));
    }

    #[test]
    fn missing_expired_forged_and_foreign_tokens_are_unauthenticated() {
        let a = hs();
        assert_eq!(
            code(a.authenticate(&MetadataMap::new())),
            tonic::Code::Unauthenticated
        );
        let mut expired = claims(&["exec"]);
        expired.exp = now() - 3600;
        let t = mint_hs256(SECRET, &expired).unwrap();
        let e = a.authenticate(&md(&t)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("expired"), "{}", e.message());
        assert!(
            !e.message().contains(&t),
            "a token never appears in a message"
        );
        let forged = mint_hs256(b"another secret, also 32 bytes long", &claims(&["exec"])).unwrap();
        assert_eq!(
            code(a.authenticate(&md(&forged))),
            tonic::Code::Unauthenticated
        );
        let mut other_aud = claims(&["exec"]);
        other_aud.aud = vec!["someone-else".into()];
        let t = mint_hs256(SECRET, &other_aud).unwrap();
        assert!(a
            .authenticate(&md(&t))
            .unwrap_err()
            .message()
            .contains("audience"));
        assert_eq!(
            code(a.authenticate(&md("not.a.jwt"))),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn a_workflow_list_limits_the_token() {
        let mut c = claims(&["agent"]);
        c.workflows = Some(vec!["w1".into()]);
        let t = mint_hs256(SECRET, &c).unwrap();
        let caller = hs().authenticate(&md(&t)).unwrap();
        assert!(caller.require(Role::Agent, Some("w1")).is_ok());
        assert_eq!(
            caller.require(Role::Agent, Some("w2")).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn an_audience_list_is_accepted_when_it_names_ours() {
        let mut c = claims(&["exec"]);
        c.aud = vec!["other-service".into(), "lodge".into()];
        let t = mint_hs256(SECRET, &c).unwrap();
        assert!(hs().authenticate(&md(&t)).is_ok());
    }

    #[test]
    fn roles_may_be_one_space_separated_string() {
        let json = format!(
            r#"{{"exp":{},"aud":"lodge","roles":"exec admin"}}"#,
            now() + 60
        );
        let c: Claims = serde_json::from_str(&json).unwrap();
        assert_eq!(c.roles, vec!["exec", "admin"]);
    }

    fn pem(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn signed(alg: Algorithm, key: EncodingKey) -> String {
        jsonwebtoken::encode(&Header::new(alg), &claims(&["admin"]), &key).unwrap()
    }

    #[test]
    fn public_keys_pick_rs256_or_es256_and_refuse_the_other_algorithms() {
        let settings = |key: &str| AuthSettings {
            enabled: true,
            public_key_pem: Some(pem(key)),
            audience: "lodge".into(),
            ..Default::default()
        };
        let rsa = Authenticator::new(&settings("rsa.pub.pem")).unwrap();
        let ec = Authenticator::new(&settings("ec.pub.pem")).unwrap();
        let rs_token = signed(
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(&pem("rsa.key.pem")).unwrap(),
        );
        let es_token = signed(
            Algorithm::ES256,
            EncodingKey::from_ec_pem(&pem("ec.key.pem")).unwrap(),
        );
        assert!(rsa.authenticate(&md(&rs_token)).is_ok());
        assert!(ec.authenticate(&md(&es_token)).is_ok());
        assert_eq!(
            code(rsa.authenticate(&md(&es_token))),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(ec.authenticate(&md(&rs_token))),
            tonic::Code::Unauthenticated
        );
        // An HS256 token "signed" with the public key's bytes must not pass (algorithm confusion).
        let confused = mint_hs256(&pem("rsa.pub.pem"), &claims(&["admin"])).unwrap();
        assert_eq!(
            code(rsa.authenticate(&md(&confused))),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn settings_errors_name_the_key() {
        let short = Authenticator::new(&AuthSettings {
            enabled: true,
            hs256_secret: Some(b"short".to_vec()),
            audience: "lodge".into(),
            ..Default::default()
        });
        assert!(short.err().unwrap().contains("auth.hs256_secret"));
        let unconfigured = Authenticator::new(&AuthSettings {
            enabled: true,
            ..Default::default()
        })
        .unwrap();
        let e = unconfigured.authenticate(&MetadataMap::new()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("auth.hs256_secret"));
        let off = Authenticator::new(&AuthSettings::default()).unwrap();
        assert!(off
            .authenticate(&MetadataMap::new())
            .unwrap()
            .require(Role::Admin, None)
            .is_ok());
    }
}
