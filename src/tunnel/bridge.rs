//! Carrying one TCP connection over a link, used by both ends of a TCP port-forward.
//!
//! Half-close travels both ways: when the socket reads end-of-file the link's sending half is
//! dropped (the other side gets `eof`), and an `eof` from the other side shuts down the socket's
//! write half, while the opposite direction keeps flowing until it finishes too.

use bytes::BytesMut;
use lodge_grpc::pb::router::{frame, Frame};
use lodge_grpc::router_client::{abort, data, MAX_CHUNK};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::{FrameRx, Link};

/// Bridges `stream` and `link` until both directions have finished, or until either fails.
///
/// An error (a reset socket, a session ended with a status) drops both halves of the link at
/// once and resets the socket, so that neither end mistakes a broken session for a clean end of
/// data.
pub async fn bridge_tcp(mut stream: TcpStream, link: Link) -> Result<(), String> {
    let result = pump(&mut stream, link).await;
    if result.is_err() {
        // Best effort: a socket that cannot take the option is closed normally instead.
        let _ = stream.set_zero_linger();
    }
    result
}

async fn pump(stream: &mut TcpStream, link: Link) -> Result<(), String> {
    let (reader, writer) = stream.split();
    let Link { tx, rx } = link;
    // Weak: it must not keep the sending half open past end-of-file (that is the half-close).
    let for_abort = tx.downgrade();
    let result = bridge_halves(reader, writer, tx, rx).await;
    if let (Err(e), Some(tx)) = (&result, for_abort.upgrade()) {
        // A broken local connection must fail the session, not look like a finished one.
        let _ = tx.send(abort(e.clone())).await;
    }
    result
}

async fn bridge_halves(
    reader: ReadHalf<'_>,
    writer: WriteHalf<'_>,
    tx: mpsc::Sender<Frame>,
    rx: FrameRx,
) -> Result<(), String> {
    let outbound = socket_to_link(reader, tx);
    let inbound = link_to_socket(rx, writer);
    tokio::pin!(outbound, inbound);
    let mut outbound_done = false;
    loop {
        tokio::select! {
            r = &mut outbound, if !outbound_done => {
                r?;
                outbound_done = true;
            }
            // The link's end means both directions are over (or the session broke): whatever the
            // socket still sends has nowhere to go.
            r = &mut inbound => return r,
        }
    }
}

/// Socket to link; dropping `tx` at end-of-file is what tells the other side.
async fn socket_to_link(mut reader: ReadHalf<'_>, tx: mpsc::Sender<Frame>) -> Result<(), String> {
    let mut buf = BytesMut::new();
    loop {
        // Each frame takes the bytes it carries without a copy; a fresh buffer is made only when
        // the previous one has no room left for a full chunk.
        buf.reserve(MAX_CHUNK);
        let n = reader
            .read_buf(&mut bytes::BufMut::limit(&mut buf, MAX_CHUNK))
            .await
            .map_err(|e| format!("reading the local connection: {e}"))?;
        if n == 0 {
            return Ok(());
        }
        if tx.send(data(buf.split().freeze())).await.is_err() {
            // The other side stopped receiving: the session is ending, and the inbound half
            // reports how.
            return Ok(());
        }
    }
}

/// Link to socket, until the link ends.
async fn link_to_socket(mut rx: FrameRx, mut writer: WriteHalf<'_>) -> Result<(), String> {
    while let Some(frame) = rx.next().await {
        let frame = frame.map_err(|s| format!("session ended: {:?}: {}", s.code(), s.message()))?;
        match frame.control {
            Some(frame::Control::Eof(_)) => {
                // Only the write half: the peer may still answer after reading end-of-file.
                writer
                    .shutdown()
                    .await
                    .map_err(|e| format!("half-closing the local connection: {e}"))?;
            }
            None => writer
                .write_all(&frame.data)
                .await
                .map_err(|e| format!("writing the local connection: {e}"))?,
            // Nothing else belongs in a TCP session; ignoring it keeps the bytes flowing.
            Some(_) => {}
        }
    }
    Ok(())
}
