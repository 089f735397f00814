//! Redis pub/sub as a [`BroadcastBackend`]: `PUBLISH` on a connection the
//! `redis` crate keeps alive, `SUBSCRIBE` on a dedicated connection that is
//! pinged, so a silently dead one is noticed too.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use super::backend::{BroadcastBackend, FrameStream};
use crate::error::{BoxError, Error, Result};

/// Redis pub/sub: every node publishes to one channel and subscribes to it.
///
/// Made by [`BroadcastConfig::redis`](super::BroadcastConfig::redis); build
/// one directly only to pass it to a [`BroadcastConfig::backend`](super::BroadcastConfig::backend)
/// with settings of your own.
///
/// ```no_run
/// use std::time::Duration;
/// let redis = corral::broadcast::RedisBackend::new(
///     "redis://127.0.0.1:6379",
///     "corral:payments:0:broadcast",
///     Duration::from_secs(2),
/// )?;
/// # Ok::<(), corral::Error>(())
/// ```
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    channel: String,
    /// Connect, response and ping deadline.
    timeout: Duration,
    /// Made on first use: `ConnectionManager` starts a task, which needs the
    /// runtime that only the publishing task is sure to run on.
    publisher: OnceCell<ConnectionManager>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl RedisBackend {
    /// A backend for the server at `url` (`redis://HOST:PORT[/DB]`, with
    /// `redis://:PASSWORD@HOST...` or `redis://USER:PASSWORD@HOST...` when the
    /// server wants one) on `channel`. Nothing connects until the broadcast
    /// starts; an unreachable server is retried then, never an error here.
    pub fn new(url: &str, channel: impl Into<String>, timeout: Duration) -> Result<Self> {
        let client = parse(url)?;
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                client,
                channel: channel.into(),
                timeout,
                publisher: OnceCell::new(),
            }),
        })
    }

    /// The database number in the URL (0 when it names none).
    pub(crate) fn db(url: &str) -> Result<i64> {
        Ok(parse(url)?.get_connection_info().redis_settings().db())
    }
}

/// Checks a `--broadcast` URL the way the crate will read it.
fn parse(url: &str) -> Result<redis::Client> {
    if !url.contains("://") {
        return Err(Error::Config(format!(
            "`{url}` is not a Redis URL: write it as redis://HOST:PORT[/DB]"
        )));
    }
    redis::Client::open(url).map_err(|err| {
        Error::Config(format!(
            "`{}` is not a Redis URL the client can use ({err}): write it as redis://HOST:PORT[/DB]",
            redact(url)
        ))
    })
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl Inner {
    async fn publisher(&self) -> Result<ConnectionManager, BoxError> {
        let manager = self
            .publisher
            .get_or_try_init(|| async {
                // The crate reconnects this connection by itself; a failed
                // publish is retried by corral with its own back-off, so the
                // crate's retries stay few and short.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(2)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(self.timeout);
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            })
            .await?;
        Ok(manager.clone())
    }
}

impl BroadcastBackend for RedisBackend {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn describe(&self) -> String {
        let info = self.inner.client.get_connection_info();
        format!(
            "redis {}/{} channel {}",
            info.addr(),
            info.redis_settings().db(),
            self.inner.channel
        )
    }

    fn publish(&self, frames: Vec<Bytes>) -> BoxFuture<'static, Result<(), BoxError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut connection = inner.publisher().await?;
            // One pipeline on one connection: one round trip for the batch,
            // and Redis runs the commands in the order they were written.
            let mut pipeline = redis::pipe();
            for frame in &frames {
                pipeline
                    .cmd("PUBLISH")
                    .arg(&inner.channel)
                    .arg(frame.as_ref())
                    .ignore();
            }
            pipeline.query_async::<()>(&mut connection).await?;
            Ok(())
        })
    }

    fn subscribe(&self) -> BoxFuture<'static, Result<FrameStream, BoxError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let timeout = inner.timeout;
            let pubsub = tokio::time::timeout(timeout, inner.client.get_async_pubsub())
                .await
                .map_err(|_| format!("no connection within {timeout:?}"))??;
            let (mut sink, stream) = pubsub.split();
            tokio::time::timeout(timeout, sink.subscribe(&inner.channel))
                .await
                .map_err(|_| format!("no answer to SUBSCRIBE within {timeout:?}"))??;
            let mut probe = tokio::time::interval(timeout);
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            probe.reset();
            let frames = futures_util::stream::unfold(
                Some((sink, stream, probe)),
                move |state| async move {
                    let (mut sink, mut stream, mut probe) = state?;
                    loop {
                        tokio::select! {
                            message = stream.next() => {
                                let Some(message) = message else {
                                    return Some((Err("the server closed the connection".into()), None));
                                };
                                let frame = Bytes::copy_from_slice(message.get_payload_bytes());
                                return Some((Ok(frame), Some((sink, stream, probe))));
                            }
                            _ = probe.tick() => {
                                // A half-open TCP connection delivers nothing and
                                // reports nothing; an unanswered PING finds it.
                                match tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await {
                                    Ok(Ok(_)) => {}
                                    Ok(Err(err)) => {
                                        return Some((Err(format!("PING failed: {err}").into()), None));
                                    }
                                    Err(_) => {
                                        let reason = format!("no answer to PING within {timeout:?}");
                                        return Some((Err(reason.into()), None));
                                    }
                                }
                            }
                        }
                    }
                },
            );
            let frames: FrameStream = Box::pin(frames);
            Ok(frames)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_with_a_sentence_that_says_how_to_write_one() {
        let err = parse("localhost:6379").unwrap_err().to_string();
        assert!(err.contains("redis://HOST:PORT[/DB]"), "{err}");
        let err = parse("http://localhost").unwrap_err().to_string();
        assert!(err.contains("`http://localhost`"), "{err}");
        assert!(parse("redis://127.0.0.1:6379/2").is_ok());
        assert_eq!(RedisBackend::db("redis://127.0.0.1:6379/2").unwrap(), 2);
        assert_eq!(RedisBackend::db("redis://127.0.0.1").unwrap(), 0);
    }

    #[test]
    fn passwords_stay_out_of_messages_and_descriptions() {
        assert_eq!(
            redact("redis://user:secret@host:1/0"),
            "redis://***@host:1/0"
        );
        let backend = RedisBackend::new(
            "redis://:secret@127.0.0.1:6379/3",
            "c",
            Duration::from_secs(1),
        )
        .unwrap();
        let text = backend.describe();
        assert_eq!(text, "redis 127.0.0.1:6379/3 channel c");
        assert!(!format!("{backend:?}").contains("secret"));
    }
}
