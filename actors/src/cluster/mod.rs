//! The replicated cluster: raft-rs driven by an actor, a durable log, and the state machine.

pub mod disk;
