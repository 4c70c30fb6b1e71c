//! The MQTT endpoint: 3.1, 3.1.1 and 5.0 over TCP (`[server] mqtt`) and over
//! WebSocket (`/mqtt`, subprotocol `mqtt`), on the same channels as every other
//! transport. A topic that is a valid channel name *is* that channel: an MQTT
//! publish is stored with an id and reaches SSE, WebSocket and poll clients, and
//! an HTTP publish reaches MQTT subscribers. The username is ignored; the
//! password carries the token (or API key).

mod broker;
mod codec;
mod connection;
mod outbox;
mod session;
mod topic;

pub use broker::Broker;

use axum::{
    extract::{
        State, WebSocketUpgrade,
        ws::{Message as WsMessage, WebSocket},
    },
    response::{IntoResponse, Response},
};
use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::app::SharedState;

/// Accepts MQTT over TCP until shutdown.
pub fn spawn_tcp(state: SharedState, listener: TcpListener) {
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = state.shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(connection::serve(state.clone(), stream));
                }
                Err(e) => tracing::warn!(error = %e, "MQTT accept failed"),
            }
        }
    });
}

/// `GET /mqtt`: MQTT over WebSocket. Binary frames carry the MQTT byte
/// stream; a pipe turns them back into one so the connection code is shared.
pub(crate) async fn ws_upgrade(State(state): State<SharedState>, ws: WebSocketUpgrade) -> Response {
    // tungstenite's defaults allocate a 128 KiB read buffer per connection
    // (measured: 141.6 KB per idle MQTT-over-WebSocket connection); frames
    // carry MQTT packets, bounded like those over TCP.
    let limit = state.config.limits.max_payload + connection::PACKET_OVERHEAD;
    let ws = ws.read_buffer_size(512).write_buffer_size(16 * 1024).max_message_size(limit).max_frame_size(limit);
    ws.protocols(["mqtt"]).on_upgrade(move |socket| bridge(state, socket)).into_response()
}

async fn bridge(state: SharedState, socket: WebSocket) {
    let (mqtt_side, mut our_side) = tokio::io::duplex(64 * 1024);
    tokio::spawn(connection::serve(state, mqtt_side));
    let (mut sink, mut stream) = socket.split();
    // What the connection wrote, a WebSocket frame at a time; held for the
    // connection's life, so small (a burst goes out as several frames).
    let mut buf = vec![0u8; 1024];
    loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(WsMessage::Binary(b))) => if our_side.write_all(&b).await.is_err() { break },
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            n = our_side.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => if sink.send(WsMessage::Binary(bytes::Bytes::copy_from_slice(&buf[..n]))).await.is_err() { break },
            },
        }
    }
    let _ = sink.close().await;
}
