//! `lodge bench`: each figure is measured beside its baseline in the same run, repeated, and
//! reported as a median (these machines are shared and noisy). Results go to docs/benchmarks.md.

mod actors;
mod auth;
mod balancer;
mod disk;
mod heartbeat;
mod kv;
mod memory;
mod net;
mod tunnel;
mod workflows;

use std::time::Duration;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum Bench {
    /// Actor runtime: messaging throughput, memory per actor, ListActors latency.
    Actors {
        /// Tiny sizes, one round: checks the bench runs to its end (the test suite runs this).
        #[arg(long)]
        smoke: bool,
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
        /// Tiny sizes, one round: checks the bench runs to its end (the test suite runs this).
        #[arg(long)]
        smoke: bool,
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
        /// Tiny sizes, one round: checks the bench runs to its end (the test suite runs this).
        #[arg(long)]
        smoke: bool,
        #[arg(long, default_value_t = 2000)]
        appends: usize,
        #[arg(long, default_value_t = 256)]
        bytes: usize,
    },
    /// Client heartbeats per second on one node beside a bare tonic server answering the same
    /// RPC; then the memory of a node holding many registrations.
    Heartbeat {
        /// Tiny sizes, one round: checks the bench runs to its end (the test suite runs this).
        #[arg(long)]
        smoke: bool,
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
        /// Tiny sizes, one round: checks the bench runs to its end (the test suite runs this).
        #[arg(long)]
        smoke: bool,
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
        /// Tiny sizes, one round: checks the bench runs to its end (the test suite runs this).
        #[arg(long)]
        smoke: bool,
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
    /// Replicated workflows on a 3-member cluster: runbooks of 3 steps started and completed per
    /// second beside KV puts; a step record's latency beside a put's (both server-side); the
    /// time from `kill -9` of a workflow's owner to its next step on a survivor.
    Workflows {
        /// Tiny sizes, one round: checks the bench runs to its end (the test suite runs this).
        #[arg(long)]
        smoke: bool,
        /// Workflows in flight at once (and KV put clients beside them), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        clients: Vec<usize>,
        /// Seconds per run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Runs of each load (the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Owner kills (alternately a follower and the raft leader), each on a fresh cluster but
        /// the first (0: skip them).
        #[arg(long, default_value_t = 3)]
        failovers: usize,
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

/// Runs a bench; the exit code. A bench that cannot finish (a process that does not start, a
/// step that fails) or whose load saw failed requests prints why on stderr and exits 1: its
/// figures would not mean what they say.
pub fn run(cmd: Bench) -> i32 {
    if cmd.smoke() {
        eprintln!(
            "smoke run (--smoke): tiny sizes, one round; it checks that the bench runs to its end, \
             its figures mean nothing"
        );
    }
    let (name, result) = match cmd {
        Bench::Actors {
            smoke,
            rounds,
            messages,
            requests,
            actors,
        } => {
            let (rounds, messages, requests, actors) = if smoke {
                (1, 20_000, 200, 2_000)
            } else {
                (
                    rounds.max(1),
                    messages.max(1),
                    requests.max(1),
                    actors.max(1),
                )
            };
            ("actors", actors::run(rounds, messages, requests, actors))
        }
        Bench::Kv {
            smoke,
            clients,
            seconds,
            value_bytes,
            no_etcd,
        } => {
            let (clients, run_for) = if smoke {
                (vec![1, 4], Duration::from_millis(300))
            } else {
                let clients = clients.into_iter().map(|c| c.max(1)).collect();
                (clients, Duration::from_secs(seconds.max(1)))
            };
            let o = kv::Options {
                clients,
                run_for,
                value_bytes,
                etcd: !no_etcd,
            };
            ("kv", kv::run(&o))
        }
        Bench::Disk {
            smoke,
            appends,
            bytes,
        } => {
            let appends = if smoke { 50 } else { appends.max(10) };
            ("disk", disk::run(appends, bytes))
        }
        Bench::Heartbeat {
            smoke,
            clients,
            seconds,
            rounds,
            registrations,
        } => {
            let o = if smoke {
                heartbeat::Options {
                    clients: 4,
                    run_for: Duration::from_millis(300),
                    rounds: 1,
                    registrations: registrations.min(200),
                }
            } else {
                heartbeat::Options {
                    clients: clients.max(1),
                    run_for: Duration::from_secs(seconds.max(1)),
                    rounds: rounds.max(1),
                    registrations,
                }
            };
            ("heartbeat", heartbeat::run(&o))
        }
        Bench::Tunnel {
            smoke,
            bytes,
            rounds,
            setups,
            sessions,
        } => {
            let o = if smoke {
                tunnel::Options {
                    bytes: 4 << 20,
                    rounds: 1,
                    setups: 20,
                    sessions: sessions.min(20),
                    smoke,
                }
            } else {
                tunnel::Options {
                    bytes: bytes.max(1),
                    rounds: rounds.max(1),
                    setups: setups.max(1),
                    sessions,
                    smoke,
                }
            };
            ("tunnel", tunnel::run(&o))
        }
        Bench::Balancer {
            smoke,
            bytes,
            rounds,
            connections,
            decisions,
            concurrency,
            json,
            buffer_bytes,
        } => {
            let mut o = balancer::Options {
                bytes: bytes.max(1),
                rounds: rounds.max(1),
                connections: connections.max(1),
                decisions: decisions.max(1),
                concurrency: concurrency.max(1),
                json,
                buffer_bytes,
            };
            if smoke {
                o.bytes = 4 << 20;
                o.rounds = 1;
                o.connections = 20;
                o.decisions = 200;
                o.concurrency = 4;
            }
            ("balancer", balancer::run(&o))
        }
        Bench::Workflows {
            smoke,
            clients,
            seconds,
            rounds,
            failovers,
        } => {
            let o = if smoke {
                workflows::Options {
                    clients: vec![1, 4],
                    run_for: Duration::from_millis(300),
                    rounds: 1,
                    failovers: failovers.min(1),
                }
            } else {
                workflows::Options {
                    clients: clients.into_iter().map(|c| c.max(1)).collect(),
                    run_for: Duration::from_secs(seconds.max(1)),
                    rounds: rounds.max(1),
                    failovers,
                }
            };
            ("workflows", workflows::run(&o))
        }
        Bench::EchoServer => return heartbeat::serve_echo(),
        Bench::Memory { mode, actors } => return memory::run_child(mode, actors),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("lodge bench {name}: {e}");
            1
        }
    }
}

impl Bench {
    /// Whether `--smoke` was given.
    fn smoke(&self) -> bool {
        match self {
            Bench::Actors { smoke, .. }
            | Bench::Kv { smoke, .. }
            | Bench::Disk { smoke, .. }
            | Bench::Heartbeat { smoke, .. }
            | Bench::Tunnel { smoke, .. }
            | Bench::Balancer { smoke, .. }
            | Bench::Workflows { smoke, .. } => *smoke,
            Bench::EchoServer | Bench::Memory { .. } => false,
        }
    }
}

/// Why a bench stopped early, in one line for people.
pub(crate) type Outcome<T = ()> = Result<T, String>;

/// Runs `measure` on a 2-thread I/O runtime of its own (the clients a bench drives), then drops
/// the runtime without waiting for tasks the bench left behind.
pub(crate) fn on_io_runtime(measure: impl FnOnce(&tokio::runtime::Runtime) -> Outcome) -> Outcome {
    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let result = measure(&io);
    io.shutdown_background();
    result
}

/// Failed requests of a load: how many, and the first one's error (the rest are usually alike).
#[derive(Default, Debug)]
pub(crate) struct Failures {
    pub(crate) count: u64,
    pub(crate) first: Option<String>,
}

impl Failures {
    /// Counts one failure.
    pub(crate) fn add(&mut self, error: impl std::fmt::Display) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(error.to_string());
        }
    }

    /// Adds another tally to this one (its first error counts if this has none).
    pub(crate) fn merge(&mut self, other: Failures) {
        self.count += other.count;
        if self.first.is_none() {
            self.first = other.first;
        }
    }

    /// Err naming the count and the first error if any request of `what` failed.
    pub(crate) fn check(&self, what: &str) -> Outcome {
        match self.count {
            0 => Ok(()),
            n => Err(format!(
                "{n} {what} failed; the first: {}",
                self.first.as_deref().unwrap_or("(no message)")
            )),
        }
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
