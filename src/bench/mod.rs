//! `lodge bench`: each figure is measured beside its baseline in the same run, repeated, and
//! reported as a median (these machines are shared and noisy). Results go to docs/benchmarks.md.

mod actors;
mod balancer;
mod disk;
mod heartbeat;
mod kv;
mod memory;
mod net;
mod tunnel;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum Bench {
    /// Actor runtime: messaging throughput, memory per actor, ListActors latency.
    Actors {
        /// Repetitions of each throughput measurement (the median is reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Messages per fire-and-forget round.
        #[arg(long, default_value_t = 2_000_000)]
        messages: u64,
        /// Requests per task per request/response round (64 tasks).
        #[arg(long, default_value_t = 20_000)]
        requests: u64,
        /// Actors for the memory and ListActors figures.
        #[arg(long, default_value_t = 100_000)]
        actors: usize,
    },
    /// Replicated KV: a 3-member Lodge cluster against a 3-member etcd cluster, same load.
    Kv {
        /// Concurrent clients for the put runs, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        clients: Vec<usize>,
        /// Seconds per run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Value size in bytes.
        #[arg(long, default_value_t = 256)]
        value_bytes: usize,
        /// Skip the etcd comparison.
        #[arg(long)]
        no_etcd: bool,
    },
    /// One durable append: Lodge's write-ahead log against a plain append + fdatasync, same disk.
    Disk {
        #[arg(long, default_value_t = 2000)]
        appends: usize,
        #[arg(long, default_value_t = 256)]
        bytes: usize,
    },
    /// Client heartbeats per second on one node beside a bare tonic server answering the same
    /// RPC; then the memory of a node holding many registrations.
    Heartbeat {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Seconds per run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Runs of each server (the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Registrations for the memory figure (0: skip it).
        #[arg(long, default_value_t = 100_000)]
        registrations: usize,
    },
    /// One TCP stream through `lodge port-forward` → node → `lodge agent` → a local sink, beside
    /// the same transfer through one socat relay (default and 128 KiB blocks) and direct;
    /// session set-up time; the node's memory with many idle sessions.
    Tunnel {
        /// Bytes per transfer.
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Transfers per path (the median is reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Sequential connect → echo exchanges per path for the set-up times.
        #[arg(long, default_value_t = 500)]
        setups: usize,
        /// Idle sessions held open for the memory figure (0: skip it).
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
    },
    /// The balancer on one node: RouteRequest decisions per second beside GetNLBConfig calls;
    /// one TCP stream through the data plane → `lodge module` → a sink beside one socat relay
    /// and direct; new connections per second and their set-up time beside socat and direct.
    Balancer {
        /// Bytes per transfer.
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Repetitions of each measurement (the median is reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Sequential connect → request → answer → close per path per round.
        #[arg(long, default_value_t = 2000)]
        connections: usize,
        /// RouteRequest (and GetNLBConfig) calls per round.
        #[arg(long, default_value_t = 20_000)]
        decisions: u64,
        /// Calls in flight at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Print the figures as one JSON document on stdout (the readable report goes to
        /// stderr).
        #[arg(long)]
        json: bool,
        /// The node's `[balancer] buffer_bytes` (default: the node's default).
        #[arg(long)]
        buffer_bytes: Option<usize>,
    },
    /// The bare tonic server of `bench heartbeat` (run by it as a child process).
    #[command(hide = true)]
    EchoServer,
    /// One memory measurement in this process (run by `bench actors` in a fresh child process).
    #[command(hide = true)]
    Memory {
        #[arg(long)]
        mode: memory::Mode,
        #[arg(long)]
        actors: usize,
    },
}

pub fn run(cmd: Bench) -> i32 {
    match cmd {
        Bench::Actors {
            rounds,
            messages,
            requests,
            actors,
        } => {
            actors::run(rounds.max(1), messages, requests, actors);
            0
        }
        Bench::Kv {
            clients,
            seconds,
            value_bytes,
            no_etcd,
        } => {
            kv::run(&clients, seconds.max(1), value_bytes, !no_etcd);
            0
        }
        Bench::Disk { appends, bytes } => {
            disk::run(appends.max(10), bytes);
            0
        }
        Bench::Heartbeat {
            clients,
            seconds,
            rounds,
            registrations,
        } => {
            heartbeat::run(clients.max(1), seconds.max(1), rounds.max(1), registrations);
            0
        }
        Bench::Tunnel {
            bytes,
            rounds,
            setups,
            sessions,
        } => {
            tunnel::run(tunnel::Options {
                bytes: bytes.max(1),
                rounds: rounds.max(1),
                setups: setups.max(1),
                sessions,
            });
            0
        }
        Bench::Balancer {
            bytes,
            rounds,
            connections,
            decisions,
            concurrency,
            json,
            buffer_bytes,
        } => {
            balancer::run(balancer::Options {
                bytes: bytes.max(1),
                rounds: rounds.max(1),
                connections: connections.max(1),
                decisions: decisions.max(1),
                concurrency: concurrency.max(1),
                json,
                buffer_bytes,
            });
            0
        }
        Bench::EchoServer => heartbeat::serve_echo(),
        Bench::Memory { mode, actors } => memory::run_child(mode, actors),
    }
}

/// Resident memory of process `pid` ("self" for this one), in bytes, from `/proc/PID/statm`.
pub(crate) fn rss_of(pid: &str) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Median of a set of samples.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even_sets() {
        assert_eq!(super::median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
