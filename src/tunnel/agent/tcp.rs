//! The agent's side of a TCP port-forward: one connection to the agent's loopback per session.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::TcpStream;

use crate::tunnel::bridge::bridge_tcp;
use crate::tunnel::Link;

/// Connects to `port` on the loopback and bridges it with `link` until both directions finish.
///
/// A failed connect ends the session by dropping the link, which the user side sees as the end
/// of its tunnel and answers by closing its local connection.
pub async fn serve_tcp(link: Link, port: u16) -> Result<(), String> {
    let stream = connect_loopback(port).await?;
    // Interactive protocols (shells, databases) send small writes; batching them here would add
    // latency on top of the tunnel's.
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY on the connection to port {port}: {e}"))?;
    bridge_tcp(stream, link).await
}

/// IPv4 loopback first, then IPv6 for a service that listens only on `::1`.
async fn connect_loopback(port: u16) -> Result<TcpStream, String> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match TcpStream::connect(v4).await {
        Ok(s) => Ok(s),
        Err(e4) if e4.kind() == std::io::ErrorKind::ConnectionRefused => {
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            TcpStream::connect(v6)
                .await
                .map_err(|_| format!("connecting to {v4}: {e4}"))
        }
        Err(e) => Err(format!("connecting to {v4}: {e}")),
    }
}
