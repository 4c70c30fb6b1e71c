//! The MQTT endpoint: 3.1, 3.1.1 and 5.0 over TCP (`[server] mqtt`) and over
//! WebSocket (`/mqtt`, subprotocol `mqtt`), on the same channels as every other
//! transport. A topic that is a valid channel name *is* that channel: an MQTT
//! publish is stored with an id and reaches SSE, WebSocket and poll clients, and
//! an HTTP publish reaches MQTT subscribers. The username is ignored; the
//! password carries the token (or API key).

mod broker;
pub(crate) mod codec;
mod connection;
mod outbox;
mod persist;
mod session;
pub(crate) mod topic;

pub use broker::{Broker, MqttCounts};

use axum::response::{IntoResponse, Response};
use tokio::{io::AsyncWriteExt, net::TcpListener};

use crate::{
    edge::websocket::{ByteStream, WebSocket, switching_protocols},
    state::SharedState,
};

/// Accepts MQTT over TCP until shutdown; each connection is a task of `tracker`.
pub fn spawn_tcp(state: SharedState, listener: TcpListener, tracker: tokio_util::task::TaskTracker) {
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = state.shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    // No proxy speaks for MQTT over TCP: the peer is the client.
                    let client = crate::guard::Client { addr: state.guards.address.peer(addr.ip()).client() };
                    tracker.spawn(connection::serve(state.clone(), stream, client));
                }
                Err(e) => tracing::warn!(error = %e, "MQTT accept failed"),
            }
        }
    });
}

/// `/mqtt` through the router: the front door serves WebSocket handshakes
/// that are plain HTTP/1.1 GETs; anything else that reaches here cannot be one.
pub(crate) async fn not_upgradable() -> Response {
    crate::transport::ws::not_a_handshake("it must be an HTTP/1.1 GET with a head under 16 KiB").into_response()
}

/// MQTT over WebSocket (`/mqtt`, subprotocol `mqtt`) on a connection the
/// front door hands over: binary messages carry the MQTT byte stream, and the
/// connection is the same code as over TCP, on the same task.
pub(crate) async fn serve_websocket(opening: Box<crate::transport::ws::Opening>) {
    let Some((state, stream, client)) = Box::pin(upgrade(opening)).await else { return };
    connection::serve(state, stream, client).await;
}

/// Answers the handshake (no credential here: the CONNECT's password is it,
/// so the handshake counts as the address's request).
async fn upgrade(
    opening: Box<crate::transport::ws::Opening>,
) -> Option<(SharedState, ByteStream, crate::guard::Client)> {
    // Unboxed here, so the box is freed with this future, not kept by the task.
    let crate::transport::ws::Opening { mut tcp, state, request, early } = *opening;
    if let Err(e) = state.guards.check_request(request.client, crate::guard::Who::Anonymous) {
        let _ = crate::edge::front::write_whole(&mut tcp, e.into_response(), &state).await;
        return None;
    }
    let accept = match request.handshake.accept() {
        Ok(accept) => accept,
        Err(refusal) => {
            let _ = crate::edge::front::write_whole(&mut tcp, crate::transport::ws::refused(refusal), &state).await;
            return None;
        }
    };
    // `mqtt` (MQTT 3.1.1 and 5), or `mqttv3.1` from MQTT 3.1 clients.
    let protocol = request.handshake.choose(&["mqtt", "mqttv3.1"]);
    tcp.write_all(&switching_protocols(&accept, protocol)).await.ok()?;
    // Frames carry MQTT packets, bounded like those over TCP.
    let limit = state.config.limits.max_payload + connection::PACKET_OVERHEAD;
    Some((state, ByteStream::new(WebSocket::new(tcp, &early, limit)), request.client))
}
