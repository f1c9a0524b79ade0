//! The translation gateway's building blocks: talking to the model server and keeping markdown
//! structure out of the model's hands.
//!
//! - [`backend`]: a pooled HTTP client for an OpenAI-compatible chat-completions server.
//! - [`markdown`]: splits a document into prose chunks with placeholders for code, links and
//!   markup, and puts the translated chunks back together around the untouched parts.

pub mod backend;
pub mod markdown;

pub use backend::{Backend, BackendConfig, BackendError, Completion};
pub use markdown::{plan, system_prompt, Plan};
pub mod gateway;
