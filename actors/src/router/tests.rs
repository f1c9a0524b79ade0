//! The hub and session actors in a real runtime, over the in-memory owner store.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;

use super::hub::{Listen, Locate, Offer, SessionTable};
use super::owner::{MemoryStore, OwnerRecord};
use super::pipe::SideHandle;
use super::session::{Inspect, Join, Joiner, Terminate};
use super::*;
use crate::introspect::EventKind;
use crate::{ActorRef, Backoff, ChildSpec, Runtime, RuntimeConfig, Strategy, SupervisorSpec};

#[derive(Debug, PartialEq)]
struct F(&'static str);

impl Payload for F {
    fn payload_len(&self) -> usize {
        self.0.len()
    }
    fn eof() -> Self {
        F("eof")
    }
    fn abort_reason(&self) -> Option<String> {
        None
    }
}

struct Router {
    _rt: Runtime,
    hub: ActorRef<RouterHub<F>>,
    table: SessionTable<F>,
    store: Arc<MemoryStore>,
}

async fn router(settings: RouterSettings) -> Router {
    let store = Arc::new(MemoryStore::default());
    let hub: ActorRef<RouterHub<F>> = ActorRef::default();
    let table: SessionTable<F> = Default::default();
    let (h, t, s, settings) = (
        hub.clone(),
        table.clone(),
        store.clone(),
        Arc::new(settings),
    );
    let router = SupervisorSpec::new(Strategy::OneForAll, move || {
        let (sessions, sessions_ref) = ChildSpec::supervisor(
            "sessions",
            SupervisorSpec::new(Strategy::OneForOne, Vec::new),
        );
        let (t, s, settings) = (t.clone(), s.clone(), settings.clone());
        let hub = ChildSpec::actor_for("hub", &h, move || {
            let log = slog::Logger::root(slog::Discard, slog::o!());
            let store: Arc<dyn OwnerStore> = s.clone();
            RouterHub::new(
                settings.clone(),
                store,
                sessions_ref.clone(),
                t.clone(),
                RouterMetrics::default(),
                &log,
            )
        });
        vec![sessions, hub]
    });
    let root = SupervisorSpec::new(Strategy::OneForOne, move || {
        vec![ChildSpec::supervisor("router", router.clone()).0]
    });
    let config = RuntimeConfig {
        worker_arbiters: 2,
        backoff: Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(10),
            jitter: 0.5,
        },
        ..RuntimeConfig::default()
    };
    let rt = Runtime::start(config, slog::Logger::root(slog::Discard, slog::o!()), root);
    let mut events = rt.actor_table().subscribe();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let e = events.recv().await.unwrap();
            if &*e.path == "/node/router/hub" && e.event == EventKind::Started {
                return;
            }
        }
    })
    .await
    .expect("the hub started");
    Router {
        _rt: rt,
        hub,
        table,
        store,
    }
}

fn op() -> Operation {
    Operation {
        kind: OpKind::Exec,
        detail: "cat".into(),
    }
}

fn locate(key: &str, user: bool, relayed: bool) -> Locate<F> {
    Locate {
        session_key: key.into(),
        workflow_id: "wf".into(),
        operation: user.then(op),
        relayed,
        _frames: PhantomData,
    }
}

async fn local(r: &Router, key: &str, user: bool) -> ActorRef<SessionActor<F>> {
    match r.hub.send(locate(key, user, false)).await.unwrap().unwrap() {
        Route::Local(s) => s,
        Route::Remote { owner } => panic!("expected a local session, owned by {owner}"),
    }
}

fn joiner(
    side: Side,
) -> (
    Joiner<F>,
    super::pipe::Delivery<F>,
    oneshot::Receiver<super::pipe::Pump<F>>,
) {
    let (handle, delivery) = SideHandle::new(4);
    let (tx, rx) = oneshot::channel();
    let j = Joiner {
        side,
        workflow_id: "wf".into(),
        operation: (side == Side::User).then(op),
        handle,
        greeting: F("hello"),
        paired: tx,
    };
    (j, delivery, rx)
}

#[actix_rt::test]
async fn a_key_another_member_claimed_is_routed_there_but_never_relayed_twice() {
    let r = router(RouterSettings::default()).await;
    r.store.insert(OwnerRecord {
        session_key: "k".into(),
        workflow_id: "wf".into(),
        owner: 2,
        operation: None,
        created_at_ms: 0,
    });
    match r.hub.send(locate("k", true, false)).await.unwrap().unwrap() {
        Route::Remote { owner } => assert_eq!(owner, 2),
        Route::Local(_) => panic!("member 2 owns k"),
    }
    let relayed = r.hub.send(locate("k", true, true)).await.unwrap();
    assert!(matches!(relayed, Err(RouterError::Unavailable(_))));
}

#[actix_rt::test]
async fn concurrent_arrivals_share_one_claim_and_one_session() {
    let r = router(RouterSettings::default()).await;
    let (a, b) = tokio::join!(local(&r, "k", true), local(&r, "k", false));
    assert_eq!(r.store.claims(), 1, "one replicated write per session");
    assert!(Arc::ptr_eq(&a.cell().unwrap(), &b.cell().unwrap()));
    assert_eq!(r.store.record("k").unwrap().owner, 1);
    assert!(r.table.read().unwrap().contains_key("k"));
}

#[actix_rt::test]
async fn listening_agents_are_offered_local_and_remote_sessions() {
    let r = router(RouterSettings::default()).await;
    let (tx, mut offers) = mpsc::channel(8);
    r.hub
        .send(Listen {
            workflow_id: "wf".into(),
            tx,
        })
        .await
        .unwrap();
    local(&r, "here", true).await;
    let expect = |key: &str| Offer {
        session_key: key.into(),
        workflow_id: "wf".into(),
        operation: OpKind::Exec,
    };
    assert_eq!(offers.recv().await.unwrap(), expect("here"));
    // A user reached member 3 first; its record arrives through the watch.
    r.store.insert(OwnerRecord {
        session_key: "there".into(),
        workflow_id: "wf".into(),
        owner: 3,
        operation: Some(op()),
        created_at_ms: 0,
    });
    assert_eq!(offers.recv().await.unwrap(), expect("there"));
}

#[actix_rt::test]
async fn a_session_pairs_refuses_a_duplicate_and_releases_its_key_when_it_ends() {
    let r = router(RouterSettings::default()).await;
    let s = local(&r, "k", true).await;
    let (user, mut user_sees, user_paired) = joiner(Side::User);
    s.send(Join(user)).await.unwrap().unwrap();
    let (dup, _, _) = joiner(Side::User);
    assert!(matches!(
        s.send(Join(dup)).await.unwrap(),
        Err(RouterError::Duplicate(_))
    ));
    let (agent, mut agent_sees, agent_paired) = joiner(Side::Agent);
    s.send(Join(agent)).await.unwrap().unwrap();
    assert_eq!(user_sees.next().await, Some(Ok(F("hello"))));
    assert_eq!(agent_sees.next().await, Some(Ok(F("hello"))));
    let (_up, _down) = (user_paired.await.unwrap(), agent_paired.await.unwrap());
    let view = s.send(Inspect).await.unwrap().unwrap();
    assert!(view.paired && view.user_connected && view.agent_connected);

    assert!(s
        .send(Terminate {
            reason: "test".into()
        })
        .await
        .unwrap());
    assert!(
        matches!(user_sees.next().await, Some(Err(RouterError::Terminated(m))) if m.contains("test"))
    );
    assert!(matches!(
        agent_sees.next().await,
        Some(Err(RouterError::Terminated(_)))
    ));
    // The key is free again: its record is deleted and a new session can take it.
    tokio::time::timeout(Duration::from_secs(20), async {
        while r.store.record("k").is_some() || r.table.read().unwrap().contains_key("k") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the ended session released its key");
    let again = local(&r, "k", true).await;
    assert!(!Arc::ptr_eq(&again.cell().unwrap(), &s.cell().unwrap()));
}

#[actix_rt::test]
async fn a_lonely_side_times_out_with_deadline_exceeded() {
    let r = router(RouterSettings {
        rendezvous_timeout: Duration::from_millis(50),
        ..RouterSettings::default()
    })
    .await;
    let s = local(&r, "k", true).await;
    let (user, mut user_sees, _paired) = joiner(Side::User);
    s.send(Join(user)).await.unwrap().unwrap();
    assert!(
        matches!(user_sees.next().await, Some(Err(RouterError::TimedOut(m))) if m.contains("no agent"))
    );
}
