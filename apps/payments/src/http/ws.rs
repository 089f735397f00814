//! `GET /v1/events`: the WebSocket of events.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use tokio::sync::broadcast::error::RecvError;

use crate::events::Event;
use crate::state::AppState;

pub(super) async fn events(State(state): State<AppState>, ws: WebSocketUpgrade) -> Response {
    let rx = state.events().subscribe();
    ws.on_upgrade(move |socket| stream_events(socket, rx))
}

async fn stream_events(
    mut socket: WebSocket,
    mut rx: tokio::sync::broadcast::Receiver<Arc<Event>>,
) {
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Ok(event) => {
                    if socket.send(Message::Text(event.to_json().into())).await.is_err() {
                        return;
                    }
                }
                // A slow subscriber misses some events rather than slowing
                // everyone down.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
