//! `lodge`: the node and its command-line clients.

mod bench;
mod client;
mod cluster;
mod cluster_id;
mod config;
mod ctl;
mod exposure;
mod failover;
mod identity;
mod join;
mod kv;
mod lb;
mod logging;
mod metrics;
mod module;
mod node;
mod token;
mod translate;
mod tunnel;
mod utc;
mod workflow;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lodge",
    version,
    about = "Lodge: an actor-system runtime for gRPC cluster services"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Node(NodeArgs),
    /// Inspect and control a running node through its admin RPC.
    Ctl {
        #[command(flatten)]
        conn: ctl::Connection,
        #[command(subcommand)]
        cmd: ctl::Ctl,
    },
    /// Read and write the replicated key-value store.
    ///
    /// Keys and values are bytes. With --json, one that is not UTF-8 is given in standard base64
    /// under `key_base64` / `value_base64` instead of `key` / `value` (in a list of keys, as
    /// `{"key_base64": ...}`); as text, its bytes outside printable ASCII are escaped (`\xff`).
    Kv {
        #[command(flatten)]
        conn: ctl::Connection,
        #[command(subcommand)]
        cmd: kv::Kv,
    },
    /// Replicated workflows (lodge.workflow.v1): run a runbook, start, inspect, cancel, signal.
    Workflow {
        #[command(flatten)]
        conn: ctl::Connection,
        #[command(subcommand)]
        cmd: workflow::Workflow,
    },
    /// Cluster membership and topology.
    Cluster {
        #[command(flatten)]
        conn: ctl::Connection,
        #[command(subcommand)]
        cmd: cluster::Cluster,
    },
    /// Client registrations (lodge.registry.v1).
    Client {
        #[command(flatten)]
        conn: ctl::Connection,
        #[command(subcommand)]
        cmd: client::Client,
    },
    /// The balancer (lodge.balancer.v1): modules, routes, weights, limits, load, scaling.
    Lb {
        #[command(flatten)]
        conn: ctl::Connection,
        #[command(subcommand)]
        cmd: lb::Lb,
    },
    /// Translate a title or a markdown document (registers as a client for the job's duration).
    Translate {
        #[command(flatten)]
        conn: ctl::Connection,
        #[command(flatten)]
        args: translate::TranslateArgs,
    },
    /// Serve a workflow's sessions: exec, port-forward and rsync (lodge.router.v1).
    Agent {
        #[command(flatten)]
        conn: tunnel::TunnelConn,
        #[command(flatten)]
        args: tunnel::agent::AgentArgs,
    },
    /// Run a command on a workflow's agent; exits with the command's status.
    Exec {
        #[command(flatten)]
        conn: tunnel::TunnelConn,
        #[command(flatten)]
        args: tunnel::exec::ExecArgs,
    },
    /// Forward a local TCP or UDP port to a port on a workflow's agent.
    PortForward {
        #[command(flatten)]
        conn: tunnel::TunnelConn,
        #[command(flatten)]
        args: tunnel::port_forward::PortForwardArgs,
    },
    /// rsync to or from a workflow's agent (the remote side is written WORKFLOW:PATH).
    Rsync {
        #[command(flatten)]
        conn: tunnel::TunnelConn,
        #[command(flatten)]
        args: tunnel::rsync::RsyncArgs,
    },
    /// rsync's remote shell: `lodge rsync` passes it to rsync as `-e`; not run by hand.
    RsyncShell {
        #[command(flatten)]
        conn: tunnel::TunnelConn,
        #[command(flatten)]
        args: tunnel::rsync::RsyncShellArgs,
    },
    /// Router sessions: list, info, terminate.
    Sessions {
        #[command(flatten)]
        conn: tunnel::TunnelConn,
        #[command(subcommand)]
        cmd: tunnel::sessions::Sessions,
    },
    /// Run a balancer module that forwards every connection to one backend: it registers with
    /// the balancer (`--endpoint`), serves lodge.balancer.v1.Module, and drains on SIGTERM.
    Module {
        #[command(flatten)]
        conn: ctl::Connection,
        #[command(flatten)]
        args: module::ModuleArgs,
    },
    /// Mint a token signed with an HS256 secret (development and tests).
    Token(token::TokenArgs),
    /// Benchmarks (results go to docs/benchmarks.md).
    Bench {
        #[command(subcommand)]
        cmd: bench::Bench,
    },
}

#[derive(clap::Args)]
struct NodeArgs {
    /// TOML configuration file (on top of the embedded config/node.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Raft member id of this node.
    #[arg(long)]
    node_id: Option<u64>,
    /// gRPC listen address HOST:PORT (port 0 picks a free one).
    #[arg(long)]
    listen: Option<String>,
    /// Prometheus /metrics listen address HOST:PORT.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Directory for durable state.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log level (critical, error, warning, info, debug, trace).
    #[arg(long)]
    log_level: Option<String>,
    /// Allow mutating admin calls (restart, stop).
    #[arg(long)]
    allow_mutations: bool,
    /// First members of the cluster by their peer addresses: ID=HOST:PORT,... (must include
    /// this node's id).
    #[arg(long)]
    initial_cluster: Option<String>,
    /// Join an existing cluster through these members' peer addresses: HOST:PORT,...
    #[arg(long)]
    join: Option<String>,
    /// Address clients reach this node at (default: the bound listen address).
    #[arg(long)]
    advertise: Option<String>,
    /// Peer listen address HOST:PORT: raft and node-to-node calls (default: the listen port + 2).
    #[arg(long)]
    peer_listen: Option<String>,
    /// Peer address other members reach this node at (default: the bound peer listen address).
    #[arg(long)]
    peer_advertise: Option<String>,
    /// Start even when server.listen, peer.listen or metrics.listen is not loopback and lacks
    /// TLS or auth (server.insecure); a warning names what is open.
    #[arg(long)]
    insecure: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Recovery from a lost quorum: make this member the only member of its cluster (from its
    /// own data directory), then run. For one start only; the other members join again with
    /// fresh data directories (docs/operations.md).
    #[arg(long)]
    force_new_cluster: bool,
}

impl Command {
    /// Whether the command prints an answer and exits: such a command ends quietly when its
    /// reader goes away (`lodge ctl info | head -1`). Commands that run until stopped, or that
    /// must clean up before exiting, keep a closed stdout an error: the node and `lodge module`,
    /// the tunnel commands (they end their sessions), `client run` (it unregisters; its status
    /// lines are written without `println!`), and `bench` (it stops the clusters it started).
    fn prints_and_exits(&self) -> bool {
        match self {
            Command::Node(a) => a.print_config,
            Command::Client { cmd, .. } => !matches!(cmd, client::Client::Run { .. }),
            Command::Ctl { .. }
            | Command::Kv { .. }
            | Command::Workflow { .. }
            | Command::Cluster { .. }
            | Command::Lb { .. }
            | Command::Translate { .. }
            | Command::Sessions { .. }
            | Command::Token(_) => true,
            Command::Agent { .. }
            | Command::Exec { .. }
            | Command::PortForward { .. }
            | Command::Rsync { .. }
            | Command::RsyncShell { .. }
            | Command::Module { .. }
            | Command::Bench { .. } => false,
        }
    }
}

/// The exit status of a command whose stdout was closed: what a shell shows for a process killed
/// by SIGPIPE (128 + 13), as `ls | head` leaves it.
const CLOSED_STDOUT_EXIT: i32 = 141;

/// Makes `println!` to a closed stdout end the process quietly with [`CLOSED_STDOUT_EXIT`]
/// instead of panicking with a backtrace.
///
/// Restoring SIGPIPE's default action would do it too, but the signal does not say which
/// descriptor was closed: std writes vectored socket data with `writev`, which raises SIGPIPE
/// when a node resets a connection, and the command would die silently instead of trying the
/// next `--endpoint`. So SIGPIPE stays ignored and the one panic `println!` makes on EPIPE
/// (std's own wording, with the OS's text for EPIPE) ends the process.
fn exit_quietly_on_a_closed_stdout() {
    let epipe = std::io::Error::from_raw_os_error(rustix::io::Errno::PIPE.raw_os_error());
    let closed = format!("failed printing to stdout: {epipe}");
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload_as_str() == Some(closed.as_str()) {
            std::process::exit(CLOSED_STDOUT_EXIT);
        }
        previous(info);
    }));
}

fn main() {
    let cli = Cli::parse();
    if cli.cmd.prints_and_exits() {
        exit_quietly_on_a_closed_stdout();
    }
    let code = match cli.cmd {
        Command::Node(a) => {
            let overrides = config::Overrides {
                config_file: a.config,
                node_id: a.node_id,
                listen: a.listen,
                metrics_listen: a.metrics_listen,
                data_dir: a.data_dir,
                log_level: a.log_level,
                allow_mutations: a.allow_mutations.then_some(true),
                initial_cluster: a.initial_cluster,
                join: a.join,
                advertise: a.advertise,
                peer_listen: a.peer_listen,
                peer_advertise: a.peer_advertise,
                insecure: a.insecure.then_some(true),
            };
            match config::NodeConfig::load(&overrides) {
                Err(e) => {
                    eprintln!("lodge: {e}");
                    2
                }
                Ok(cfg) if a.print_config => {
                    print!("{}", cfg.to_toml());
                    0
                }
                Ok(cfg) => node::run(cfg, a.force_new_cluster),
            }
        }
        Command::Ctl { conn, cmd } => client_runtime().block_on(ctl::run(conn, cmd)),
        Command::Kv { conn, cmd } => client_runtime().block_on(kv::run(conn, cmd)),
        Command::Cluster { conn, cmd } => client_runtime().block_on(cluster::run(conn, cmd)),
        Command::Workflow { conn, cmd } => client_runtime().block_on(workflow::run(conn, cmd)),
        Command::Client { conn, cmd } => client_runtime().block_on(client::run(conn, cmd)),
        Command::Lb { conn, cmd } => client_runtime().block_on(lb::run(conn, cmd)),
        Command::Translate { conn, args } => client_runtime().block_on(translate::run(conn, args)),
        Command::Agent { conn, args } => client_runtime().block_on(tunnel::agent::run(conn, args)),
        Command::Exec { conn, args } => client_runtime().block_on(tunnel::exec::run(conn, args)),
        Command::PortForward { conn, args } => {
            client_runtime().block_on(tunnel::port_forward::run(conn, args))
        }
        Command::Rsync { conn, args } => client_runtime().block_on(tunnel::rsync::run(conn, args)),
        Command::RsyncShell { conn, args } => {
            client_runtime().block_on(tunnel::rsync::run_shell(conn, args))
        }
        Command::Sessions { conn, cmd } => {
            client_runtime().block_on(tunnel::sessions::run(conn, cmd))
        }
        Command::Module { conn, args } => server_runtime().block_on(module::run(conn, args)),
        Command::Token(args) => token::run(args),
        Command::Bench { cmd } => bench::run(cmd),
    };
    std::process::exit(code);
}

fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the client runtime")
}

/// A multi-threaded runtime, for commands that serve traffic (`lodge module`'s data path).
fn server_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the runtime")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
