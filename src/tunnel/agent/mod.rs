//! `lodge agent`: the workload side of the router. It listens for sessions of its workflow and
//! serves each one (exec, port-forward, rsync) on its own tunnel.
//!
//! The listen stream is only a source of offers: when it breaks, the agent listens again (with
//! backoff, trying the endpoints in turn) while the sessions already running carry on over their
//! own tunnels. A node that refuses the agent's token is the exception: that is not retried, and
//! the agent exits [`TOKEN_REFUSED_EXIT_CODE`] with the node's reason. SIGINT or SIGTERM stops
//! listening and gives running sessions [`GRACE`] to finish.
//!
//! An operation left out of `--allow` is refused: an exec or rsync user gets a line on stderr and
//! exit status 126 (the shell's "cannot execute"); a port-forward is simply closed, so the user's
//! local connection ends (TCP) or its session ends (UDP).

pub mod backoff;
pub mod exec;
pub mod tcp;
#[cfg(test)]
pub(crate) mod through_grpc;
pub mod udp;

use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use lodge_grpc::client;
use lodge_grpc::pb::router::{
    exit_status, frame, user_init, AgentInit, Channel, ExitStatus, Frame, PortForward, Protocol,
    SessionOffer, UserInit,
};
use lodge_grpc::router_client::{control, RouterClient};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::Code;

use self::backoff::Backoff;
use self::udp::UdpOptions;
use super::shutdown::Shutdown;
use super::{Link, TunnelConn};
use crate::failover;

/// How long running sessions may go on after SIGINT or SIGTERM.
pub const GRACE: Duration = Duration::from_secs(5);

/// First pause before listening again; the pauses double up to [`BACKOFF_CAP`].
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// A listen stream that stayed up this long was healthy: the next failure starts the backoff
/// afresh.
const STABLE_STREAM: Duration = Duration::from_secs(30);

/// How long a refused exec or rsync waits for the user to take its answer before hanging up.
const REFUSAL_LINGER: Duration = Duration::from_secs(5);

/// Exit status of a refused exec or rsync: the shell's "found but cannot execute".
pub const REFUSED_EXIT_CODE: i32 = 126;

/// Exit status of `lodge agent` when the node refuses its credentials (UNAUTHENTICATED: a
/// missing, expired or forged token; PERMISSION_DENIED: no `agent` role, or not for this
/// workflow): sysexits' EX_NOPERM. Retrying cannot fix a refused token, so the agent stops and
/// says why instead of retrying in silence for ever.
pub const TOKEN_REFUSED_EXIT_CODE: i32 = 77;

/// Arguments of `lodge agent`.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// Workflow this agent serves.
    #[arg(long)]
    pub workflow_id: String,
    /// Operations this agent serves (comma-separated); others are refused.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_values_t = [OperationKind::Exec, OperationKind::PortForward, OperationKind::Rsync]
    )]
    pub allow: Vec<OperationKind>,
    /// Seconds a UDP port-forward source may stay silent both ways before its socket is closed.
    #[arg(long, default_value_t = 60)]
    pub udp_idle_secs: u64,
    /// UDP sources one port-forward keeps at once; datagrams from further sources are dropped.
    #[arg(long, default_value_t = 1024)]
    pub udp_max_sources: usize,
    /// Also log offers this agent did not get (taken by another agent, or gone).
    #[arg(long)]
    pub verbose: bool,
}

/// An operation a user can ask of an agent.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperationKind {
    /// Run a command.
    Exec,
    /// Forward a TCP or UDP port.
    PortForward,
    /// rsync files.
    Rsync,
}

impl OperationKind {
    fn name(self) -> &'static str {
        match self {
            Self::Exec => "exec",
            Self::PortForward => "port-forward",
            Self::Rsync => "rsync",
        }
    }
}

/// What a session may do on this agent.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Operations served; the others are refused.
    pub allow: Vec<OperationKind>,
    /// Limits of UDP forwards.
    pub udp: UdpOptions,
}

/// The agent's settings, shared by its sessions.
struct Agent {
    workflow_id: String,
    policy: Policy,
    verbose: bool,
}

impl Agent {
    fn from_args(args: AgentArgs) -> Result<Self, String> {
        if args.workflow_id.is_empty() {
            return Err("--workflow-id: must not be empty".into());
        }
        if args.udp_idle_secs == 0 {
            return Err("--udp-idle-secs: must be at least 1".into());
        }
        if args.udp_max_sources == 0 {
            return Err("--udp-max-sources: must be at least 1".into());
        }
        Ok(Self {
            workflow_id: args.workflow_id,
            policy: Policy {
                allow: args.allow,
                udp: UdpOptions {
                    idle: Duration::from_secs(args.udp_idle_secs),
                    max_sources: args.udp_max_sources,
                },
            },
            verbose: args.verbose,
        })
    }

    fn debug(&self, msg: &str) {
        if self.verbose {
            eprintln!("lodge agent: {msg}");
        }
    }
}

/// Runs the agent until interrupted.
pub async fn run(conn: TunnelConn, args: AgentArgs) -> i32 {
    let agent = match Agent::from_args(args) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("lodge agent: {e}");
            return 2;
        }
    };
    // A token that cannot be read now is a mistake to report, not a reason to retry forever.
    if let Err(e) = conn.token() {
        eprintln!("lodge agent: {e}");
        return 2;
    }
    let mut shutdown = Shutdown::catch();
    // Every session holds a clone; `recv` answers `None` once all of them have finished.
    let (running, mut all_finished) = mpsc::channel::<()>(1);
    let mut listening = Box::pin(listen_forever(conn, agent, running.clone()));
    let code = tokio::select! {
        code = &mut listening => code,
        () = shutdown.signalled() => 0,
    };
    drop(listening);
    let sessions = running.strong_count() - 1;
    drop(running);
    if sessions > 0 {
        eprintln!(
            "lodge agent: stopping; waiting up to {}s for {sessions} running session(s)",
            GRACE.as_secs()
        );
        if tokio::time::timeout(GRACE, all_finished.recv())
            .await
            .is_err()
        {
            eprintln!("lodge agent: sessions still running after the grace period are cut off");
        }
    } else if code == 0 {
        eprintln!("lodge agent: stopping");
    }
    code
}

/// Why a listen stream could not be opened or ended.
enum ListenError {
    /// Worth another try (the node is unreachable, restarting, has no leader...).
    Transient(String),
    /// The node refused the agent's credentials: another try would be refused too.
    Refused(String),
}

impl ListenError {
    /// The error of a failed listen call or stream.
    fn of(status: &tonic::Status, token_given: bool) -> Self {
        let why = format!(
            "listen: {:?}: {}",
            status.code(),
            super::explain(status, token_given)
        );
        match status.code() {
            Code::Unauthenticated | Code::PermissionDenied => ListenError::Refused(why),
            _ => ListenError::Transient(why),
        }
    }
}

/// Listens for offers, again and again, saying on every failed attempt why and when the next
/// comes; returns (the exit status) only if the node refuses the agent's credentials.
async fn listen_forever(conn: TunnelConn, agent: Arc<Agent>, running: mpsc::Sender<()>) -> i32 {
    let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_CAP);
    let mut announced = false;
    let mut first_endpoint = 0;
    loop {
        let opened = Instant::now();
        let why = match listen_once(&conn, first_endpoint, &agent, &running, &mut announced).await {
            Ok(()) => "the listen stream ended".to_string(),
            Err(ListenError::Refused(why)) => {
                eprintln!(
                    "lodge agent: {why}; not retrying, a refused token stays refused: stopping \
                     (exit {TOKEN_REFUSED_EXIT_CODE})"
                );
                return TOKEN_REFUSED_EXIT_CODE;
            }
            Err(ListenError::Transient(why)) => {
                // The next attempt starts with another member: this one may be the broken one.
                first_endpoint += 1;
                why
            }
        };
        if opened.elapsed() >= STABLE_STREAM {
            backoff.reset();
        }
        let pause = backoff.next_pause();
        eprintln!("lodge agent: {why}; retrying in {} ms", pause.as_millis());
        tokio::time::sleep(pause).await;
    }
}

/// One listen stream, from connecting to its end; spawns a task per offer.
async fn listen_once(
    conn: &TunnelConn,
    first_endpoint: usize,
    agent: &Arc<Agent>,
    running: &mpsc::Sender<()>,
    announced: &mut bool,
) -> Result<(), ListenError> {
    let router = connect(conn, first_endpoint)
        .await
        .map_err(ListenError::Transient)?;
    let failed = |s: tonic::Status| ListenError::of(&s, router.has_token());
    let mut offers = router.listen(&agent.workflow_id).await.map_err(failed)?;
    if *announced {
        eprintln!("lodge agent: listening again");
    } else {
        println!("lodge agent ready workflow={}", agent.workflow_id);
        *announced = true;
    }
    while let Some(offer) = offers.next().await {
        let offer = offer.map_err(failed)?;
        // The token file is read for every session: a renewed token is used at once, without
        // waiting for the listen stream to reconnect.
        let router = match conn.token().and_then(|t| router.with_token(t.as_deref())) {
            Ok(fresh) => fresh,
            Err(e) => {
                eprintln!("lodge agent: {e}; using the token read at connect time");
                router.clone()
            }
        };
        let (agent, running) = (agent.clone(), running.clone());
        tokio::spawn(async move {
            take_offer(router, offer, &agent).await;
            drop(running);
        });
    }
    Ok(())
}

/// A client of the first endpoint that answers, starting at `first` (modulo the list). The token
/// is read again each time, so a renewed token file is picked up when the agent reconnects.
async fn connect(conn: &TunnelConn, first: usize) -> Result<RouterClient, String> {
    let token = conn.token()?;
    let tls = failover::tls(&conn.conn)?;
    let endpoints = failover::endpoints(&conn.conn);
    let mut last = String::from("--endpoint: no endpoint given");
    for i in 0..endpoints.len() {
        let endpoint = &endpoints[(first + i) % endpoints.len()];
        match client::connect(endpoint, &tls).await {
            Ok(channel) => return RouterClient::new(channel, token.as_deref()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Joins the offered session and serves it.
async fn take_offer(router: RouterClient, offer: SessionOffer, agent: &Agent) {
    let key = offer.session_key;
    let init = AgentInit {
        session_key: key.clone(),
        workflow_id: agent.workflow_id.clone(),
    };
    let (tunnel, user) = match router.open_agent(init).await {
        Ok(joined) => joined,
        // Another agent took it, or the user gave up before this agent joined: routine.
        Err(s)
            if matches!(
                s.code(),
                Code::AlreadyExists | Code::NotFound | Code::DeadlineExceeded
            ) =>
        {
            agent.debug(&format!(
                "session {key}: not joined: {:?}: {}",
                s.code(),
                s.message()
            ));
            return;
        }
        Err(s) => {
            eprintln!(
                "lodge agent: session {key}: joining: {:?}: {}",
                s.code(),
                s.message()
            );
            return;
        }
    };
    let what = describe(&user);
    eprintln!("lodge agent: session {key}: {what}");
    match serve(Link::from(tunnel), user, &agent.policy).await {
        Ok(()) => eprintln!("lodge agent: session {key}: ended"),
        Err(e) => eprintln!("lodge agent: session {key}: {e}"),
    }
}

/// A short description of a user's request for the log (never the command's arguments, which
/// may hold secrets).
fn describe(user: &UserInit) -> String {
    match &user.operation {
        Some(user_init::Operation::Exec(e)) => format!(
            "exec {}",
            e.command.first().map(String::as_str).unwrap_or("?")
        ),
        Some(user_init::Operation::Rsync(_)) => "rsync".into(),
        Some(user_init::Operation::PortForward(pf)) => {
            format!("port-forward {}:{}", protocol_name(pf.protocol), pf.port)
        }
        None => "no operation".into(),
    }
}

fn protocol_name(p: i32) -> &'static str {
    match Protocol::try_from(p) {
        Ok(Protocol::Tcp) => "tcp",
        Ok(Protocol::Udp) => "udp",
        _ => "unknown",
    }
}

/// Serves one paired session as `policy` allows.
pub async fn serve(link: Link, user: UserInit, policy: &Policy) -> Result<(), String> {
    let Some(operation) = user.operation else {
        return Err("the user asked for no operation".into());
    };
    let kind = match &operation {
        user_init::Operation::Exec(_) => OperationKind::Exec,
        user_init::Operation::PortForward(_) => OperationKind::PortForward,
        user_init::Operation::Rsync(_) => OperationKind::Rsync,
    };
    if !policy.allow.contains(&kind) {
        refuse(link, kind).await;
        return Err(format!("{} refused: not in --allow", kind.name()));
    }
    match operation {
        user_init::Operation::Exec(e) => exec::serve_exec(link, e).await,
        user_init::Operation::Rsync(r) => exec::serve_rsync(link, r).await,
        user_init::Operation::PortForward(pf) => port_forward(link, pf, policy).await,
    }
}

async fn port_forward(link: Link, pf: PortForward, policy: &Policy) -> Result<(), String> {
    let port = u16::try_from(pf.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port-forward: port {} is not 1-65535", pf.port))?;
    match Protocol::try_from(pf.protocol) {
        Ok(Protocol::Tcp) => tcp::serve_tcp(link, port).await,
        Ok(Protocol::Udp) => {
            let stats = udp::serve_udp(link, port, policy.udp).await?;
            eprintln!(
                "lodge agent: udp to port {port}: {} sources, {} idled out, {} datagrams over \
                 the source limit, {} over a full queue",
                stats.sources, stats.reaped, stats.over_limit, stats.queue_full
            );
            Ok(())
        }
        _ => Err(format!(
            "port-forward: protocol {} is neither TCP nor UDP",
            pf.protocol
        )),
    }
}

/// Ends a session the policy does not allow. An exec or rsync user is told why on stderr and
/// gets exit status 126; a port-forward is closed, which is all its user could act on.
async fn refuse(link: Link, kind: OperationKind) {
    let Link { tx, mut rx } = link;
    if kind == OperationKind::PortForward {
        return;
    }
    let answer = async {
        let why = format!(
            "lodge agent: {} is not allowed on this agent (see its --allow)\n",
            kind.name()
        );
        tx.send(Frame {
            data: why.into(),
            channel: Channel::Stderr as i32,
            ..Default::default()
        })
        .await
        .ok()?;
        tx.send(control(frame::Control::Exit(ExitStatus {
            status: Some(exit_status::Status::Code(REFUSED_EXIT_CODE)),
        })))
        .await
        .ok()?;
        drop(tx);
        // Hanging up at once could cancel the call before the frames above leave: wait for the
        // user, who ends its side once it has the exit status.
        while let Some(Ok(_)) = rx.next().await {}
        Some(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, answer).await;
}

#[cfg(test)]
mod tests {
    use lodge_grpc::pb::router::Exec;

    use super::*;
    use crate::tunnel::link_pair;

    fn only(allow: OperationKind) -> Policy {
        Policy {
            allow: vec![allow],
            udp: UdpOptions::default(),
        }
    }

    fn user(operation: user_init::Operation) -> UserInit {
        UserInit {
            session_key: "s-test".into(),
            workflow_id: "w".into(),
            operation: Some(operation),
        }
    }

    #[tokio::test]
    async fn a_refused_exec_gets_a_reason_and_status_126() {
        let (mut user_end, agent_end) = link_pair();
        let exec = user(user_init::Operation::Exec(Exec {
            command: vec!["true".into()],
            ..Default::default()
        }));
        let policy = only(OperationKind::PortForward);
        let user_side = async {
            let mut frames = Vec::new();
            while let Some(f) = user_end.rx.next().await {
                let f = f.unwrap();
                let eof = matches!(f.control, Some(frame::Control::Eof(_)));
                frames.push(f);
                if eof {
                    break;
                }
            }
            // What an exec client does once it has the exit status: finish its side.
            drop(user_end.tx);
            assert!(user_end.rx.next().await.is_none());
            frames
        };
        let (served, frames) = tokio::join!(serve(agent_end, exec, &policy), user_side);
        assert_eq!(served.unwrap_err(), "exec refused: not in --allow");
        assert_eq!(frames.len(), 3, "{frames:?}");
        assert_eq!(frames[0].channel, Channel::Stderr as i32);
        let why = String::from_utf8_lossy(&frames[0].data);
        assert!(why.contains("exec is not allowed"), "{why}");
        assert_eq!(
            frames[1].control,
            Some(frame::Control::Exit(ExitStatus {
                status: Some(exit_status::Status::Code(126))
            }))
        );
        assert!(matches!(frames[2].control, Some(frame::Control::Eof(_))));
    }

    #[tokio::test]
    async fn a_refused_port_forward_is_closed() {
        let (mut user_end, agent_end) = link_pair();
        let forward = user(user_init::Operation::PortForward(PortForward {
            protocol: Protocol::Tcp as i32,
            port: 8080,
        }));
        let served = serve(agent_end, forward, &only(OperationKind::Exec)).await;
        assert_eq!(served.unwrap_err(), "port-forward refused: not in --allow");
        let first = user_end.rx.next().await.unwrap().unwrap();
        assert!(matches!(first.control, Some(frame::Control::Eof(_))));
        assert!(first.data.is_empty());
        drop(user_end.tx);
        assert!(user_end.rx.next().await.is_none());
    }

    #[test]
    fn allow_defaults_to_everything_and_parses_a_list() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: AgentArgs,
        }
        let all = Cli::parse_from(["lodge", "--workflow-id", "w"]).args.allow;
        assert_eq!(
            all,
            [
                OperationKind::Exec,
                OperationKind::PortForward,
                OperationKind::Rsync
            ]
        );
        let some = Cli::parse_from(["lodge", "--workflow-id", "w", "--allow", "exec,rsync"]);
        assert_eq!(some.args.allow, [OperationKind::Exec, OperationKind::Rsync]);
    }
}
