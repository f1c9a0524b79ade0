//! The replicated cluster: raft-rs driven by an actor, a durable log, and the state machine.

pub mod client;
pub mod disk;
pub mod fault;
pub mod force;
pub mod keys;
pub mod kv;
pub mod lease;
pub mod log;
pub mod members;
pub mod raft;
pub mod store;
pub mod topology;
pub mod transport;
pub mod watch;

#[cfg(test)]
mod tests;
