//! The primary's record of its workers' output: the last lines of every slot,
//! each tagged with slot and pid, for `corral logs`; every line is also passed
//! on to the primary's own stdout or stderr.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{broadcast, mpsc};

use super::protocol::{LogLine, Stream, OWN_TAG};

/// Longer lines are cut into pieces of this size, so one runaway line cannot
/// hold an unbounded buffer.
const MAX_LINE: usize = 8 * 1024;
/// Followers that fall this many lines behind skip ahead.
const FOLLOW_BACKLOG: usize = 4096;
/// Output batches queued for the writer thread before readers wait.
const FORWARD_QUEUE: usize = 256;

/// A stored line and its place in the order all lines arrived in.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub seq: u64,
    pub line: Arc<LogLine>,
}

/// The last lines of every slot's stdout and stderr (see the module doc).
/// Cloning shares the same book.
#[derive(Clone)]
pub(crate) struct LogBook {
    inner: Arc<Inner>,
}

struct Inner {
    lines_per_slot: usize,
    slots: Mutex<BTreeMap<usize, VecDeque<Entry>>>,
    next_seq: AtomicU64,
    follow: broadcast::Sender<Entry>,
    forward: mpsc::Sender<(Stream, Vec<u8>)>,
}

impl std::fmt::Debug for LogBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogBook")
            .field("lines_per_slot", &self.inner.lines_per_slot)
            .finish_non_exhaustive()
    }
}

impl LogBook {
    /// A book keeping the last `lines_per_slot` lines of each slot, forwarding
    /// to this process's stdout and stderr.
    pub fn new(lines_per_slot: usize) -> Self {
        Self::with_outputs(
            lines_per_slot,
            Box::new(std::io::stdout()),
            Box::new(std::io::stderr()),
        )
    }

    /// Like [`new`](Self::new), forwarding to the given writers instead.
    pub(crate) fn with_outputs(
        lines_per_slot: usize,
        mut stdout: Box<dyn Write + Send>,
        mut stderr: Box<dyn Write + Send>,
    ) -> Self {
        let (forward, mut queue) = mpsc::channel::<(Stream, Vec<u8>)>(FORWARD_QUEUE);
        // Writes go through one plain thread: a full stdout pipe (a slow
        // journald, a reader that went away) then stalls only the workers
        // whose output waits behind it, never the supervisor's event loop.
        let spawned = std::thread::Builder::new()
            .name("corral-logs".into())
            .spawn(move || {
                while let Some((stream, bytes)) = queue.blocking_recv() {
                    let out: &mut dyn Write = match stream {
                        Stream::Stdout => &mut stdout,
                        Stream::Stderr => &mut stderr,
                    };
                    // Nothing sensible to do when our own output is gone.
                    let _ = out.write_all(&bytes).and_then(|()| out.flush());
                }
            });
        if let Err(err) = spawned {
            tracing::warn!("cannot start the log forwarding thread ({err}); worker output is recorded but not printed");
        }
        LogBook {
            inner: Arc::new(Inner {
                lines_per_slot: lines_per_slot.max(1),
                slots: Mutex::new(BTreeMap::new()),
                next_seq: AtomicU64::new(0),
                follow: broadcast::channel(FOLLOW_BACKLOG).0,
                forward,
            }),
        }
    }

    /// Records and forwards a spawned worker's output until both pipes close.
    /// Call it from within the supervisor's tokio runtime.
    pub fn capture(
        &self,
        slot: usize,
        pid: u32,
        stdout: tokio::process::ChildStdout,
        stderr: tokio::process::ChildStderr,
    ) {
        tokio::spawn(self.clone().pump(slot, pid, Stream::Stdout, stdout));
        tokio::spawn(self.clone().pump(slot, pid, Stream::Stderr, stderr));
    }

    /// Reads whole chunks and handles all the lines in each at once: one lock,
    /// one queued write per chunk however chatty the worker is.
    pub(crate) async fn pump(
        self,
        slot: usize,
        pid: u32,
        stream: Stream,
        mut reader: impl AsyncRead + Unpin,
    ) {
        let mut pending: Vec<u8> = Vec::with_capacity(16 * 1024);
        loop {
            let read = match reader.read_buf(&mut pending).await {
                Ok(read) => read,
                Err(err) => {
                    tracing::debug!(slot, pid, "reading the worker's {stream:?}: {err}");
                    0
                }
            };
            let mut lines: Vec<&[u8]> = Vec::new();
            let mut start = 0;
            while let Some(end) = pending[start..].iter().position(|&b| b == b'\n') {
                lines.extend(pieces(&pending[start..start + end]));
                start += end + 1;
            }
            // A partial line waits for the rest, unless it is already too
            // long or the pipe closed.
            let rest = &pending[start..];
            if (read == 0 && !rest.is_empty()) || rest.len() >= MAX_LINE {
                lines.extend(pieces(rest));
                start = pending.len();
            }
            if !lines.is_empty() {
                self.take(slot, pid, stream, &lines).await;
            }
            pending.drain(..start);
            if read == 0 {
                return;
            }
            if pending.capacity() - pending.len() < 4096 {
                pending.reserve(16 * 1024);
            }
        }
    }

    async fn take(&self, slot: usize, pid: u32, stream: Stream, lines: &[&[u8]]) {
        let mut out = Vec::with_capacity(lines.iter().map(|l| l.len() + 32).sum());
        let mut records = Vec::with_capacity(lines.len());
        for raw in lines {
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if !raw.starts_with(OWN_TAG.as_bytes()) {
                let _ = write!(out, "[worker {slot} pid {pid}] ");
            }
            out.extend_from_slice(raw);
            out.push(b'\n');
            records.push(LogLine {
                slot,
                pid,
                stream,
                line: String::from_utf8_lossy(raw).into_owned(),
            });
        }
        self.record(records);
        let _ = self.inner.forward.send((stream, out)).await;
    }

    fn record(&self, lines: Vec<LogLine>) {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
        for line in lines {
            let entry = Entry {
                // Taken under the lock, so the order of seq is the order of the book.
                seq: self.inner.next_seq.fetch_add(1, Ordering::Relaxed),
                line: Arc::new(line),
            };
            let kept = slots.entry(entry.line.slot).or_default();
            if kept.len() == self.inner.lines_per_slot {
                kept.pop_front();
            }
            kept.push_back(entry.clone());
            let _ = self.inner.follow.send(entry);
        }
    }

    /// The newest `lines` stored lines (of `slot`, or of every slot), oldest first.
    pub(crate) fn recent(&self, slot: Option<usize>, lines: usize) -> Vec<Entry> {
        let slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut entries: Vec<Entry> = slots
            .iter()
            .filter(|(number, _)| slot.is_none_or(|wanted| **number == wanted))
            .flat_map(|(_, kept)| kept.iter().rev().take(lines).cloned())
            .collect();
        entries.sort_unstable_by_key(|entry| entry.seq);
        let skip = entries.len().saturating_sub(lines);
        entries.drain(..skip);
        entries
    }

    /// Every line recorded from now on. Subscribe before reading
    /// [`recent`](Self::recent) and skip what it returned (by `seq`), so no
    /// line falls between the two.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Entry> {
        self.inner.follow.subscribe()
    }
}

/// A line as stored: cut into pieces of at most [`MAX_LINE`] bytes; an empty
/// line stays one (empty) line.
fn pieces(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    let empty = line.is_empty().then_some(line);
    line.chunks(MAX_LINE).chain(empty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;
    use std::time::Duration;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    async fn run(book: &LogBook, slot: usize, script: &str) -> u32 {
        let mut child = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        book.capture(
            slot,
            pid,
            child.stdout.take().unwrap(),
            child.stderr.take().unwrap(),
        );
        child.wait().await.unwrap();
        pid
    }

    async fn settle(condition: impl Fn() -> bool) {
        for _ in 0..200 {
            if condition() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the log book never caught up");
    }

    #[tokio::test]
    async fn lines_are_stored_per_slot_and_forwarded_tagged() {
        let (out, err) = (Shared::default(), Shared::default());
        let book = LogBook::with_outputs(100, Box::new(out.clone()), Box::new(err.clone()));
        let pid = run(
            &book,
            1,
            "echo 'GET / 200'; echo 'oops' >&2; echo '[worker 1 pid 7] INFO own tag'; printf 'no newline'",
        )
        .await;
        settle(|| book.recent(None, 10).len() == 4 && out.text().lines().count() == 3).await;

        let lines: Vec<String> = book
            .recent(Some(1), 10)
            .iter()
            .map(|e| e.line.line.clone())
            .collect();
        assert!(lines.contains(&"GET / 200".to_owned()), "{lines:?}");
        assert!(lines.contains(&"no newline".to_owned()), "{lines:?}");
        assert!(book.recent(Some(0), 10).is_empty());
        assert!(book
            .recent(None, 10)
            .iter()
            .all(|e| e.line.pid == pid && e.line.slot == 1));

        assert_eq!(
            out.text(),
            format!(
                "[worker 1 pid {pid}] GET / 200\n[worker 1 pid 7] INFO own tag\n[worker 1 pid {pid}] no newline\n"
            )
        );
        assert_eq!(err.text(), format!("[worker 1 pid {pid}] oops\n"));
    }

    #[tokio::test]
    async fn only_the_last_lines_of_each_slot_are_kept() {
        let book = LogBook::with_outputs(5, Box::new(std::io::sink()), Box::new(std::io::sink()));
        run(&book, 0, "for i in $(seq 1 50); do echo zero-$i; done").await;
        run(&book, 1, "for i in $(seq 1 3); do echo one-$i; done").await;
        settle(|| book.recent(None, 100).len() == 8).await;
        let zero: Vec<String> = book
            .recent(Some(0), 100)
            .iter()
            .map(|e| e.line.line.clone())
            .collect();
        assert_eq!(
            zero,
            ["zero-46", "zero-47", "zero-48", "zero-49", "zero-50"]
        );
        // Across slots the newest come last, in arrival order.
        let newest: Vec<String> = book
            .recent(None, 2)
            .iter()
            .map(|e| e.line.line.clone())
            .collect();
        assert_eq!(newest, ["one-2", "one-3"]);
    }

    #[tokio::test]
    async fn a_huge_line_is_cut_not_buffered_whole() {
        let book = LogBook::with_outputs(100, Box::new(std::io::sink()), Box::new(std::io::sink()));
        run(
            &book,
            0,
            "head -c 20000 /dev/zero | tr '\\0' x; echo; echo after",
        )
        .await;
        settle(|| {
            book.recent(None, 100)
                .iter()
                .any(|e| e.line.line == "after")
        })
        .await;
        let entries = book.recent(None, 100);
        assert!(entries.iter().all(|e| e.line.line.len() <= MAX_LINE));
        let xs: usize = entries
            .iter()
            .map(|e| e.line.line.chars().filter(|&c| c == 'x').count())
            .sum();
        assert_eq!(xs, 20000);
    }
}
