//! Code that only tests use, kept out of the crates the `lodge` binary is built from.
//!
//! - [`history`]: the linearizability checker for recorded key-value histories
//!   (`tests/linearizability.rs`).

pub mod history;
