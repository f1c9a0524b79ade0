//! One reconnecting worker for the clients that register with a cluster and keep the
//! registration alive with heartbeats: the registry client library ([`crate::registry_client`])
//! and the module SDK's link to the balancer ([`crate::module::link`]).
//!
//! Both are the same machine, written out once here:
//! - reconnecting is the normal path of one loop: connect to an endpoint, run a session on it,
//!   and when the session fails back off and, if the failure says the member is gone, move to
//!   the next endpoint (round-robin), never a branch guarded by a flag something else can clear;
//! - the backoff doubles per consecutive failure up to a ceiling (a long outage is still probed
//!   regularly), each pause jittered between half and all of it so that clients that lost the
//!   same member do not come back in lockstep, and it starts over after a success;
//! - a session registers when it has to (no registration yet, the member does not know it, the
//!   client wants a new one) and otherwise heartbeats, each beat one interval after the previous
//!   one was sent, the interval read again for every beat so a change in any answer is used for
//!   the very next beat;
//! - every wait is guarded: shutdown (or the owner dropping the stop sender) ends it at once, and
//!   an optional watchdog ticks meanwhile, so a status can degrade while a call hangs.
//!
//! What differs between the two clients is a [`Session`]: how to connect, register and beat,
//! what an answer means, and what the status looks like and where it is published.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::client::{self, Channel, ClientTls};

/// Why a session with one member failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// Move on to the next endpoint (the member is unreachable or too slow), rather than back
    /// off and try the same one again (it answered, e.g. refused for want of a quorum).
    pub switch: bool,
    /// For the status and the log.
    pub why: String,
}

/// What a heartbeat's answer means to the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Beat {
    /// The member took the beat: the backoff starts over.
    Ok,
    /// The member answered but did not take the beat: a missed beat, no reason to leave it.
    Missed,
    /// The member does not know the registration: register again on it, then beat on.
    Register,
    /// The session failed.
    Fail(Failure),
}

/// The parts of a registering, heartbeating client that differ from one client to another.
///
/// Calls are split in two: a method that builds the call (it may update the status first) and
/// returns a future owning all it needs, and a method that reads the answer. The worker awaits
/// the future itself, guarded, so that the watchdog ([`Session::on_tick`]) can run meanwhile.
pub(crate) trait Session {
    /// A connection to one endpoint.
    type Conn: Clone;
    /// The answer to a registration.
    type Registered;
    /// The answer to a heartbeat.
    type Beaten;

    /// Connects to `endpoint`; the error says why not.
    fn connect(
        &self,
        endpoint: &str,
    ) -> impl Future<Output = Result<Self::Conn, String>> + Send + 'static;
    /// The worker is about to connect to `endpoint`.
    fn on_endpoint(&mut self, endpoint: &str);
    /// A connection to `endpoints[idx]` was made; a session on it starts.
    fn on_connected(&mut self, idx: usize, conn: &Self::Conn);
    /// Whether to register before the next heartbeat: asked at the start of a session and
    /// before every beat. (A registration the member does not know is reported by
    /// [`Beat::Register`] instead.)
    fn needs_register(&mut self) -> bool;
    /// A registration call.
    fn register(
        &mut self,
        conn: &Self::Conn,
    ) -> impl Future<Output = Self::Registered> + Send + 'static;
    /// Reads a registration's answer; `Ok` means registered (the backoff starts over).
    fn registered(&mut self, answer: Self::Registered) -> Result<(), Failure>;
    /// A heartbeat call.
    fn beat(&mut self, conn: &Self::Conn) -> impl Future<Output = Self::Beaten> + Send + 'static;
    /// Reads a heartbeat's answer.
    fn beaten(&mut self, answer: Self::Beaten) -> Beat;
    /// The heartbeat interval now (read after every answer).
    fn interval(&self) -> Duration;
    /// A session failed (or a connection could not be made); the worker backs off next.
    fn on_failure(&mut self, why: String);
    /// How often [`Session::on_tick`] runs during waits; `None`: never.
    fn tick(&self) -> Option<Duration> {
        None
    }
    /// The watchdog, for a status that degrades with time (e.g. beats missed while waiting).
    fn on_tick(&mut self) {}
}

/// Exponential backoff with jitter: each pause is between half and all of the current delay,
/// which doubles per pause up to `max` (or `initial`, if that is larger).
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    cur: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            cur: initial,
        }
    }

    /// The next pause; the one after it is longer, up to the ceiling.
    pub fn next_pause(&mut self) -> Duration {
        let b = self.cur;
        self.cur = (b * 2).min(self.max);
        jittered(b)
    }

    /// After a success: the next failure backs off from the beginning.
    pub fn reset(&mut self) {
        self.cur = self.initial;
    }
}

/// A pause between half of `b` and `b`.
fn jittered(b: Duration) -> Duration {
    b / 2 + b.mul_f64(fastrand::f64() / 2.0)
}

/// Drives a [`Session`] over a list of endpoints until shutdown; see the module documentation.
pub(crate) struct Reconnector {
    endpoints: Vec<String>,
    backoff: Backoff,
    stop: watch::Receiver<bool>,
    idx: usize,
}

/// How a guarded wait or a session ended when it did not fail.
struct Stopped;

impl Reconnector {
    /// A worker for `endpoints` (tried in order, then round again) that stops when `stop` turns
    /// true or its sender is dropped.
    pub fn new(endpoints: Vec<String>, backoff: Backoff, stop: watch::Receiver<bool>) -> Self {
        Reconnector {
            endpoints,
            backoff,
            stop,
            idx: 0,
        }
    }

    /// Whether the worker stopped because shutdown was asked for (rather than the stop sender
    /// being dropped).
    pub fn shutdown_asked(&self) -> bool {
        *self.stop.borrow()
    }

    /// Connects, runs sessions and reconnects until stopped. With no endpoint at all it only
    /// waits to be stopped, so the client behaves the same otherwise.
    pub async fn run<S: Session>(&mut self, s: &mut S) {
        if self.endpoints.is_empty() {
            let _ = self.guarded(s, std::future::pending::<()>()).await;
            return;
        }
        loop {
            let ep = self.endpoints[self.idx].clone();
            s.on_endpoint(&ep);
            let connect = s.connect(&ep);
            let failure = match self.guarded(s, connect).await {
                Err(Stopped) => return,
                Ok(Err(why)) => Failure { switch: true, why },
                Ok(Ok(conn)) => {
                    s.on_connected(self.idx, &conn);
                    match self.session(s, conn).await {
                        Err(Stopped) => return,
                        Ok(f) => f,
                    }
                }
            };
            if self.failed(s, failure).await.is_err() {
                return;
            }
        }
    }

    /// Registers when needed and heartbeats on one connection until something fails.
    async fn session<S: Session>(&mut self, s: &mut S, conn: S::Conn) -> Result<Failure, Stopped> {
        let mut need_register = false;
        let mut next_beat = Instant::now();
        loop {
            need_register |= s.needs_register();
            if need_register {
                let call = s.register(&conn);
                let answer = self.guarded(s, call).await?;
                if let Err(f) = s.registered(answer) {
                    return Ok(f);
                }
                need_register = false;
                self.backoff.reset();
                next_beat = Instant::now() + s.interval();
                continue;
            }
            self.guarded(s, tokio::time::sleep_until(next_beat)).await?;
            if s.needs_register() {
                need_register = true;
                continue;
            }
            let call = s.beat(&conn);
            let sent = Instant::now();
            let answer = self.guarded(s, call).await?;
            match s.beaten(answer) {
                Beat::Ok => self.backoff.reset(),
                Beat::Missed => {}
                Beat::Register => {
                    need_register = true;
                    continue;
                }
                Beat::Fail(f) => return Ok(f),
            }
            next_beat = (sent + s.interval()).max(Instant::now());
        }
    }

    /// Reports the failure, waits out the backoff and moves to the next endpoint when asked.
    async fn failed<S: Session>(&mut self, s: &mut S, f: Failure) -> Result<(), Stopped> {
        s.on_failure(f.why);
        let pause = self.backoff.next_pause();
        if f.switch {
            self.idx = (self.idx + 1) % self.endpoints.len();
        }
        self.guarded(s, tokio::time::sleep(pause)).await
    }

    /// Runs `fut` to completion unless stopped first, running the session's watchdog meanwhile.
    /// Every wait of the worker goes through here.
    async fn guarded<S: Session, F: Future>(
        &mut self,
        s: &mut S,
        fut: F,
    ) -> Result<F::Output, Stopped> {
        tokio::pin!(fut);
        loop {
            if *self.stop.borrow() {
                return Err(Stopped);
            }
            let tick = s.tick();
            let ticked = async {
                match tick {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut fut => return Ok(r),
                changed = self.stop.changed() => {
                    // A closed channel (the owner is gone) stops too.
                    if changed.is_err() {
                        return Err(Stopped);
                    }
                }
                _ = ticked => s.on_tick(),
            }
        }
    }
}

/// The channel a gRPC client's worker uses now and the endpoint (index) it goes to. Calls made
/// beside the worker (translations, a module's forwarded calls) clone it out, so that a later
/// failover never touches a call in flight, and start from it.
#[derive(Clone)]
pub(crate) struct Conn {
    pub idx: usize,
    pub channel: Channel,
}

impl Conn {
    /// Puts the worker's new connection in `slot` ([`Session::on_connected`]).
    pub fn store(slot: &Mutex<Option<Conn>>, idx: usize, channel: &Channel) {
        // A std mutex, only ever held to clone or replace the value, never across an await.
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Conn {
            idx,
            channel: channel.clone(),
        });
    }
}

/// [`Session::connect`] for a gRPC client: a bounded connection, as a future that owns what it
/// needs.
pub(crate) fn connect_owned(
    endpoint: &str,
    tls: &ClientTls,
    t: Duration,
) -> impl Future<Output = Result<Channel, String>> + Send + 'static {
    let (ep, tls) = (endpoint.to_string(), tls.clone());
    async move { connect_bounded(&ep, &tls, t).await }
}

/// [`Session::on_endpoint`] for a status with an endpoint field: records `endpoint` in `slot`
/// and says whether it changed (so the status is to be published).
pub(crate) fn note_endpoint(slot: &mut Option<String>, endpoint: &str) -> bool {
    if slot.as_deref() == Some(endpoint) {
        return false;
    }
    *slot = Some(endpoint.to_string());
    true
}

/// Connects to `ep`, giving up after `t` (a member that accepts nothing must not hold the caller).
pub(crate) async fn connect_bounded(
    ep: &str,
    tls: &ClientTls,
    t: Duration,
) -> Result<Channel, String> {
    match tokio::time::timeout(t, client::connect(ep, tls)).await {
        Ok(r) => r,
        Err(_) => Err(format!("cannot connect to {ep}: no answer within {t:?}")),
    }
}

/// Whether a failed call means the member is unreachable or too slow, so the client should move
/// to another. CANCELLED is what a server answers when our `grpc-timeout` ran out.
pub(crate) fn member_failed(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Arc;
    use tokio::task::JoinHandle;

    /// A scripted client: endpoints whose name starts with `down` refuse connections; answers to
    /// registrations and beats come from queues (a beat with nothing queued is taken).
    #[derive(Default)]
    struct Fake {
        log: Arc<Mutex<Vec<(Duration, String)>>>,
        t0: Option<Instant>,
        registered: bool,
        register_answers: VecDeque<Result<(), Failure>>,
        beat_answers: VecDeque<Beat>,
        interval: Duration,
        ticks: u32,
        tick: Option<Duration>,
    }

    impl Fake {
        fn new(interval: Duration) -> Self {
            Fake {
                t0: Some(Instant::now()),
                interval,
                ..Default::default()
            }
        }

        fn note(&self, what: String) {
            let at = self.t0.unwrap().elapsed();
            self.log.lock().unwrap().push((at, what));
        }
    }

    impl Session for Fake {
        type Conn = String;
        type Registered = ();
        type Beaten = ();

        fn connect(
            &self,
            endpoint: &str,
        ) -> impl Future<Output = Result<String, String>> + Send + 'static {
            self.note(format!("connect {endpoint}"));
            let r = if endpoint.starts_with("down") {
                Err(format!("{endpoint} is down"))
            } else {
                Ok(endpoint.to_string())
            };
            std::future::ready(r)
        }
        fn on_endpoint(&mut self, _: &str) {}
        fn on_connected(&mut self, idx: usize, conn: &String) {
            self.note(format!("connected {idx} {conn}"));
        }
        fn needs_register(&mut self) -> bool {
            !self.registered
        }
        fn register(&mut self, conn: &String) -> impl Future<Output = ()> + Send + 'static {
            self.note(format!("register {conn}"));
            std::future::ready(())
        }
        fn registered(&mut self, _: ()) -> Result<(), Failure> {
            let r = self.register_answers.pop_front().unwrap_or(Ok(()));
            self.registered = r.is_ok();
            r
        }
        fn beat(&mut self, conn: &String) -> impl Future<Output = ()> + Send + 'static {
            self.note(format!("beat {conn}"));
            std::future::ready(())
        }
        fn beaten(&mut self, _: ()) -> Beat {
            let b = self.beat_answers.pop_front().unwrap_or(Beat::Ok);
            if b == Beat::Register {
                self.registered = false;
            }
            b
        }
        fn interval(&self) -> Duration {
            self.interval
        }
        fn on_failure(&mut self, why: String) {
            self.note(format!("failed {why}"));
        }
        fn tick(&self) -> Option<Duration> {
            self.tick
        }
        fn on_tick(&mut self) {
            self.ticks += 1;
        }
    }

    const SEC: Duration = Duration::from_secs(1);

    fn backoff() -> Backoff {
        Backoff::new(SEC, 8 * SEC)
    }

    /// Runs `fake` over `endpoints` on a task of its own until stopped; the task gives back
    /// whether shutdown was asked for, and the fake.
    fn spawn(
        endpoints: &[&str],
        backoff: Backoff,
        mut fake: Fake,
        stop: watch::Receiver<bool>,
    ) -> JoinHandle<(bool, Fake)> {
        let eps = endpoints.iter().map(|e| e.to_string()).collect();
        tokio::spawn(async move {
            let mut r = Reconnector::new(eps, backoff, stop);
            r.run(&mut fake).await;
            (r.shutdown_asked(), fake)
        })
    }

    /// Runs `fake` over `endpoints` until `until` holds for its log (checked every 10 ms), then
    /// stops it and returns the log.
    async fn run_until(
        endpoints: &[&str],
        fake: Fake,
        until: impl Fn(&[(Duration, String)]) -> bool,
    ) -> Vec<(Duration, String)> {
        let log = fake.log.clone();
        let (stop, rx) = watch::channel(false);
        let task = spawn(endpoints, backoff(), fake, rx);
        loop {
            if until(&log.lock().unwrap()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.send_replace(true);
        task.await.unwrap();
        let l = log.lock().unwrap().clone();
        l
    }

    fn count(log: &[(Duration, String)], prefix: &str) -> usize {
        log.iter().filter(|(_, w)| w.starts_with(prefix)).count()
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_ceiling_and_starts_over() {
        let mut b = backoff();
        for round in 0..2 {
            for ceiling in [1, 2, 4, 8, 8, 8] {
                let p = b.next_pause();
                let c = ceiling * SEC;
                assert!(p >= c / 2 && p <= c, "round {round}: {p:?} for {c:?}");
            }
            b.reset();
        }
        // A ceiling below the start is the start.
        let mut b = Backoff::new(4 * SEC, SEC);
        for _ in 0..3 {
            assert!(b.next_pause() >= 2 * SEC);
        }
        // Jittered: not every pause is the same.
        let pauses: Vec<_> = (0..20)
            .map(|_| Backoff::new(SEC, SEC).next_pause())
            .collect();
        assert!(pauses.iter().any(|p| *p != pauses[0]), "{pauses:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn dead_endpoints_are_walked_round_robin_with_growing_pauses() {
        let log = run_until(&["down-a", "down-b"], Fake::new(SEC), |l| {
            count(l, "connect") >= 7
        })
        .await;
        let connects: Vec<_> = log
            .iter()
            .filter(|(_, w)| w.starts_with("connect"))
            .collect();
        let names: Vec<_> = connects.iter().map(|(_, w)| w.as_str()).collect();
        assert_eq!(
            &names[..4],
            [
                "connect down-a",
                "connect down-b",
                "connect down-a",
                "connect down-b"
            ]
        );
        for (i, ceiling) in [1, 2, 4, 8, 8, 8].into_iter().enumerate() {
            let gap = connects[i + 1].0 - connects[i].0;
            let c = ceiling * SEC;
            assert!(
                gap >= c / 2 && gap <= c,
                "pause {i}: {gap:?}, ceiling {c:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn it_registers_on_the_first_live_endpoint_then_beats_at_the_interval() {
        let log = run_until(&["down-a", "b", "c"], Fake::new(SEC), |l| {
            count(l, "beat") >= 3
        })
        .await;
        let what: Vec<_> = log.iter().map(|(_, w)| w.as_str()).collect();
        assert_eq!(
            what[..6],
            [
                "connect down-a",
                "failed down-a is down",
                "connect b",
                "connected 1 b",
                "register b",
                "beat b"
            ]
        );
        let beats: Vec<_> = log.iter().filter(|(_, w)| w == "beat b").collect();
        assert_eq!(beats[1].0 - beats[0].0, SEC);
        assert_eq!(beats[2].0 - beats[1].0, SEC);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_session_moves_on_only_when_the_member_is_gone() {
        let mut fake = Fake::new(SEC);
        let refused = Failure {
            switch: false,
            why: "refused".into(),
        };
        fake.register_answers.push_back(Err(refused));
        fake.beat_answers.push_back(Beat::Fail(Failure {
            switch: true,
            why: "gone".into(),
        }));
        let log = run_until(&["a", "b"], fake, |l| count(l, "beat b") >= 1).await;
        let what: Vec<_> = log.iter().map(|(_, w)| w.as_str()).collect();
        assert_eq!(
            what,
            [
                "connect a",
                "connected 0 a",
                "register a",
                "failed refused",
                // Refused: the same member again.
                "connect a",
                "connected 0 a",
                "register a",
                "beat a",
                "failed gone",
                // Gone: the next member, still registered (no new registration).
                "connect b",
                "connected 1 b",
                "beat b",
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn it_registers_again_when_the_member_asks_and_beats_on() {
        let mut fake = Fake::new(SEC);
        fake.beat_answers.push_back(Beat::Ok);
        fake.beat_answers.push_back(Beat::Register);
        let log = run_until(&["a"], fake, |l| count(l, "beat") >= 4).await;
        let what: Vec<_> = log.iter().map(|(_, w)| w.as_str()).collect();
        assert_eq!(
            what,
            [
                "connect a",
                "connected 0 a",
                "register a",
                "beat a",
                "beat a",
                "register a",
                "beat a",
                "beat a",
            ]
        );
        // Registering again does not wait: it follows the beat that asked for it at once.
        assert_eq!(log[5].0, log[4].0);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_any_wait_at_once() {
        let (stop, rx) = watch::channel(false);
        let fake = Fake::new(SEC);
        let log = fake.log.clone();
        // Stuck in a long backoff after the only endpoint failed.
        let hour = Duration::from_secs(3600);
        let task = spawn(&["down"], Backoff::new(hour, hour), fake, rx);
        while count(&log.lock().unwrap(), "failed") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = Instant::now();
        stop.send_replace(true);
        assert!(task.await.unwrap().0, "stopped by shutdown");
        assert!(t.elapsed() < SEC, "{:?}", t.elapsed());

        // Dropping the sender stops it too, with nothing to wait for at all.
        let (stop, rx) = watch::channel(false);
        let task = spawn(&[], backoff(), Fake::new(SEC), rx);
        drop(stop);
        let t = Instant::now();
        assert!(!task.await.unwrap().0, "stopped by the drop, not shutdown");
        assert!(t.elapsed() < SEC, "{:?}", t.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_ticks_while_a_wait_lasts() {
        let mut fake = Fake::new(Duration::from_secs(10));
        fake.tick = Some(SEC);
        let (stop, rx) = watch::channel(false);
        let task = spawn(&["a"], backoff(), fake, rx);
        // Registered at 0; the first beat is due at 10 s.
        tokio::time::sleep(Duration::from_millis(9_500)).await;
        stop.send_replace(true);
        assert_eq!(task.await.unwrap().1.ticks, 9);
    }
}
