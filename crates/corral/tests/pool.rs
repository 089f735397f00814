//! Integration tests of the CPU pool and the event-loop delay monitor.
//! Busy threads are held with gates and channels, never with sleeps, so no
//! test depends on timing to pass.

mod pool {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::SeqCst};
    use std::sync::mpsc;
    use std::sync::{Arc, Barrier, Condvar, Mutex};
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    use corral::metrics::EventLoopDelay;
    use corral::pool::{Pool, PoolError, Task};

    /// A door pool tasks wait behind until the test opens it.
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<bool>, Condvar)>);

    impl Gate {
        fn wait(&self) {
            let (open, cv) = &*self.0;
            let mut open = open.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
        }
        fn open(&self) {
            let (open, cv) = &*self.0;
            *open.lock().unwrap() = true;
            cv.notify_all();
        }
    }

    /// Occupies every thread of `pool` until `gate` opens; returns once
    /// they all run.
    fn hold_all(pool: &Pool, gate: &Gate) -> Vec<Task<()>> {
        let (started, all_started) = mpsc::channel();
        let blockers: Vec<_> = (0..pool.stats().threads)
            .map(|_| {
                let (gate, started) = (gate.clone(), started.clone());
                pool.run(move || {
                    started.send(()).unwrap();
                    gate.wait();
                })
            })
            .collect();
        for _ in &blockers {
            all_started.recv().unwrap();
        }
        blockers
    }

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
    }

    fn threads_named(prefix: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.starts_with(prefix))
            .count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn pool_results_are_correct_under_concurrency() {
        let pool = Pool::builder().threads(3).queue(16).build().unwrap();
        let callers: Vec<_> = (0..8u64)
            .map(|caller| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    for i in 0..200u64 {
                        let n = caller * 1000 + i;
                        assert_eq!(pool.run(move || n * n + 1).await, Ok(n * n + 1));
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.await.unwrap();
        }
        let stats = pool.stats();
        assert_eq!(stats.completed, 1600);
        assert_eq!((stats.queued, stats.running, stats.failed), (0, 0, 0));
    }

    #[tokio::test]
    async fn pool_try_run_rejects_at_the_bound_and_loses_nothing() {
        let pool = Pool::builder().threads(2).queue(3).build().unwrap();
        let gate = Gate::default();
        let blockers = hold_all(&pool, &gate);
        let runs: Arc<Vec<AtomicU32>> = Arc::new((0..10).map(|_| AtomicU32::new(0)).collect());
        let mut accepted = Vec::new();
        let mut rejected = Vec::new();
        for id in 0..10 {
            let runs = Arc::clone(&runs);
            let mut task = pool.try_run(move || {
                runs[id].fetch_add(1, SeqCst);
                id
            });
            match poll_once(&mut task) {
                Poll::Ready(Err(PoolError::QueueFull)) => rejected.push(id),
                Poll::Pending => accepted.push((id, task)),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(accepted.len(), 3, "exactly the queue bound is admitted");
        assert_eq!(pool.stats().queued, 3);
        assert_eq!(pool.stats().rejected, 7);
        gate.open();
        for (id, task) in accepted {
            assert_eq!(task.await, Ok(id));
        }
        for blocker in blockers {
            blocker.await.unwrap();
        }
        for id in 0..10 {
            let expected = u32::from(!rejected.contains(&id));
            assert_eq!(runs[id].load(SeqCst), expected, "task {id}");
        }
        // Room is back once results are in.
        assert_eq!(pool.try_run(|| 1).await, Ok(1));
    }

    #[tokio::test]
    async fn pool_run_waits_for_room() {
        let pool = Pool::builder().threads(1).queue(1).build().unwrap();
        let gate = Gate::default();
        let blockers = hold_all(&pool, &gate);
        let mut queued = pool.run(|| 1);
        let mut waiting = pool.run(|| 2);
        assert!(poll_once(&mut queued).is_pending());
        assert!(poll_once(&mut waiting).is_pending());
        assert_eq!(pool.stats().queued, 1, "the waiting task is not queued yet");
        gate.open();
        assert_eq!(queued.await, Ok(1));
        assert_eq!(waiting.await, Ok(2));
        drop(blockers);
    }

    #[tokio::test]
    async fn pool_tasks_cancelled_before_start_never_run() {
        let pool = Pool::builder().threads(1).queue(100).build().unwrap();
        let gate = Gate::default();
        let blockers = hold_all(&pool, &gate);
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..50 {
            let ran = Arc::clone(&ran);
            drop(pool.run(move || ran.fetch_add(1, SeqCst)));
        }
        // Dropped tasks hold their queue slot until a thread discards them.
        assert_eq!(pool.stats().queued, 50);
        gate.open();
        // One thread takes jobs in order, so this runs after every dropped one.
        assert_eq!(pool.run(|| ()).await, Ok(()));
        assert_eq!(ran.load(SeqCst), 0);
        assert_eq!(pool.stats().cancelled, 50);
        assert_eq!(pool.stats().queued, 0);
        for blocker in blockers {
            blocker.await.unwrap();
        }
    }

    #[tokio::test]
    async fn pool_panics_are_isolated() {
        let pool = Pool::builder().threads(2).name("ppanic").build().unwrap();
        for i in 0..10 {
            let outcome = pool.run(move || -> u32 { panic!("boom {i}") }).await;
            assert_eq!(outcome, Err(PoolError::Panicked(format!("boom {i}"))));
        }
        // Both threads are still there: two tasks meet at a barrier.
        let barrier = Arc::new(Barrier::new(2));
        let (a, b) = (Arc::clone(&barrier), barrier);
        let (x, y) = tokio::join!(pool.run(move || a.wait()), pool.run(move || b.wait()));
        assert!(x.is_ok() && y.is_ok());
        assert_eq!(threads_named("ppanic-"), 2);
        assert_eq!(pool.stats().failed, 10);
    }

    #[tokio::test]
    async fn pool_timeout_cancels_a_running_task() {
        let pool = Pool::builder().threads(1).build().unwrap();
        let (saw, seen) = mpsc::channel();
        let outcome = pool
            .run_with(move |cx| {
                while !cx.is_cancelled() {
                    std::thread::yield_now();
                }
                saw.send(()).unwrap();
            })
            .timeout(Duration::from_millis(20))
            .await;
        assert_eq!(outcome, Err(PoolError::TimedOut));
        seen.recv().unwrap();
        assert_eq!(pool.stats().timed_out, 1);
    }

    #[tokio::test]
    async fn pool_timeout_removes_a_queued_task() {
        let pool = Pool::builder().threads(1).build().unwrap();
        let gate = Gate::default();
        let blockers = hold_all(&pool, &gate);
        let ran = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&ran);
        let outcome = pool
            .run(move || counter.fetch_add(1, SeqCst))
            .timeout(Duration::from_millis(10))
            .await;
        assert_eq!(outcome, Err(PoolError::TimedOut));
        gate.open();
        assert_eq!(pool.run(|| ()).await, Ok(()));
        assert_eq!(ran.load(SeqCst), 0);
        assert_eq!(pool.stats().cancelled, 1);
        drop(blockers);
    }

    #[tokio::test]
    async fn pool_shuts_down_cleanly_when_dropped() {
        let pool = Pool::builder().threads(3).name("pdrop").build().unwrap();
        let clone = pool.clone();
        assert_eq!(clone.run(|| 5).await, Ok(5));
        assert_eq!(threads_named("pdrop-"), 3);
        drop(pool);
        assert_eq!(threads_named("pdrop-"), 3, "a clone keeps the threads");
        drop(clone);
        // The drop joined every thread; a joined thread's /proc entry can
        // outlive the join by a moment (the kernel wakes the joiner before
        // it reaps the thread), so give it that moment, no more.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while threads_named("pdrop-") > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(threads_named("pdrop-"), 0);
    }

    #[tokio::test]
    async fn pool_threads_run_at_a_lower_priority() {
        let pool = Pool::builder().threads(1).nice(7).build().unwrap();
        // SAFETY: getpriority only reads; 0 means the calling thread.
        let nice = pool
            .run(|| unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) })
            .await;
        let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        assert_eq!(nice, Ok(own + 7));
    }

    #[tokio::test]
    async fn pool_map_chunks_uses_every_thread() {
        let threads = 3;
        let pool = Pool::builder().threads(threads).build().unwrap();
        let records: Vec<u64> = (0..100_000).collect();
        let (sum, names, progress) = pool
            .run_with(move |cx| {
                let names = Mutex::new(std::collections::HashSet::new());
                // The first chunk on each thread waits for the others, so the
                // call finishes only if every thread took part.
                let barrier = Barrier::new(threads);
                let progress = AtomicUsize::new(0);
                let sums = cx
                    .map_chunks(
                        &records,
                        100,
                        |chunk| {
                            let name = std::thread::current().name().map(str::to_owned);
                            if names.lock().unwrap().insert(name) {
                                barrier.wait();
                            }
                            chunk.iter().sum::<u64>()
                        },
                        |done, total| {
                            assert_eq!(total, 100_000);
                            progress.fetch_max(done, SeqCst);
                        },
                    )
                    .unwrap();
                let names = names.into_inner().unwrap();
                (sums.iter().sum::<u64>(), names.len(), progress.into_inner())
            })
            .await
            .unwrap();
        assert_eq!(sum, 4_999_950_000);
        assert_eq!(names, threads);
        assert_eq!(progress, 100_000);
    }

    #[tokio::test]
    async fn pool_map_chunks_stops_when_cancelled() {
        let pool = Pool::builder().threads(2).build().unwrap();
        let (report, outcome) = mpsc::channel();
        let mapped = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&mapped);
        let task = pool
            .run_with(move |cx| {
                let records = vec![0u8; 10_000];
                let result = cx.map_chunks(
                    &records,
                    10,
                    |_| {
                        // Every chunk waits for the cancellation.
                        counter.fetch_add(1, SeqCst);
                        while !cx.is_cancelled() {
                            std::thread::yield_now();
                        }
                    },
                    |_, _| {},
                );
                report.send(result.map(|chunks| chunks.len())).unwrap();
            })
            .timeout(Duration::from_millis(20));
        assert_eq!(task.await, Err(PoolError::TimedOut));
        assert_eq!(outcome.recv().unwrap(), Err(PoolError::Cancelled));
        assert!(
            mapped.load(SeqCst) < 1000,
            "chunks after the cancel are skipped"
        );
    }

    #[tokio::test]
    async fn pool_stats_count_and_time_tasks() {
        let pool = Pool::builder().threads(1).build().unwrap();
        for _ in 0..5 {
            pool.run(|| std::hint::black_box((0..100_000u64).sum::<u64>()))
                .await
                .unwrap();
        }
        let _ = pool.run(|| panic!("counted")).await;
        let stats = pool.stats();
        assert_eq!((stats.completed, stats.failed), (5, 1));
        assert!(stats.run_max_ms >= stats.run_p50_ms);
        assert!(stats.utilisation > 0.0 && stats.utilisation <= 1.0);
        let back: corral::pool::PoolStats =
            serde_json::from_str(&serde_json::to_string(&stats).unwrap()).unwrap();
        assert_eq!(back, stats);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn pool_event_loop_delay_catches_a_blocked_loop() {
        let delay = EventLoopDelay::start();
        while delay.snapshot().samples == 0 {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Block the only thread of the loop: the armed 10 ms timer fires late.
        std::thread::sleep(Duration::from_millis(200));
        let before = delay.snapshot().samples;
        while delay.snapshot().samples == before {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let stats = delay.snapshot();
        assert!(stats.max_ms >= 150.0, "{stats:?}");
    }
}

mod pool_shutdown {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;

    use corral::pool::Pool;

    /// Counts its drops, to see that no queued closure is leaked.
    struct Tracked(Arc<AtomicUsize>);

    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    #[tokio::test]
    async fn pool_drop_discards_abandoned_tasks_without_leaking_them() {
        let pool = Pool::builder().threads(1).build().unwrap();
        let (started, wait_started) = std::sync::mpsc::channel();
        let (open, gate) = std::sync::mpsc::channel::<()>();
        let blocker = pool.run(move || {
            started.send(()).unwrap();
            let _ = gate.recv();
        });
        wait_started.recv().unwrap();
        let dropped = Arc::new(AtomicUsize::new(0));
        for _ in 0..5 {
            let tracked = Tracked(Arc::clone(&dropped));
            drop(pool.run(move || drop(tracked)));
        }
        drop(blocker);
        // Opens the gate while (or before) the pool is being dropped.
        let opener = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let _ = open.send(());
        });
        drop(pool);
        opener.join().unwrap();
        assert_eq!(dropped.load(SeqCst), 5);
    }
}
