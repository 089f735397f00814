//! The CPU side of settlement, measured in-process (no HTTP, no SQLite):
//!
//! - the single-thread HMAC-SHA256 rate over the signed text of each line,
//! - the single-thread rate of `check_line` (parse + HMAC verify of one line),
//! - `check_all` (the service's parallel checker) over a whole batch on a
//!   rayon pool of 1 thread and of every core.
//!
//! Parallel efficiency is `rate(all threads) / (threads × rate(1 thread))`,
//! both measured with `check_all`, so it shows what splitting into chunks
//! costs and nothing else. Prints one line of JSON.
//!
//! Usage: payments_verify [LINES] [ROUNDS]   (defaults 100000 and 5)

use std::time::Instant;

use hmac::{KeyInit, Mac};
use payments::gen::{generate_batch, GenArgs};
use payments::settlement::{check_all, check_line, split_header};
use payments::Merchants;

/// Best (highest) rate of `rounds` runs of `f`, which processes `items`.
fn best_rate(rounds: usize, items: usize, mut f: impl FnMut() -> usize) -> f64 {
    let mut best = 0f64;
    for _ in 0..rounds {
        let start = Instant::now();
        let done = f();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(done, items, "every line must be processed");
        best = best.max(items as f64 / secs);
    }
    best
}

fn main() {
    let mut args = std::env::args().skip(1);
    let lines: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let rounds: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(5);
    let merchants = Merchants::demo();
    let csv = generate_batch(
        &merchants,
        &GenArgs {
            lines,
            merchants: None,
            seed: 1,
            bad_every: 100,
            id_prefix: "bench".into(),
        },
    );
    let data = split_header(csv.as_bytes()).expect("generated header");
    let raw: Vec<&[u8]> = data
        .strip_suffix(b"\n")
        .unwrap_or(data)
        .split(|&b| b == b'\n')
        .collect();
    assert_eq!(raw.len(), lines);

    // The signed texts and keys, prepared outside the timed loop.
    let signed: Vec<(String, Vec<u8>)> = raw
        .iter()
        .map(|l| {
            let f: Vec<&str> = std::str::from_utf8(l).expect("utf8").split(',').collect();
            let secret = merchants.get(f[1]).expect("demo merchant").secret.clone();
            (
                format!("{}|{}|{}|{}", f[0], f[1], f[2], f[3]),
                secret.into_bytes(),
            )
        })
        .collect();
    let hmac_1 = best_rate(rounds, lines, || {
        let mut n = 0;
        for (text, key) in &signed {
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("key");
            mac.update(text.as_bytes());
            std::hint::black_box(mac.finalize().into_bytes());
            n += 1;
        }
        n
    });
    let line_1 = best_rate(rounds, lines, || {
        let mut n = 0;
        for l in &raw {
            std::hint::black_box(check_line(l, &merchants));
            n += 1;
        }
        n
    });

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = |n: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .expect("rayon pool")
    };
    let one = pool(1);
    let all = pool(threads);
    let batch_1 = best_rate(rounds, lines, || {
        one.install(|| check_all(data, &merchants, |_| {}).len())
    });
    let batch_n = best_rate(rounds, lines, || {
        all.install(|| check_all(data, &merchants, |_| {}).len())
    });
    println!(
        "{{\"lines\": {lines}, \"threads\": {threads}, \"hmac_1thread_per_s\": {hmac_1:.0}, \
         \"check_line_1thread_per_s\": {line_1:.0}, \"check_all_1thread_per_s\": {batch_1:.0}, \
         \"check_all_all_threads_per_s\": {batch_n:.0}, \
         \"efficiency_vs_check_all_1thread\": {:.3}, \"efficiency_vs_hmac_1thread\": {:.3}}}",
        batch_n / (threads as f64 * batch_1),
        batch_n / (threads as f64 * hmac_1),
    );
}
