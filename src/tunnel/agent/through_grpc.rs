//! The agent's loop and the port-forward ends over a real gRPC stack, against a stand-in router
//! that pairs sessions and forwards frames with the protocol's stream rules (no auth, no
//! timeouts). It checks what the in-memory `link_pair` cannot: tonic's streams, half-close as an
//! HTTP/2 end of stream, and the agent's listen/join/dispatch path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lodge_grpc::pb::router::tunnel_server::{Tunnel, TunnelServer};
use lodge_grpc::pb::router::{
    frame, user_init, Eof, Exec, Frame, ListenRequest, Paired, PortForward, Protocol, SessionOffer,
    UserInit,
};
use lodge_grpc::router_client::{new_session_key, RouterClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::timeout;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{listen_forever, Agent, OperationKind, Policy};
use crate::ctl::Connection;
use crate::tunnel::bridge::bridge_tcp;
use crate::tunnel::{Link, TunnelConn};

const STEP: Duration = Duration::from_secs(5);

type Outbound = mpsc::Sender<Result<Frame, Status>>;
/// What the agent's call hands to the waiting user's: its frames and where to send its frames.
type Joined = (Streaming<Frame>, Outbound);
type Listeners = Vec<mpsc::Sender<Result<SessionOffer, Status>>>;
/// Users waiting for an agent, by session key.
type Waiting = HashMap<String, (UserInit, oneshot::Sender<Joined>)>;

#[derive(Clone, Default)]
struct StandIn {
    listeners: Arc<Mutex<Listeners>>,
    listening: Arc<Notify>,
    waiting: Arc<Mutex<Waiting>>,
}

fn control(c: frame::Control) -> Frame {
    Frame {
        control: Some(c),
        ..Default::default()
    }
}

/// Frames from one side to the other, then `eof` once that side has finished sending. The
/// caller keeps `to` open until both directions are done: the calls end together.
async fn pump(mut from: Streaming<Frame>, to: &Outbound) {
    while let Ok(Some(f)) = from.message().await {
        if to.send(Ok(f)).await.is_err() {
            return;
        }
    }
    let _ = to.send(Ok(control(frame::Control::Eof(Eof {})))).await;
}

#[tonic::async_trait]
impl Tunnel for StandIn {
    type UserStream = ReceiverStream<Result<Frame, Status>>;
    type AgentStream = ReceiverStream<Result<Frame, Status>>;
    type ListenStream = ReceiverStream<Result<SessionOffer, Status>>;

    async fn user(
        &self,
        request: Request<Streaming<Frame>>,
    ) -> Result<Response<Self::UserStream>, Status> {
        let mut inbound = request.into_inner();
        let Some(frame::Control::UserInit(init)) = inbound.message().await?.and_then(|f| f.control)
        else {
            return Err(Status::invalid_argument("user_init first"));
        };
        let (joined_tx, joined) = oneshot::channel::<Joined>();
        self.waiting
            .lock()
            .unwrap()
            .insert(init.session_key.clone(), (init.clone(), joined_tx));
        let offer = SessionOffer {
            session_key: init.session_key.clone(),
            workflow_id: init.workflow_id.clone(),
            operation: "port-forward".into(),
        };
        for l in self.listeners.lock().unwrap().iter() {
            let _ = l.try_send(Ok(offer.clone()));
        }
        let (to_user, user_rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let Ok((agent_in, to_agent)) = joined.await else {
                return;
            };
            let paired = control(frame::Control::Paired(Paired { init: None }));
            if to_user.send(Ok(paired)).await.is_err() {
                return;
            }
            tokio::join!(pump(inbound, &to_agent), pump(agent_in, &to_user));
        });
        Ok(Response::new(ReceiverStream::new(user_rx)))
    }

    async fn agent(
        &self,
        request: Request<Streaming<Frame>>,
    ) -> Result<Response<Self::AgentStream>, Status> {
        let mut inbound = request.into_inner();
        let Some(frame::Control::AgentInit(init)) =
            inbound.message().await?.and_then(|f| f.control)
        else {
            return Err(Status::invalid_argument("agent_init first"));
        };
        let (user, joined) = self
            .waiting
            .lock()
            .unwrap()
            .remove(&init.session_key)
            .ok_or_else(|| Status::not_found("no such session"))?;
        let (to_agent, agent_rx) = mpsc::channel(8);
        let paired = control(frame::Control::Paired(Paired { init: Some(user) }));
        to_agent.send(Ok(paired)).await.unwrap();
        let _ = joined.send((inbound, to_agent));
        Ok(Response::new(ReceiverStream::new(agent_rx)))
    }

    async fn listen(
        &self,
        _request: Request<ListenRequest>,
    ) -> Result<Response<Self::ListenStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        self.listeners.lock().unwrap().push(tx);
        self.listening.notify_one();
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A stand-in router on the loopback with an agent listening to it (allowing `allow`); answers
/// a user's client of it.
pub(crate) async fn router_and_agent(allow: Vec<OperationKind>) -> RouterClient {
    let router = StandIn::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TunnelServer::new(router.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let conn = TunnelConn {
        conn: Connection {
            endpoint: endpoint.clone(),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_domain: None,
            json: false,
            token_file: None,
        },
    };
    let agent = Arc::new(Agent {
        workflow_id: "w".into(),
        policy: Policy {
            allow,
            udp: Default::default(),
        },
        verbose: false,
    });
    let (running, _) = mpsc::channel(1);
    tokio::spawn(listen_forever(conn, agent, running));
    timeout(STEP, router.listening.notified()).await.unwrap();
    let channel = lodge_grpc::client::connect(&endpoint, &Default::default())
        .await
        .unwrap();
    RouterClient::new(channel, None).unwrap()
}

fn user(operation: user_init::Operation) -> UserInit {
    UserInit {
        session_key: new_session_key(),
        workflow_id: "w".into(),
        operation: Some(operation),
    }
}

#[tokio::test]
async fn tcp_forward_with_half_close_through_grpc() {
    // Answers once it has read the whole request, as request-then-response protocols do.
    let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = service.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = service.accept().await.unwrap();
        let mut request = Vec::new();
        s.read_to_end(&mut request).await.unwrap();
        s.write_all(format!("got {} bytes", request.len()).as_bytes())
            .await
            .unwrap();
    });
    let router = router_and_agent(vec![OperationKind::PortForward]).await;
    let tunnel = timeout(
        STEP,
        router.open_user(user(user_init::Operation::PortForward(PortForward {
            protocol: Protocol::Tcp as i32,
            port: u32::from(port),
        }))),
    )
    .await
    .unwrap()
    .unwrap();
    let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(local.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = local.accept().await.unwrap();
    let bridged = tokio::spawn(bridge_tcp(accepted, Link::from(tunnel)));
    let request = vec![1u8; 300_000];
    client.write_all(&request).await.unwrap();
    client.shutdown().await.unwrap();
    let mut answer = String::new();
    timeout(STEP, client.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, "got 300000 bytes");
    assert_eq!(timeout(STEP, bridged).await.unwrap().unwrap(), Ok(()));
}

#[tokio::test]
async fn a_refused_exec_is_answered_through_grpc() {
    let router = router_and_agent(vec![OperationKind::PortForward]).await;
    let tunnel = timeout(
        STEP,
        router.open_user(user(user_init::Operation::Exec(Exec {
            command: vec!["true".into()],
            ..Default::default()
        }))),
    )
    .await
    .unwrap()
    .unwrap();
    let Link { tx, mut rx } = Link::from(tunnel);
    let mut exit = None;
    let mut stderr = Vec::new();
    while let Some(f) = timeout(STEP, rx.next()).await.unwrap() {
        let f = f.unwrap();
        match f.control {
            Some(frame::Control::Exit(e)) => exit = e.status,
            Some(frame::Control::Eof(_)) => break,
            _ => stderr.extend_from_slice(&f.data),
        }
    }
    drop(tx);
    assert!(timeout(STEP, rx.next()).await.unwrap().is_none());
    assert_eq!(
        exit,
        Some(lodge_grpc::pb::router::exit_status::Status::Code(126))
    );
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(stderr.contains("exec is not allowed"), "{stderr}");
}
