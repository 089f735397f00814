//! Per-task overhead of `Pool::run` for an empty task, against
//! `tokio::task::spawn_blocking` and a bare `rayon::spawn` + oneshot.
//!
//! Two shapes: one task awaited at a time (latency: includes waking a
//! sleeping thread) and 1000 tasks in flight (throughput: the cost a busy
//! service pays per task). The caller is a current_thread runtime, like a
//! corral worker's event loop.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::future::join_all;
use tokio::sync::oneshot;

use corral::pool::Pool;

const BATCH: usize = 1000;

fn rayon_run(pool: &rayon::ThreadPool) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    pool.spawn(move || {
        let _ = tx.send(());
    });
    rx
}

fn overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let threads = corral::pool::default_threads(None);
    let pool = Pool::builder().threads(threads).build().expect("pool");
    let rayon = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("rayon");

    let mut single = c.benchmark_group("pool_task_round_trip");
    single.throughput(Throughput::Elements(1));
    single.bench_function("corral_pool_run", |b| {
        b.to_async(&rt).iter(|| pool.run(|| ()))
    });
    single.bench_function("tokio_spawn_blocking", |b| {
        b.to_async(&rt).iter(|| tokio::task::spawn_blocking(|| ()))
    });
    single.bench_function("rayon_spawn_oneshot", |b| {
        b.to_async(&rt).iter(|| rayon_run(&rayon))
    });
    single.finish();

    let mut batch = c.benchmark_group("pool_task_batch");
    batch.throughput(Throughput::Elements(BATCH as u64));
    batch.bench_function(BenchmarkId::new("corral_pool_run", BATCH), |b| {
        b.to_async(&rt)
            .iter(|| join_all((0..BATCH).map(|_| pool.run(|| ()))))
    });
    batch.bench_function(BenchmarkId::new("tokio_spawn_blocking", BATCH), |b| {
        b.to_async(&rt)
            .iter(|| join_all((0..BATCH).map(|_| tokio::task::spawn_blocking(|| ()))))
    });
    batch.bench_function(BenchmarkId::new("rayon_spawn_oneshot", BATCH), |b| {
        b.to_async(&rt)
            .iter(|| join_all((0..BATCH).map(|_| rayon_run(&rayon))))
    });
    batch.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
