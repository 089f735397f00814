//! Durable asynchronous settlement batches.
//!
//! A 202 is answered only after the batch body is stored with a lease held by
//! this process. The lease is renewed while the job waits and runs; if the
//! process dies, the lease runs out and any process's sweeper claims the job
//! (a single UPDATE, so only one does) and runs it again from the stored
//! body. The final commit checks the lease inside the write transaction, so
//! even a slow former owner can never settle a batch twice.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use crate::compute::{Admission, HeavyError, Overloaded};
use crate::domain::ids::new_batch_id;
use crate::domain::settlement::{check_all, count_lines, split_header, BatchResult};
use crate::events::Event;
use crate::state::AppState;
use crate::store::{now_ms, StoreError};

/// Why a job was not stored or did not finish here.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// No room for more heavy work right now; nothing was stored.
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The heavy task failed.
    #[error(transparent)]
    Heavy(#[from] HeavyError),
}

fn lease_until(state: &AppState) -> i64 {
    now_ms() + state.config().lease.as_millis() as i64
}

/// Store a batch (whose header was already checked) as a job leased to this
/// process, and start it. Admission comes first, so an overloaded process
/// answers 503 before anything is stored; once stored, the job keeps its
/// place and waits for a pool thread.
pub async fn submit(state: &AppState, body: Bytes) -> Result<String, JobError> {
    let admission = state.heavy().try_admit()?;
    let batch_id = new_batch_id();
    let st = state.clone();
    let id = batch_id.clone();
    // The job runs from the body in hand (a cheap clone of the same bytes)
    // rather than reading back the stored copy, which would hold the batch
    // in memory twice more while the database hands it over.
    let in_hand = body.clone();
    state
        .store()
        .blocking(move |store| {
            let total = split_header(&body).map(count_lines).unwrap_or(0) as u64;
            store.enqueue_batch(&id, &body, total, st.owner(), lease_until(&st))
        })
        .await?;
    let st = state.clone();
    let id = batch_id.clone();
    tokio::spawn(async move {
        if let Err(e) = run_with(&st, &id, Some(admission), Some(in_hand)).await {
            // The lease will run out and a sweeper will retry the job.
            tracing::warn!(batch_id = %id, error = %e, "settlement job failed; will be retried");
        }
    });
    Ok(batch_id)
}

/// Run one job to completion. Returns `None` if the lease was lost (another
/// process finishes it) or the job is already done.
pub async fn run(state: &AppState, batch_id: &str) -> Result<Option<BatchResult>, JobError> {
    run_with(state, batch_id, None, None).await
}

async fn run_with(
    state: &AppState,
    batch_id: &str,
    admission: Option<Admission>,
    body: Option<Bytes>,
) -> Result<Option<BatchResult>, JobError> {
    let renewer = {
        let st = state.clone();
        let id = batch_id.to_owned();
        let every = (state.config().lease / 3).max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let s = st.clone();
                let id2 = id.clone();
                let kept = st
                    .store()
                    .blocking(move |store| {
                        store.renew_lease(&id2, s.owner(), lease_until(&s), None)
                    })
                    .await;
                if !matches!(kept, Ok(true)) {
                    break;
                }
            }
        })
    };
    let outcome = run_inner(state, batch_id, admission, body).await;
    renewer.abort();
    outcome
}

async fn run_inner(
    state: &AppState,
    batch_id: &str,
    admission: Option<Admission>,
    body: Option<Bytes>,
) -> Result<Option<BatchResult>, JobError> {
    let body = match body {
        Some(body) => body,
        None => {
            let id = batch_id.to_owned();
            match state.store().blocking(move |s| s.batch_body(&id)).await? {
                Some(body) => Bytes::from(body),
                None => return Ok(None),
            }
        }
    };
    let st = state.clone();
    let id = batch_id.to_owned();
    // Already accepted (a 202 was sent), so wait for the pool, never reject.
    let work = move || -> Result<Option<BatchResult>, StoreError> {
        let data = split_header(&body).unwrap_or(&[]);
        let total = count_lines(data) as u64;
        let started = std::time::Instant::now();
        let lines = check_all(data, st.merchants(), |done| {
            let done = done as u64;
            // Progress doubles as a lease renewal; a failed write only
            // delays the progress report.
            let _ = st
                .store()
                .renew_lease(&id, st.owner(), lease_until(&st), Some(done));
            st.events()
                .publish(Event::settlement_progress(&id, done, total));
        });
        st.metrics().settlement_checked(&lines, started.elapsed());
        st.store().settle(&id, &lines, Some(st.owner()))
    };
    let settled = match admission {
        Some(a) => state.heavy().run_admitted(a, work).await??,
        None => state.heavy().run(work).await??,
    };
    if let Some(result) = &settled {
        publish_completed(state, result);
    }
    Ok(settled)
}

/// Tell subscribers a batch finished.
pub fn publish_completed(state: &AppState, result: &BatchResult) {
    let data = serde_json::to_value(result).unwrap_or(Value::Null);
    state.events().publish(Event::settlement_completed(data));
}

/// Claim every job whose lease ran out and run them all to completion.
/// Returns how many were claimed. Called at start-up and by the sweeper.
pub async fn recover(state: &AppState) -> Result<usize, JobError> {
    let st = state.clone();
    let ids = state
        .store()
        .blocking(move |s| s.claim_expired(st.owner(), lease_until(&st)))
        .await?;
    let n = ids.len();
    let runs: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let st = state.clone();
            tokio::spawn(async move { run(&st, &id).await })
        })
        .collect();
    for r in runs {
        match r.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "recovered settlement job failed"),
            Err(e) => tracing::warn!(error = %e, "recovered settlement job panicked"),
        }
    }
    Ok(n)
}

/// Start the background sweeper: recover at once, then every half lease.
/// Must be called inside a tokio runtime; stops when the handle is aborted.
pub fn start_sweeper(state: &AppState) -> tokio::task::JoinHandle<()> {
    let state = state.clone();
    let every = (state.config().lease / 2).max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let st = state.clone();
            // Jobs run in their own tasks so one long batch does not stop
            // the sweeper from claiming others.
            tokio::spawn(async move {
                if let Err(e) = recover(&st).await {
                    tracing::warn!(error = %e, "settlement sweeper failed");
                }
            });
        }
    })
}
