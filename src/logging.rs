//! slog set-up: terminal or JSON lines on stderr, level from the configuration. The same logger is
//! handed to the actor runtime (and, with the cluster, to raft-rs), so everything lands in one place.

use std::str::FromStr;

use slog::{o, Drain, Level, Logger};

/// Flushes buffered records when dropped; keep it alive until the process exits.
pub type Guard = slog_async::AsyncGuard;

/// Builds the node's logger.
pub fn build(level: &str, format: &str, node_id: u64) -> (Logger, Guard) {
    build_with(level, format, o!("node" => node_id))
}

/// Builds a logger whose records all carry `values` (e.g. a module's instance id).
pub fn build_with<T>(level: &str, format: &str, values: slog::OwnedKV<T>) -> (Logger, Guard)
where
    T: slog::SendSyncRefUnwindSafeKV + 'static,
{
    let level = Level::from_str(level).unwrap_or(Level::Info);
    let (drain, guard) = if format == "json" {
        let json = slog_json::Json::new(std::io::stderr())
            .add_default_keys()
            .build()
            .fuse();
        slog_async::Async::new(json).build_with_guard()
    } else {
        let decorator = slog_term::TermDecorator::new().stderr().build();
        let term = slog_term::FullFormat::new(decorator).build().fuse();
        slog_async::Async::new(term).build_with_guard()
    };
    let drain = drain.filter_level(level).fuse();
    (Logger::root(drain, values), guard)
}

/// The audit log (`[audit]`): JSON lines, to the file at `path` (appended to) or to stdout when
/// `path` is empty. Every record is kept: the drain blocks rather than dropping one.
pub fn audit(path: &str, node_id: u64) -> Result<(Logger, Guard), String> {
    let out: Box<dyn std::io::Write + Send> = if path.is_empty() {
        Box::new(std::io::stdout())
    } else {
        Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("audit.path: cannot open {path}: {e}"))?,
        )
    };
    let json = slog_json::Json::new(out).add_default_keys().build().fuse();
    let (drain, guard) = slog_async::Async::new(json)
        .overflow_strategy(slog_async::OverflowStrategy::Block)
        .build_with_guard();
    Ok((Logger::root(drain.fuse(), o!("node" => node_id)), guard))
}
