//! The replicated cluster: raft-rs driven by an actor, a durable log, and the state machine.

pub mod disk;
pub mod fault;
pub mod kv;
pub mod log;
pub mod raft;
pub mod transport;

#[cfg(test)]
mod tests;
