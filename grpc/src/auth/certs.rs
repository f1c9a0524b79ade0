//! Client certificates as identities: with mutual TLS on, a certificate the client CA signed
//! names its holder (the subject's common name, then its DNS, e-mail and URI alternative names),
//! and `auth.certificate_roles` gives that name roles, as etcd and Kubernetes map a certificate's
//! CN to a user. A certificate whose names map to nothing is an identity without roles.

use std::collections::HashMap;

use tonic::Status;
use x509_parser::extensions::GeneralName;

use super::caller::{Caller, Via};
use super::roles::{Role, Roles};

/// Roles and key prefixes by certificate name (`auth.certificate_roles`,
/// `auth.certificate_prefixes`).
#[derive(Clone, Debug, Default)]
pub struct CertificateRoles {
    by_name: HashMap<String, Grant>,
}

/// What a name is given: roles, and the key prefixes its KV roles are limited to.
type Grant = (Roles, Option<Vec<Vec<u8>>>);

impl CertificateRoles {
    /// Parses `NAME=ROLE ROLE ...` entries and `NAME=PREFIX PREFIX ...` entries; an error is
    /// `(key[i], why)`.
    pub fn parse(roles: &[String], prefixes: &[String]) -> Result<Self, (String, String)> {
        let mut by_name: HashMap<String, Grant> = HashMap::new();
        for (i, entry) in roles.iter().enumerate() {
            let key = format!("auth.certificate_roles[{i}]");
            let (name, list) = split(entry)
                .ok_or_else(|| (key.clone(), format!("{entry:?} is not NAME=ROLE [ROLE...]")))?;
            let mut set = Roles::NONE;
            for r in list.split_whitespace() {
                set.insert(Role::parse(r).ok_or_else(|| {
                    (
                        key.clone(),
                        format!("{r:?} is not a role; roles: {}", role_list()),
                    )
                })?);
            }
            by_name.entry(name.to_string()).or_default().0 = set;
        }
        for (i, entry) in prefixes.iter().enumerate() {
            let key = format!("auth.certificate_prefixes[{i}]");
            let (name, list) = split(entry).ok_or_else(|| {
                (
                    key.clone(),
                    format!("{entry:?} is not NAME=PREFIX [PREFIX...]"),
                )
            })?;
            let Some(slot) = by_name.get_mut(name) else {
                return Err((
                    key,
                    format!("{name:?} has no entry in auth.certificate_roles"),
                ));
            };
            slot.1 = Some(
                list.split_whitespace()
                    .map(|p| p.as_bytes().to_vec())
                    .collect(),
            );
        }
        Ok(Self { by_name })
    }

    /// The caller holding the certificate `der` (already verified by TLS against the client CA).
    pub fn caller(&self, der: &[u8]) -> Result<Caller, Status> {
        let names = names(der).map_err(|why| {
            Status::unauthenticated(format!("client certificate: cannot read its names: {why}"))
        })?;
        let Some(first) = names.first() else {
            return Err(Status::unauthenticated(
                "client certificate: it names nobody (no subject CN and no alternative names)",
            ));
        };
        let found = names
            .iter()
            .find_map(|n| self.by_name.get(n).map(|r| (n, r)));
        Ok(match found {
            Some((name, (roles, prefixes))) => Caller::user(
                name.clone(),
                Via::Certificate,
                *roles,
                prefixes.clone(),
                None,
            ),
            None => Caller::user(first.clone(), Via::Certificate, Roles::NONE, None, None),
        })
    }
}

fn split(entry: &str) -> Option<(&str, &str)> {
    let (name, rest) = entry.split_once('=')?;
    let name = name.trim();
    (!name.is_empty()).then_some((name, rest.trim()))
}

fn role_list() -> String {
    Role::ALL.map(Role::as_str).join(", ")
}

/// The certificate's names: subject common names first, then alternative names.
pub fn names(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut out: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(String::from))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                    out.push(s.to_string())
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: Option<&str>, sans: &[&str]) -> Vec<u8> {
        let mut p =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn map() -> CertificateRoles {
        CertificateRoles::parse(
            &["alice=kv-read kv-write".into(), "ops.example=admin".into()],
            &["alice=app/ cfg/".into()],
        )
        .unwrap()
    }

    #[test]
    fn a_certificate_is_known_by_its_cn_or_an_alternative_name() {
        let alice = map().caller(&cert(Some("alice"), &[])).unwrap();
        assert_eq!(alice.subject, "alice");
        assert!(alice.has(Role::KvWrite) && !alice.has(Role::Admin));
        assert!(alice
            .require_keys(Role::KvWrite, b"cfg/x", false, "key")
            .is_ok());
        assert!(alice
            .require_keys(Role::KvWrite, b"other", false, "key")
            .is_err());
        let ops = map()
            .caller(&cert(Some("someone"), &["ops.example"]))
            .unwrap();
        assert_eq!(ops.subject, "ops.example");
        assert!(ops.has(Role::ClusterOperator));
        let nobody = map().caller(&cert(Some("mallory"), &[])).unwrap();
        assert_eq!(nobody.subject, "mallory");
        assert!(!nobody.has(Role::Observer));
        let e = map().caller(&cert(None, &[])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert_eq!(
            map().caller(b"garbage").unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn bad_entries_name_the_key() {
        let e = CertificateRoles::parse(&["alice".into()], &[]).unwrap_err();
        assert_eq!(e.0, "auth.certificate_roles[0]");
        let e = CertificateRoles::parse(&["a=kv-read".into(), "b=root".into()], &[]).unwrap_err();
        assert_eq!(e.0, "auth.certificate_roles[1]");
        assert!(e.1.contains("\"root\" is not a role"), "{}", e.1);
        let e = CertificateRoles::parse(&[], &["bob=app/".into()]).unwrap_err();
        assert_eq!(e.0, "auth.certificate_prefixes[0]");
    }
}
