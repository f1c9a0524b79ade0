//! The plain TCP data path: a taken connection spliced to one backend (bytes copied both ways,
//! with half-close), counted by the module's tracker. `lodge module` serves every connection
//! with it; a module that looks into the bytes (HTTP, a database protocol) writes its own and
//! uses the same guard.

use std::time::Duration;

use tokio::io::copy_bidirectional_with_sizes;
use tokio::net::TcpStream;

use super::tracker::ConnectionGuard;

/// Buffer of each direction.
pub const BUFFER: usize = 64 << 10;

/// How a forwarded connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both sides finished (each direction's end was passed on as a half-close).
    Closed { from_client: u64, to_client: u64 },
    /// The tracker asked the connection to close (shedding load).
    Shed,
}

/// Connects to `backend` (within `connect_timeout`) and relays bytes both ways until both
/// directions end. An end of stream on one side is passed on as a write shutdown to the other,
/// so request/response protocols that half-close work. The time to connect is the guard's
/// latency sample; a failure to connect or a broken relay counts as an error. The client
/// connection is closed when this returns (dropped).
pub async fn splice(
    mut guard: ConnectionGuard,
    client: TcpStream,
    backend: &str,
    connect_timeout: Duration,
) -> Result<Ended, String> {
    let connect = tokio::time::timeout(connect_timeout, TcpStream::connect(backend));
    let mut upstream = match connect.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            guard.record_error();
            return Err(format!("backend {backend}: {e}"));
        }
        Err(_) => {
            guard.record_error();
            return Err(format!(
                "backend {backend}: no connection within {connect_timeout:?}"
            ));
        }
    };
    guard.established();
    // Small writes (prompts, handshakes) must not wait for Nagle's timer.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let mut client = guard.counted(client);
    let shed = guard.shed();
    tokio::select! {
        r = copy_bidirectional_with_sizes(&mut client, &mut upstream, BUFFER, BUFFER) => match r {
            Ok((from_client, to_client)) => Ok(Ended::Closed { from_client, to_client }),
            Err(e) => {
                guard.record_error();
                Err(format!("relay: {e}"))
            }
        },
        () = shed => Ok(Ended::Shed),
    }
}
