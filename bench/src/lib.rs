//! Shared pieces of the benchmark programs.

use std::time::{Duration, Instant};

/// Burns about `us` microseconds of CPU, the same loop as the `hello`
/// example's `/work` route, so peers do identical work per request.
pub fn burn_cpu(us: u64) -> u64 {
    let budget = Duration::from_micros(us.min(10_000_000));
    let start = Instant::now();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while start.elapsed() < budget {
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
    }
    x
}

/// The `us` parameter of a `/work?us=N` query.
pub fn work_micros(query: Option<&str>) -> u64 {
    query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("us="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
