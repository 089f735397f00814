//! One submitted task: the future its caller awaits, the context it runs
//! with, and the state they share to agree on cancellation.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::time::Sleep;

use super::{Core, Pool, PoolError};

/// The result channel doubles as the cancellation flag: the caller drops
/// the receiving end when it stops waiting, and the pool thread sees the
/// sending end closed. No other shared state, no extra allocation.
trait Closed: Sync {
    fn closed(&self) -> bool;
}

impl<T: Send> Closed for oneshot::Sender<T> {
    fn closed(&self) -> bool {
        self.is_closed()
    }
}

/// What a running task can ask about itself; given to the closures of
/// [`Pool::run_with`] and [`Pool::try_run_with`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let pool = corral::pool::Pool::builder().threads(1).build().unwrap();
/// let sum = pool
///     .run_with(|cx| {
///         let mut sum = 0u64;
///         for i in 0..1_000_000u64 {
///             // Stop early once nobody waits for the answer.
///             if i % 10_000 == 0 && cx.is_cancelled() {
///                 return None;
///             }
///             sum += i;
///         }
///         Some(sum)
///     })
///     .await
///     .unwrap();
/// assert_eq!(sum, Some(499_999_500_000));
/// # }
/// ```
pub struct TaskContext<'a> {
    done: &'a dyn Closed,
}

impl TaskContext<'_> {
    /// True once the task's [`Task`] was dropped or timed out: nobody will
    /// read the result, so a long task should return early.
    pub fn is_cancelled(&self) -> bool {
        self.done.closed()
    }
}

/// Runs one task on a pool thread, or skips it if its caller stopped
/// waiting first. The task holds one of `core.permits`, forgotten at
/// admission; it is given back here.
pub(crate) fn execute<T, F>(
    core: Arc<Core>,
    admitted: Instant,
    f: F,
    done: oneshot::Sender<Result<T, PoolError>>,
) where
    F: FnOnce(&TaskContext<'_>) -> T,
    T: Send,
{
    if done.is_closed() {
        core.metrics.cancelled.fetch_add(1, Relaxed);
        core.permits.add_permits(1);
        return;
    }
    let started = Instant::now();
    core.metrics.task_started(started - admitted);
    let outcome = catch_unwind(AssertUnwindSafe(|| f(&TaskContext { done: &done })));
    core.metrics
        .task_finished(started.elapsed(), outcome.is_err());
    let result = outcome.map_err(|payload| PoolError::Panicked(panic_message(payload.as_ref())));
    // Free the slot before waking the caller, so a caller that submits
    // again right after its result arrives finds room.
    core.permits.add_permits(1);
    // An error only means the caller stopped waiting.
    let _ = done.send(result);
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

type Admission<T> = Pin<Box<dyn Future<Output = State<T>> + Send>>;

pub(crate) enum State<T> {
    /// `run` found the queue full and waits for a slot.
    Waiting(Admission<T>),
    Queued(oneshot::Receiver<Result<T, PoolError>>),
    Failed(PoolError),
    Done,
}

impl<T> State<T> {
    pub(crate) fn waiting(admission: Admission<T>) -> Self {
        State::Waiting(admission)
    }

    pub(crate) fn queued() -> (Self, oneshot::Sender<Result<T, PoolError>>) {
        let (tx, rx) = oneshot::channel();
        (State::Queued(rx), tx)
    }

    pub(crate) fn failed(error: PoolError) -> Self {
        State::Failed(error)
    }
}

/// The result of a task on the [`Pool`], as a future.
///
/// Dropping it before the task starts removes the task: it never runs (the
/// thread that reaches it discards it at once, without calling it).
/// Dropping it while the task runs lets the task see
/// [`TaskContext::is_cancelled`]. A `Task` keeps its pool alive.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use corral::pool::{Pool, PoolError};
///
/// let pool = Pool::builder().threads(1).build().unwrap();
/// let slow = pool
///     .run_with(|cx| while !cx.is_cancelled() { std::thread::yield_now() })
///     .timeout(Duration::from_millis(10));
/// assert_eq!(slow.await, Err(PoolError::TimedOut));
/// # }
/// ```
#[must_use = "a task is cancelled when its Task is dropped"]
pub struct Task<T> {
    pool: Pool,
    state: State<T>,
    deadline: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> Task<T> {
    pub(crate) fn new(pool: Pool, state: State<T>) -> Self {
        Task {
            pool,
            state,
            deadline: None,
            timer: None,
        }
    }

    /// Gives up after `limit` from now, whether the task is still waiting
    /// for room, queued or running; the task then resolves to
    /// [`PoolError::TimedOut`] and is cancelled as if dropped.
    pub fn timeout(mut self, limit: Duration) -> Self {
        // The timer itself is made on first poll, inside the runtime.
        self.deadline = Instant::now().checked_add(limit);
        self.timer = None;
        self
    }
}

impl<T> Future for Task<T> {
    type Output = Result<T, PoolError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Waiting(admission) => match admission.as_mut().poll(cx) {
                    Poll::Ready(queued) => this.state = queued,
                    Poll::Pending => break,
                },
                State::Queued(result) => match Pin::new(result).poll(cx) {
                    Poll::Ready(outcome) => {
                        this.state = State::Done;
                        // A dropped sender means the job was dropped unrun.
                        return Poll::Ready(outcome.unwrap_or(Err(PoolError::Cancelled)));
                    }
                    Poll::Pending => break,
                },
                State::Failed(_) => {
                    return match std::mem::replace(&mut this.state, State::Done) {
                        State::Failed(error) => Poll::Ready(Err(error)),
                        _ => Poll::Ready(Err(PoolError::Cancelled)),
                    };
                }
                // Polled after completion: answer rather than panic.
                State::Done => return Poll::Ready(Err(PoolError::Cancelled)),
            }
        }
        if let Some(deadline) = this.deadline {
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
            if timer.as_mut().poll(cx).is_ready() {
                // Dropping the receiver is the whole cancellation protocol.
                this.state = State::Done;
                this.pool.metrics().timed_out.fetch_add(1, Relaxed);
                return Poll::Ready(Err(PoolError::TimedOut));
            }
        }
        Poll::Pending
    }
}
