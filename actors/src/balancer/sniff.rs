//! Telling a connection's protocol from its first bytes.
