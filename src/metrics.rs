//! The Prometheus page: RPC metrics from the gRPC layer, per-kind actor figures read from the
//! registry at scrape time, and process figures read from /proc.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use lodge_actors::cluster::topology::{Directory, Role};
use lodge_actors::introspect::KindTotals;
use lodge_actors::ActorTable;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Per-kind actor figures, computed on scrape (nothing on the message path).
#[derive(Debug)]
pub struct ActorCollector(pub ActorTable);

/// A per-kind figure: metric name, help, and how to read it from the totals.
type KindFigure = (&'static str, &'static str, fn(&KindTotals) -> u64);

impl Collector for ActorCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals = self.0.kind_totals();
        let gauges: [KindFigure; 2] = [
            ("lodge_actors", "Live actors, by kind", |t| t.live),
            (
                "lodge_actor_queue_depth",
                "Messages waiting in mailboxes, by kind",
                |t| t.queued,
            ),
        ];
        for (name, help, get) in gauges {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (kind, t) in &totals {
                let labels = [("kind", *kind)];
                ConstGauge::new(get(t) as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        let counters: [KindFigure; 3] = [
            ("lodge_actor_messages", "Messages handled, by kind", |t| {
                t.messages
            }),
            (
                "lodge_actor_failures",
                "Actor failures (panics, reported failures, unexpected exits), by kind",
                |t| t.failures,
            ),
            (
                "lodge_actor_restarts",
                "Actor restarts by supervisors, by kind",
                |t| t.restarts,
            ),
        ];
        for (name, help, get) in counters {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (kind, t) in &totals {
                let labels = [("kind", *kind)];
                ConstCounter::new(get(t)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The usual `process_*` figures, from /proc (Linux).
#[derive(Debug)]
pub struct ProcessCollector;

const TICKS_PER_SECOND: f64 = 100.0; // USER_HZ on Linux
const PAGE_SIZE: u64 = 4096;

/// Numeric fields of `/proc/self/stat`, by their 1-based number in proc(5); `None` off Linux.
fn stat_fields() -> Option<impl Fn(usize) -> u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name, which may itself contain spaces.
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, r)| {
            r.split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    Some(move |i: usize| fields.get(i - 3).copied().unwrap_or(0))
}

/// CPU seconds used and resident bytes of this process (zeros where /proc is missing).
pub fn cpu_and_rss() -> (f64, u64) {
    stat_fields().map_or((0.0, 0), |field| {
        (
            (field(14) + field(15)) as f64 / TICKS_PER_SECOND,
            field(24) * PAGE_SIZE,
        )
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(field) = stat_fields() else {
            return Ok(());
        };
        let cpu = (field(14) + field(15)) as f64 / TICKS_PER_SECOND;
        let threads = field(20);
        let vsize = field(23);
        let rss = field(24) * PAGE_SIZE;
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("btime ")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
            })
            .unwrap_or(0);
        let start = boot as f64 + field(22) as f64 / TICKS_PER_SECOND;
        let fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count())
            .unwrap_or(0);
        let c = ConstCounter::new(cpu);
        c.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time",
            None,
            c.metric_type(),
        )?)?;
        for (name, help, v) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size",
                rss as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size",
                vsize as f64,
            ),
            ("process_open_fds", "Open file descriptors", fds as f64),
            ("process_threads", "OS threads", threads as f64),
            (
                "process_start_time_seconds",
                "Start time since the Unix epoch",
                start,
            ),
        ] {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

/// The raft member and the topology, read from the directory at scrape time.
#[derive(Clone)]
pub struct ClusterCollector(pub Directory);

impl std::fmt::Debug for ClusterCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterCollector")
    }
}

impl Collector for ClusterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = self.0.figures();
        let p = self.0.current();
        let voters = p
            .topology
            .members
            .values()
            .filter(|m| m.role == Role::Voter)
            .count();
        for (name, help, v) in [
            (
                "lodge_raft_is_leader",
                "1 if this member leads",
                r.is_leader as i64,
            ),
            ("lodge_raft_term", "Current raft term", r.term as i64),
            (
                "lodge_raft_commit_index",
                "Highest log index known committed",
                r.commit as i64,
            ),
            (
                "lodge_raft_applied_index",
                "Highest log index applied here",
                r.applied as i64,
            ),
            (
                "lodge_raft_leader_id",
                "The leader this member knows of (0: none)",
                p.leader.unwrap_or(0) as i64,
            ),
            (
                "lodge_cluster_topology_version",
                "Version of the replicated topology",
                p.topology.version as i64,
            ),
            ("lodge_cluster_voters", "Voting members", voters as i64),
            (
                "lodge_cluster_learners",
                "Non-voting members",
                (p.topology.members.len() - voters) as i64,
            ),
            ("lodge_kv_revision", "Revision of the KV store", r.revision),
            ("lodge_kv_leases", "Live leases", r.leases as i64),
            (
                "lodge_kv_watchers",
                "Watches served by this member",
                r.watchers as i64,
            ),
        ] {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let c = ConstCounter::new(r.leases_expired);
        c.encode(encoder.encode_descriptor(
            "lodge_kv_leases_expired",
            "Leases this member expired as leader",
            None,
            c.metric_type(),
        )?)?;
        Ok(())
    }
}

/// How the metrics endpoint takes connections (`[metrics]`).
#[derive(Clone)]
pub struct Serving {
    /// Connections open at once; past it the quietest is shed, or the new one closed.
    pub max_connections: usize,
    /// How long a connection may take to send a request, the first or the next one.
    pub request_timeout: std::time::Duration,
    /// Where connections ended by those limits are counted.
    pub rejections: lodge_actors::registry::RegistryMetrics,
    /// HTTPS (`[metrics.tls]`), with the certificate current at each handshake.
    pub tls: Option<Arc<lodge_grpc::tls::ReloadingTls>>,
    /// The bearer token every scrape must carry (`metrics.token_file`).
    pub token: Option<crate::exposure::MetricsToken>,
}

/// How long to wait after a failed accept (out of file descriptors, say) before trying again,
/// rather than spinning on the error.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

/// Serves `GET /metrics` on `listener` until the task is dropped.
///
/// A scraper is one client; what must not happen is that idle or slow sockets keep it out. So
/// the page is served with the gRPC listener's rules: a connection must send a request within
/// `request_timeout` (first or next), and when `max_connections` are open the one that has
/// waited longest for a request is closed to make room.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, serving: Serving) {
    use lodge_grpc::listener::{ConnState, OpenConnections, Watched};
    let open = Arc::new(OpenConnections::default());
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let place = Place(count.clone());
        if place.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= serving.max_connections
            && !open.shed_one()
        {
            serving.rejections.rejected("metrics_connections");
            continue;
        }
        let state = Arc::new(ConnState::new());
        open.track(&state);
        let io = Watched::new(
            stream,
            state.clone(),
            serving.request_timeout,
            Some(serving.request_timeout),
        );
        let (registry, rejections) = (registry.clone(), serving.rejections.clone());
        let token = serving.token.clone();
        // The certificate current now serves this connection to its end.
        let tls = serving.tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let _place = place;
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                // The page is built at once: the call ends with the response.
                state.call_began();
                let resp = match &token {
                    Some(t)
                        if !t.admits(req.headers().get("authorization").map(|v| v.as_bytes())) =>
                    {
                        unauthorized()
                    }
                    _ => respond(&req, &registry),
                };
                state.call_ended();
                async move { Ok::<_, Infallible>(resp) }
            });
            let ended = io.state().clone();
            // The handshake is bounded by the connection's request timeout (a silent client).
            let io = match tls {
                None => lodge_grpc::tls::Secured::Plain(io),
                Some(acceptor) => match acceptor.accept(io).await {
                    Ok(s) => lodge_grpc::tls::Secured::Tls(Box::new(s)),
                    Err(_) => {
                        rejections.rejected("metrics_tls_handshake");
                        return;
                    }
                },
            };
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), svc)
                .await;
            if let Some(how) = ended.ending() {
                rejections.rejected(&format!("metrics_{}", how.label()));
            }
        });
    }
}

/// A connection's place in the count, given back when it closes.
struct Place(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The answer to a scrape without the token: what to fix, never the token.
fn unauthorized() -> Response<Full<Bytes>> {
    Response::builder()
        .status(401)
        .header("www-authenticate", "Bearer realm=\"lodge metrics\"")
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(
            b"401 unauthorized: this metrics endpoint needs \"Authorization: Bearer <token>\" with the token in the node's metrics.token_file (Prometheus: authorization.credentials_file)\n",
        )))
        .expect("static response")
}

fn respond(req: &Request<hyper::body::Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return Response::builder()
            .status(404)
            .body(Full::new(Bytes::from_static(b"not found; try /metrics\n")))
            .expect("static response");
    }
    let mut body = String::new();
    let openmetrics = req
        .headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) if openmetrics => Response::builder()
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(body)))
            .expect("static response"),
        Ok(()) => Response::builder()
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .body(Full::new(Bytes::from(to_prometheus_text(&body))))
            .expect("static response"),
        Err(_) => Response::builder()
            .status(500)
            .body(Full::new(Bytes::from_static(b"encoding failed\n")))
            .expect("static response"),
    }
}

/// Rewrites OpenMetrics text as the classic Prometheus text format (what `promtool check metrics`
/// and older scrapers read): counter families are named with their `_total` suffix, and the
/// OpenMetrics-only `# UNIT` and `# EOF` lines go.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_families_take_their_total_suffix_in_prometheus_text() {
        let om = "# HELP reqs Requests.\n# TYPE reqs counter\nreqs_total{a=\"b\"} 1\n# HELP up Up.\n# TYPE up gauge\nup 1\n# EOF\n";
        let text = to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP reqs_total Requests.\n# TYPE reqs_total counter\nreqs_total{a=\"b\"} 1\n# HELP up Up.\n# TYPE up gauge\nup 1\n"
        );
    }
}
