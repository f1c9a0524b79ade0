//! Who is calling: the identity the authentication layer found, which handlers read from the
//! request's extensions (`Caller::of`) to check what only they can see (keys, owners).

use tonic::Status;

use super::roles::{Role, Roles};

/// The prefix under which the node keeps its own records (registry, router, balancer). Only the
/// node writes it, and only the node and `admin` read it.
pub const INTERNAL_PREFIX: &[u8] = b"/lodge/";

/// How a caller was identified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Auth is off (`auth.enabled = false`): every call is allowed.
    Open,
    /// A bearer JWT.
    Token,
    /// A client certificate mapped to roles by `auth.certificate_roles`.
    Certificate,
    /// Another member of the cluster, on the peer port.
    Peer,
    /// The node itself, calling a service in its own process.
    Node,
}

/// Who is calling, once authenticated.
#[derive(Clone, Debug)]
pub struct Caller {
    /// `sub` of a token, the name in a certificate; "-" when a token has none.
    pub subject: String,
    pub via: Via,
    roles: Roles,
    /// Key prefixes the caller's KV roles are limited to; `None`: every key but the node's.
    prefixes: Option<Vec<Vec<u8>>>,
    /// Router workflows the caller is limited to; `None`: any.
    workflows: Option<Vec<String>>,
    /// Balancer instances a module may act as; `None`: the one named by its subject.
    instances: Option<Vec<String>>,
}

impl Caller {
    /// A caller identified by a token or a certificate.
    pub fn user(
        subject: String,
        via: Via,
        roles: Roles,
        prefixes: Option<Vec<Vec<u8>>>,
        workflows: Option<Vec<String>>,
    ) -> Self {
        Self {
            subject,
            via,
            roles,
            prefixes,
            workflows,
            instances: None,
        }
    }

    /// Limits a module's caller to `instances` (the token's claim).
    pub fn with_instances(mut self, instances: Option<Vec<String>>) -> Self {
        self.instances = instances;
        self
    }

    /// Allows acting as balancer instance `id`: the caller's own (its subject, or one its token
    /// lists), or any for a balancer operator.
    pub fn require_instance(&self, id: &str, field: &str) -> Result<(), Status> {
        if self.is_unrestricted() || self.roles.grants(Role::BalancerOperator) {
            return Ok(());
        }
        let own = match &self.instances {
            Some(list) => list.iter().any(|i| i == id),
            None => self.subject == id,
        };
        if own {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "{field}: {} is not this module's own instance (the token's sub or instances claim names the instances it may act as)",
            lodge_actors::quote::echo(id)
        )))
    }

    /// Anyone, with auth off.
    pub fn open() -> Self {
        Self::unrestricted("anonymous", Via::Open)
    }

    /// The node itself (its own subsystems calling a service in process).
    pub fn node() -> Self {
        Self::unrestricted("node", Via::Node)
    }

    /// Member `id` of the cluster, authenticated on the peer port.
    pub fn peer(id: Option<u64>) -> Self {
        let name = id.map_or_else(|| "peer".to_string(), |id| format!("member-{id}"));
        Self::unrestricted(&name, Via::Peer)
    }

    fn unrestricted(subject: &str, via: Via) -> Self {
        Self {
            subject: subject.into(),
            via,
            roles: Roles::NONE,
            prefixes: None,
            workflows: None,
            instances: None,
        }
    }

    /// The caller a request carries; a request without one (a handler called without the layer)
    /// is the node's own.
    pub fn of(ext: &http::Extensions) -> Caller {
        ext.get::<Caller>().cloned().unwrap_or_else(Caller::node)
    }

    /// Whether every check passes (auth off, the node, a peer).
    pub fn is_unrestricted(&self) -> bool {
        matches!(self.via, Via::Open | Via::Node | Via::Peer)
    }

    /// Whether the caller holds `role`.
    pub fn has(&self, role: Role) -> bool {
        self.is_unrestricted() || self.roles.grants(role)
    }

    /// The caller's roles, for messages and the audit log.
    pub fn role_names(&self) -> Vec<&'static str> {
        self.roles.names()
    }

    /// Allows the call if the caller has `role` and, when `workflow` is given, may use it.
    pub fn require(&self, role: Role, workflow: Option<&str>) -> Result<(), Status> {
        if !self.has(role) {
            return Err(Status::permission_denied(format!(
                "this call needs the {:?} role; {} has {}",
                role.as_str(),
                self.subject,
                self.described_roles()
            )));
        }
        if let Some(w) = workflow {
            if !self.may_use(w) {
                return Err(Status::permission_denied(format!(
                    "workflow_id: the token is not valid for workflow {}",
                    lodge_actors::quote::echo(w)
                )));
            }
        }
        Ok(())
    }

    /// Whether the token may see `workflow` (no `workflows` claim: any).
    pub fn may_use(&self, workflow: &str) -> bool {
        self.is_unrestricted()
            || self
                .workflows
                .as_ref()
                .is_none_or(|allowed| allowed.iter().any(|a| a == workflow))
    }

    /// "roles a, b" or "no roles", for messages.
    pub fn described_roles(&self) -> String {
        let names = self.role_names();
        if names.is_empty() {
            "no roles".into()
        } else {
            format!("roles {}", names.join(", "))
        }
    }

    /// Allows `role` on `key`, or on every key starting with it when `prefix`. `field` names
    /// the request field in the error.
    pub fn require_keys(
        &self,
        role: Role,
        key: &[u8],
        prefix: bool,
        field: &str,
    ) -> Result<(), Status> {
        if self.is_unrestricted() {
            return Ok(());
        }
        self.require(role, None)?;
        let shown = || lodge_actors::quote::echo(&String::from_utf8_lossy(key));
        let internal =
            key.starts_with(INTERNAL_PREFIX) || (prefix && INTERNAL_PREFIX.starts_with(key));
        if internal && (role == Role::KvWrite || !self.roles.grants(Role::Admin)) {
            return Err(Status::permission_denied(format!(
                "{field}: {}{} reaches into /lodge/, which only the node itself {}",
                shown(),
                if prefix { " (a prefix)" } else { "" },
                if role == Role::KvWrite {
                    "writes"
                } else {
                    "and the admin role read"
                }
            )));
        }
        if let Some(prefixes) = &self.prefixes {
            if !prefixes.iter().any(|p| key.starts_with(p)) {
                let list: Vec<String> = prefixes
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect();
                return Err(Status::permission_denied(format!(
                    "{field}: {} is outside the prefixes the {} role is limited to ({})",
                    shown(),
                    role.as_str(),
                    list.join(", ")
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(roles: &[Role], prefixes: Option<&[&str]>) -> Caller {
        Caller::user(
            "alice".into(),
            Via::Token,
            roles.iter().copied().collect(),
            prefixes.map(|p| p.iter().map(|s| s.as_bytes().to_vec()).collect()),
            None,
        )
    }

    #[test]
    fn a_scoped_writer_stays_in_its_prefixes_and_out_of_the_nodes() {
        let c = user(&[Role::KvWrite], Some(&["app/"]));
        assert!(c
            .require_keys(Role::KvWrite, b"app/a", false, "key")
            .is_ok());
        assert!(c.require_keys(Role::KvWrite, b"app/", true, "key").is_ok());
        assert!(c.require_keys(Role::KvWrite, b"ap", true, "key").is_err());
        let e = c
            .require_keys(Role::KvWrite, b"other", false, "key")
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("outside the prefixes") && e.message().contains("app/"));
        let e = c
            .require_keys(Role::KvRead, b"app/a", false, "key")
            .unwrap_err();
        assert!(e.message().contains("kv-read"), "{}", e.message());

        let everywhere = user(&[Role::KvWrite, Role::KvRead], None);
        assert!(everywhere
            .require_keys(Role::KvWrite, b"x", false, "key")
            .is_ok());
        assert!(everywhere
            .require_keys(Role::KvRead, b"/lodge", false, "key")
            .is_ok());
        let e = everywhere
            .require_keys(Role::KvWrite, b"/lodge/router/s", false, "key")
            .unwrap_err();
        assert!(e.message().contains("/lodge/"), "{}", e.message());
        // A prefix that takes in /lodge/ (here: every key) reaches into it too.
        for p in [&b""[..], b"/", b"/lodge", b"/lodge/x"] {
            assert!(
                everywhere
                    .require_keys(Role::KvRead, p, true, "key")
                    .is_err(),
                "{p:?}"
            );
        }
        assert!(everywhere
            .require_keys(Role::KvRead, b"/lodgex", true, "key")
            .is_ok());

        let admin = user(&[Role::Admin], None);
        assert!(admin
            .require_keys(Role::KvRead, b"/lodge/", true, "key")
            .is_ok());
        assert!(admin
            .require_keys(Role::KvWrite, b"/lodge/x", false, "key")
            .is_err());
        assert!(Caller::node()
            .require_keys(Role::KvWrite, b"/lodge/x", false, "key")
            .is_ok());
    }
}
