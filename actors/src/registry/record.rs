//! What the replicated store holds for a registration, where, and the checks a request passes
//! before anything is written.
//!
//! Two keys per registration, both attached to its lease so that expiry removes both at once:
//! - `/lodge/registry/clients/<client_id>`: the [`Registration`] as JSON;
//! - `/lodge/registry/identities/<identity>`: the client id holding that identity (namespace,
//!   name, instance), so that a client registering again replaces its previous registration.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Prefix of every registration key.
pub const CLIENTS_PREFIX: &str = "/lodge/registry/clients/";
/// Prefix of every identity key.
pub const IDENTITIES_PREFIX: &str = "/lodge/registry/identities/";

/// Longest client name, namespace, version or instance id, in bytes.
pub const MAX_FIELD: usize = 256;
/// Most metadata entries, and the longest metadata value.
pub const MAX_METADATA: usize = 64;
pub const MAX_METADATA_VALUE: usize = 4096;

/// A registration as replicated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub client_id: String,
    pub client_name: String,
    pub client_version: String,
    pub namespace: String,
    pub instance_id: String,
    pub metadata: BTreeMap<String, String>,
    /// Milliseconds since the Unix epoch: the client's own time if it sent one, else the node's.
    pub registered_at_ms: i64,
    /// The heartbeat interval the registration was granted with.
    pub interval_ms: u64,
    /// The lease keeping it alive (set from the stored key, not the JSON).
    #[serde(skip)]
    pub lease: i64,
    /// The member that registered it.
    pub registered_by: u64,
    /// Who registered it (the caller's subject; "": nobody, made with auth off or before owners
    /// were recorded). A registry client may heartbeat, unregister or replace only its own
    /// registrations and nobody's.
    #[serde(default)]
    pub owner: String,
}

impl Registration {
    /// Its key in the store.
    pub fn key(&self) -> Vec<u8> {
        client_key(&self.client_id)
    }

    /// Its identity key in the store.
    pub fn identity_key(&self) -> Vec<u8> {
        identity_key(&self.namespace, &self.client_name, &self.instance_id)
    }

    /// The interval as a duration.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// Decodes a stored value; `lease` comes from the key's lease.
    pub fn decode(value: &[u8], lease: i64) -> Option<Self> {
        let mut r: Self = serde_json::from_slice(value).ok()?;
        r.lease = lease;
        Some(r)
    }

    /// The stored value.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a registration always serialises")
    }
}

/// The key of registration `client_id`.
pub fn client_key(client_id: &str) -> Vec<u8> {
    format!("{CLIENTS_PREFIX}{client_id}").into_bytes()
}

/// The client id in a registration key.
pub fn client_id_of(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key).ok()?.strip_prefix(CLIENTS_PREFIX)
}

/// The identity key of (namespace, name, instance). JSON keeps the three parts apart whatever
/// characters they hold.
pub fn identity_key(namespace: &str, name: &str, instance: &str) -> Vec<u8> {
    let parts = serde_json::to_string(&[namespace, name, instance]).expect("strings serialise");
    format!("{IDENTITIES_PREFIX}{parts}").into_bytes()
}

/// A fresh client id: 64 random bits. Uniqueness across the cluster does not rest on the
/// randomness: the registration is written only if no live registration has that key
/// (`create_revision == 0`; the id of one that ended could in principle come back, never while
/// it is in use).
pub fn new_client_id() -> String {
    format!("c-{:016x}", fastrand::u64(..))
}

/// What a client asks to register as.
#[derive(Clone, Debug, Default)]
pub struct RegisterRequest {
    pub client_name: String,
    pub client_version: String,
    pub namespace: String,
    pub instance_id: String,
    pub metadata: BTreeMap<String, String>,
    /// The client's registration time (ms since the epoch), if it sent one.
    pub registered_at_ms: Option<i64>,
    /// Who asks (recorded as the registration's owner).
    pub owner: String,
    /// Whether it may replace a registration of the same identity that someone else owns (the
    /// node, an admin, auth off).
    pub replace_any: bool,
}

impl RegisterRequest {
    /// Checks the request; the error names the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        required("client_name", &self.client_name)?;
        required("namespace", &self.namespace)?;
        bounded("client_version", &self.client_version)?;
        bounded("instance_id", &self.instance_id)?;
        if self.metadata.len() > MAX_METADATA {
            return Err(format!(
                "metadata: {} entries; at most {MAX_METADATA} are allowed",
                self.metadata.len()
            ));
        }
        for (k, v) in &self.metadata {
            if k.is_empty() || k.len() > MAX_FIELD {
                return Err(format!(
                    "metadata: key {} must be 1 to {MAX_FIELD} bytes",
                    crate::quote::echo(k)
                ));
            }
            if v.len() > MAX_METADATA_VALUE {
                return Err(format!(
                    "metadata[{}]: {} bytes; at most {MAX_METADATA_VALUE}",
                    crate::quote::echo(k),
                    v.len()
                ));
            }
        }
        Ok(())
    }
}

/// A required string field: present, bounded, no control characters.
pub fn required(field: &str, value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err(format!("{field}: required"));
    }
    bounded(field, value)
}

fn bounded(field: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_FIELD {
        return Err(format!(
            "{field}: {} bytes; at most {MAX_FIELD}",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field}: control characters are not allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> RegisterRequest {
        RegisterRequest {
            client_name: "glooscap".into(),
            namespace: "wiki".into(),
            ..Default::default()
        }
    }

    #[test]
    fn missing_fields_are_named() {
        let mut r = req();
        r.client_name.clear();
        assert_eq!(r.validate().unwrap_err(), "client_name: required");
        let mut r = req();
        r.namespace = "  ".into();
        assert_eq!(r.validate().unwrap_err(), "namespace: required");
        let mut r = req();
        r.instance_id = "a\nb".into();
        assert!(r.validate().unwrap_err().starts_with("instance_id:"));
        let mut r = req();
        r.metadata.insert(String::new(), "x".into());
        assert!(r.validate().unwrap_err().starts_with("metadata:"));
        assert!(req().validate().is_ok());
    }

    #[test]
    fn identities_with_separators_stay_apart() {
        assert_ne!(identity_key("a/b", "c", ""), identity_key("a", "b/c", ""));
        assert_ne!(identity_key("a\"", "b", ""), identity_key("a", "\"b", ""));
    }

    #[test]
    fn a_record_round_trips_with_its_lease() {
        let r = Registration {
            client_id: new_client_id(),
            client_name: "n".into(),
            client_version: "1".into(),
            namespace: "ns".into(),
            instance_id: "i".into(),
            metadata: BTreeMap::new(),
            registered_at_ms: 5,
            interval_ms: 1000,
            lease: 0,
            registered_by: 1,
            owner: "alice".into(),
        };
        let back = Registration::decode(&r.encode(), 42).unwrap();
        assert_eq!(back.lease, 42);
        assert_eq!(Registration { lease: 0, ..back }, r);
        assert_eq!(client_id_of(&r.key()), Some(r.client_id.as_str()));
        // A record stored before owners were recorded reads as owned by nobody.
        let mut old: serde_json::Value = serde_json::from_slice(&r.encode()).unwrap();
        old.as_object_mut().unwrap().remove("owner");
        let old = Registration::decode(old.to_string().as_bytes(), 1).unwrap();
        assert_eq!(old.owner, "");
    }
}
