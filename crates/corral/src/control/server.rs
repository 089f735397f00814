//! The primary's side of the control socket: one task per connection, each
//! turning one request into supervisor commands and answer lines.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinSet;

use super::bind::ControlListener;
use super::protocol::{ErrorKind, Request, Response, PROTOCOL_VERSION};
use super::{ControlCommand, ControlHandle};

/// A client gets this long to send its request after the hello.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests are a few dozen bytes; anything this long is not one.
const MAX_REQUEST: u64 = 64 * 1024;

/// Serves the control socket until the returned future is dropped or its
/// task aborted; that also ends every open connection and removes the socket.
pub(crate) async fn serve(mut listener: ControlListener, handle: ControlHandle) {
    let Some(bound) = listener.listener.take() else {
        return;
    };
    let socket = match tokio::net::UnixListener::from_std(bound) {
        Ok(socket) => socket,
        Err(err) => {
            tracing::error!(path = %listener.path().display(), "cannot serve the control socket: {err}");
            return;
        }
    };
    let shared = Arc::new(Shared {
        handle,
        name: listener.name.clone(),
        owner: nix::unistd::getuid().as_raw(),
    });
    // Owned here, so that dropping this future aborts every connection task.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = socket.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, shared.clone()));
                }
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("control socket: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

struct Shared {
    handle: ControlHandle,
    name: String,
    owner: u32,
}

async fn connection(stream: UnixStream, shared: Arc<Shared>) {
    let (read, mut write) = stream.into_split();
    let peer = write.as_ref().peer_cred();
    match peer {
        Ok(cred) if cred.uid() == shared.owner || cred.uid() == 0 => {}
        Ok(cred) => {
            tracing::warn!(
                uid = cred.uid(),
                pid = cred.pid(),
                "refused a control connection from uid {}: only uid {} and root may control this cluster",
                cred.uid(),
                shared.owner
            );
            let message = format!(
                "refused: uid {} may not control cluster `{}`; run corral as uid {} or root",
                cred.uid(),
                shared.name,
                shared.owner
            );
            let _ = send(&mut write, &error(ErrorKind::Refused, message)).await;
            return;
        }
        Err(err) => {
            tracing::warn!("refused a control connection whose peer is unknown: {err}");
            return;
        }
    }
    let hello = Response::Hello {
        protocol: PROTOCOL_VERSION,
        name: shared.name.clone(),
        pid: std::process::id(),
    };
    if send(&mut write, &hello).await.is_err() {
        return;
    }
    let mut read = BufReader::new(read);
    let mut line = String::new();
    let got = tokio::time::timeout(
        REQUEST_TIMEOUT,
        (&mut read).take(MAX_REQUEST).read_line(&mut line),
    )
    .await;
    let request = match got {
        // A client that only checks the socket is alive (a second primary of
        // the same name, `corral list`) hangs up without asking anything.
        Ok(Ok(0)) => return,
        Ok(Ok(_)) => serde_json::from_str::<Request>(line.trim_end()),
        Ok(Err(err)) => {
            tracing::debug!("control connection: {err}");
            return;
        }
        Err(_) => {
            let message = format!("no request within {REQUEST_TIMEOUT:?}");
            let _ = send(&mut write, &error(ErrorKind::BadRequest, message)).await;
            return;
        }
    };
    let request = match request {
        Ok(request) => request,
        Err(err) => {
            let message = format!(
                "not a control request ({err}); this cluster speaks control protocol {PROTOCOL_VERSION}"
            );
            let _ = send(&mut write, &error(ErrorKind::BadRequest, message)).await;
            return;
        }
    };
    let _ = answer(request, &shared.handle, &mut read, &mut write).await;
}

async fn answer(
    request: Request,
    handle: &ControlHandle,
    read: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    match request {
        Request::Status => {
            let status = (handle.status)();
            send(write, &Response::Status { status }).await
        }
        Request::Reload => {
            let (done, outcome) = oneshot::channel();
            let reply = match command(handle, ControlCommand::Reload { done }, write).await? {
                false => return Ok(()),
                true => match outcome.await {
                    Ok(Ok(generation)) => Response::Reloaded { generation },
                    Ok(Err(reason)) => error(ErrorKind::Failed, reason),
                    Err(_) => dropped("reload"),
                },
            };
            send(write, &reply).await
        }
        Request::Scale { target } => {
            let (done, outcome) = oneshot::channel();
            let reply = match command(handle, ControlCommand::Scale { target, done }, write).await?
            {
                false => return Ok(()),
                true => match outcome.await {
                    Ok(Ok(workers)) => Response::Scaled { workers },
                    Ok(Err(reason)) => error(ErrorKind::Failed, reason),
                    Err(_) => dropped("scale"),
                },
            };
            send(write, &reply).await
        }
        Request::Stop => {
            let (done, outcome) = oneshot::channel();
            if !command(handle, ControlCommand::Stop { done }, write).await? {
                return Ok(());
            }
            // The supervisor may be gone by the time it would answer; the
            // stop has begun either way.
            let _ = outcome.await;
            send(
                write,
                &Response::Stopping {
                    pid: std::process::id(),
                },
            )
            .await
        }
        Request::Logs {
            slot,
            lines,
            follow,
        } => {
            let mut updates = handle.logs.subscribe();
            let mut last_seq = None;
            for entry in handle.logs.recent(slot, lines) {
                last_seq = Some(entry.seq);
                send(write, &Response::Log((*entry.line).clone())).await?;
            }
            if !follow {
                return send(write, &Response::End).await;
            }
            let mut probe = [0u8; 64];
            loop {
                tokio::select! {
                    update = updates.recv() => match update {
                        Ok(entry) => {
                            if last_seq.is_some_and(|seq| entry.seq <= seq)
                                || slot.is_some_and(|wanted| wanted != entry.line.slot)
                            {
                                continue;
                            }
                            send(write, &Response::Log((*entry.line).clone())).await?;
                        }
                        Err(broadcast::error::RecvError::Lagged(lines)) => {
                            send(write, &Response::Skipped { lines }).await?;
                        }
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    },
                    // The client sends nothing more; a read returning means it hung up.
                    _ = read.read(&mut probe) => return Ok(()),
                }
            }
        }
    }
}

/// Hands `command` to the supervisor and tells the client so; false (with an
/// error sent) when the supervisor no longer takes commands.
async fn command(
    handle: &ControlHandle,
    command: ControlCommand,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<bool> {
    if handle.commands.send(command).await.is_err() {
        let message = "the cluster is shutting down and takes no more commands".to_owned();
        send(write, &error(ErrorKind::Failed, message)).await?;
        return Ok(false);
    }
    send(write, &Response::Accepted).await?;
    Ok(true)
}

fn dropped(what: &str) -> Response {
    error(
        ErrorKind::Failed,
        format!("the supervisor ended the {what} without an outcome (is the cluster stopping?)"),
    )
}

fn error(kind: ErrorKind, message: String) -> Response {
    Response::Error { kind, message }
}

async fn send(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await
}
