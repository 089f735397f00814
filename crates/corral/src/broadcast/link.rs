//! The two tasks that tie a node to the others through a backend: one
//! publishes this node's frames in order, retrying with back-off; one keeps a
//! subscription up, reconnecting with back-off, and turns arriving frames into
//! deliveries while counting what was missed.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::backend::BroadcastBackend;
use super::envelope::{DecodeError, Frame};
use super::queue::{QueueReceiver, QueueSender, Refused};
use super::sequence::{Gap, Senders, Verdict};
use super::stats::Counters;
use super::{BroadcastOptions, Delivered, NodeId};

/// Gaps found this soon after a reconnect are put down to the outage in
/// their log line; later ones to a sender's full queue or a lost frame.
const OUTAGE_BLAME: Duration = Duration::from_secs(10);

/// What both tasks share.
pub(crate) struct Link {
    pub backend: Arc<dyn BroadcastBackend>,
    pub node: NodeId,
    pub counters: Arc<Counters>,
    pub options: BroadcastOptions,
    pub cancel: CancellationToken,
}

fn backoff(options: &BroadcastOptions) -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(options.reconnect_min)
        .with_max_delay(options.reconnect_max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Waits `delay`; false when the broadcast is stopping instead.
async fn pause(cancel: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// The most frames sent in one batch, and their most bytes.
const BATCH_FRAMES: usize = 256;
const BATCH_BYTES: usize = 1 << 20;

/// Publishes the queued frames in order, as many as have queued up in one
/// batch; when the queue is empty, a heartbeat naming the last sequence number
/// handed out, so receivers notice messages lost at the end of a burst.
pub(crate) async fn publish_loop(
    link: Arc<Link>,
    mut queue: QueueReceiver<Bytes>,
    last_seq: Arc<Mutex<u64>>,
) {
    let mut heartbeat = tokio::time::interval(link.options.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (batch, messages) = tokio::select! {
            biased;
            _ = link.cancel.cancelled() => return,
            frame = queue.recv() => match frame {
                Some(frame) => {
                    let mut bytes = frame.len();
                    let mut batch = vec![frame];
                    while batch.len() < BATCH_FRAMES && bytes < BATCH_BYTES {
                        let Some(frame) = queue.try_recv() else { break };
                        bytes += frame.len();
                        batch.push(frame);
                    }
                    let messages = batch.len() as u64;
                    (batch, messages)
                }
                None => return,
            },
            _ = heartbeat.tick() => {
                // Under the lock that numbers and queues messages: an empty
                // queue then means every number up to `last` is published
                // or was dropped.
                let last = *last_seq.lock().unwrap_or_else(|p| p.into_inner());
                if !queue.is_empty() {
                    continue;
                }
                let frame = Frame::Heartbeat { node: link.node.as_str(), last }.encode();
                (vec![Bytes::from(frame)], 0)
            }
        };
        if !publish_batch(&link, batch, messages).await {
            return;
        }
    }
}

/// Publishes one batch holding `messages` messages, retrying it with back-off
/// until it goes (a lone heartbeat is not retried: the next one says the
/// same). False when the broadcast is stopping.
async fn publish_batch(link: &Link, batch: Vec<Bytes>, messages: u64) -> bool {
    let mut delays = backoff(&link.options);
    let mut failing: Option<(Instant, u64)> = None;
    loop {
        let deadline = link.options.timeout * 2;
        let outcome = tokio::select! {
            _ = link.cancel.cancelled() => return false,
            outcome = tokio::time::timeout(deadline, link.backend.publish(batch.clone())) => outcome,
        };
        let error = match outcome {
            Ok(Ok(())) => {
                Counters::add(&link.counters.published, messages);
                if let Some((since, attempts)) = failing {
                    tracing::warn!(
                        "broadcast: publishing to {} again after {:.1?} of errors ({attempts} failed attempts); the messages queued meanwhile follow in order",
                        link.backend.describe(),
                        since.elapsed()
                    );
                }
                return true;
            }
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!("no answer within {deadline:?}"),
        };
        Counters::add(&link.counters.publish_errors, 1);
        if messages == 0 {
            tracing::debug!("broadcast: heartbeat not published: {error}");
            return true;
        }
        match &mut failing {
            None => {
                tracing::warn!(
                    "broadcast: cannot publish to {} ({error}); retrying with back-off while new messages wait in the queue (at most {} messages, {} KiB; more are dropped and counted)",
                    link.backend.describe(),
                    link.options.queue_messages,
                    link.options.queue_bytes >> 10
                );
                failing = Some((Instant::now(), 1));
            }
            Some((_, attempts)) => {
                *attempts += 1;
                tracing::debug!("broadcast: publish attempt {attempts} failed: {error}");
            }
        }
        let delay = delays.next().unwrap_or(link.options.reconnect_max);
        if !pause(&link.cancel, delay).await {
            return false;
        }
    }
}

/// The receiving side's state across reconnections.
struct Receiver {
    link: Arc<Link>,
    deliveries: QueueSender<Delivered>,
    senders: Senders,
    /// When the last outage ended, and how long it lasted.
    last_outage: Option<(Instant, Duration)>,
    malformed_logged: Option<Instant>,
}

/// Keeps a subscription up for as long as the broadcast runs.
pub(crate) async fn subscribe_loop(link: Arc<Link>, deliveries: QueueSender<Delivered>) {
    let mut receiver = Receiver {
        senders: Senders::new(link.options.forget_after),
        link,
        deliveries,
        last_outage: None,
        malformed_logged: None,
    };
    receiver.run().await
}

impl Receiver {
    async fn run(&mut self) {
        let link = self.link.clone();
        let target = link.backend.describe();
        let mut delays = backoff(&link.options);
        // Set once the subscription was up and is lost; an unreachable server
        // at start is not an outage of a running link.
        let mut down_since: Option<Instant> = None;
        let mut failing_since: Option<Instant> = None;
        let mut last_warning = Instant::now();
        loop {
            let attempt = tokio::select! {
                _ = link.cancel.cancelled() => return,
                _ = self.deliveries.closed() => return,
                attempt = tokio::time::timeout(link.options.timeout * 2, link.backend.subscribe()) => attempt,
            };
            let mut frames = match attempt {
                Ok(Ok(frames)) => frames,
                failed => {
                    let error = match failed {
                        Ok(Err(err)) => err.to_string(),
                        _ => "no answer in time".to_owned(),
                    };
                    let now = Instant::now();
                    match failing_since {
                        None => {
                            tracing::warn!(
                                "broadcast: cannot subscribe to {target} ({error}); retrying with back-off, and messages from other nodes are missed until then"
                            );
                            failing_since = Some(now);
                            last_warning = now;
                        }
                        Some(since)
                            if now.duration_since(last_warning) >= Duration::from_secs(60) =>
                        {
                            tracing::warn!(
                                "broadcast: still cannot subscribe to {target} after {:.0?} ({error})",
                                now.duration_since(since)
                            );
                            last_warning = now;
                        }
                        Some(_) => tracing::debug!("broadcast: subscribe failed: {error}"),
                    }
                    let delay = delays.next().unwrap_or(link.options.reconnect_max);
                    if !pause(&link.cancel, delay).await {
                        return;
                    }
                    continue;
                }
            };
            failing_since = None;
            delays = backoff(&link.options);
            link.counters.connected.store(true, Ordering::Relaxed);
            let now = Instant::now();
            // The outage must not age the senders out: their next number is
            // what shows what was missed.
            self.senders.touch_all(now);
            match down_since.take() {
                Some(since) => {
                    let down = now.duration_since(since);
                    Counters::add(&link.counters.reconnects, 1);
                    Counters::add(&link.counters.down_ms, down.as_millis() as u64);
                    self.last_outage = Some((now, down));
                    tracing::warn!(
                        "broadcast: subscribed to {target} again after {down:.1?} down; what other nodes published meanwhile is lost (pub/sub keeps no history) and is counted per sender from their sequence numbers"
                    );
                }
                None => tracing::info!("broadcast: subscribed to {target} as node {}", link.node),
            }
            let mut prune = tokio::time::interval(link.options.forget_after / 4);
            prune.reset();
            let reason = loop {
                tokio::select! {
                    _ = link.cancel.cancelled() => return,
                    _ = prune.tick() => {
                        self.senders.forget_silent(Instant::now());
                        link.counters.senders.store(self.senders.len() as u64, Ordering::Relaxed);
                    }
                    frame = frames.next() => match frame {
                        Some(Ok(frame)) => {
                            if !self.on_frame(frame) {
                                return;
                            }
                        }
                        Some(Err(err)) => break err.to_string(),
                        None => break "the subscription ended".to_owned(),
                    }
                }
            };
            link.counters.connected.store(false, Ordering::Relaxed);
            down_since = Some(Instant::now());
            tracing::warn!(
                "broadcast: lost the subscription to {target} ({reason}); reconnecting with back-off"
            );
            let delay = delays.next().unwrap_or(link.options.reconnect_max);
            if !pause(&link.cancel, delay).await {
                return;
            }
        }
    }

    /// Handles one frame; false once nobody takes deliveries any more.
    fn on_frame(&mut self, bytes: Bytes) -> bool {
        let frame = match Frame::decode(&bytes) {
            Ok(frame) => frame,
            Err(err) => {
                self.malformed(err);
                return true;
            }
        };
        if frame.node() == self.link.node.as_str() {
            // Delivered locally when it was published.
            return true;
        }
        let now = Instant::now();
        let counters = &self.link.counters;
        match frame {
            Frame::Message {
                node,
                slot,
                seq,
                payload,
            } => match self.senders.message(node, seq, now) {
                Verdict::Duplicate => {
                    Counters::add(&counters.duplicates, 1);
                    tracing::debug!("broadcast: skipped a repeated message {seq} from node {node}");
                }
                Verdict::Deliver { gap } => {
                    if let Some(gap) = gap {
                        self.report_gap(node, gap, now);
                    }
                    let delivered = Delivered {
                        from_node: NodeId::from(node),
                        from_slot: slot as usize,
                        payload: bytes.slice_ref(payload),
                        local: false,
                    };
                    match self.deliveries.try_push(delivered, payload.len()) {
                        Ok(()) => Counters::add(&counters.received, 1),
                        Err(Refused::Closed) => return false,
                        // Counted and logged by the queue.
                        Err(Refused::Count | Refused::Bytes) => {}
                    }
                }
            },
            Frame::Heartbeat { node, last } => {
                if let Some(gap) = self.senders.heartbeat(node, last, now) {
                    self.report_gap(node, gap, now);
                }
            }
        }
        counters
            .senders
            .store(self.senders.len() as u64, Ordering::Relaxed);
        true
    }

    fn report_gap(&self, node: &str, gap: Gap, now: Instant) {
        let counters = &self.link.counters;
        Counters::add(&counters.gaps, 1);
        Counters::add(&counters.missed, gap.missed());
        let cause = match self.last_outage {
            Some((ended, down)) if now.duration_since(ended) < OUTAGE_BLAME => {
                format!("while this node's subscription was down for {down:.1?}")
            }
            _ => "dropped by the sender's full queue or lost on the way".to_owned(),
        };
        tracing::warn!(
            "broadcast: missed {} message(s) from node {node} (sequence {}..={}), {cause}",
            gap.missed(),
            gap.first,
            gap.last
        );
    }

    fn malformed(&mut self, err: DecodeError) {
        Counters::add(&self.link.counters.malformed, 1);
        let now = Instant::now();
        if self
            .malformed_logged
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10))
        {
            self.malformed_logged = Some(now);
            tracing::warn!(
                "broadcast: skipped {err} on {} ({} such frames in all)",
                self.link.backend.describe(),
                self.link.counters.malformed.load(Ordering::Relaxed)
            );
        }
    }
}
