//! Who may call what: one authentication layer in front of every service ([`layer`]), the role
//! each RPC needs ([`roles`]), the identities it accepts (bearer JWTs, [`jwt`]; client
//! certificates, [`certs`]; members on the peer port), and the audit log ([`audit`]).
//! `docs/security.md` describes it for operators.

pub mod audit;
pub mod caller;
pub mod certs;
pub mod jwt;
pub mod layer;
pub mod roles;

pub use caller::{Caller, Via, INTERNAL_PREFIX};
pub use jwt::{mint_hs256, AuthSettings, Authenticator, Claims};
pub use layer::{AuthLayer, Gatekeeper, Port};
pub use roles::{Role, Roles};
