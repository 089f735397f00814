//! Hostile input against the real, clustered binary: worst-case settlement
//! bodies and images measured in the serving worker's peak RSS (`VmHWM` in
//! /proc), an announced oversize body, and the modes of the database files.

mod cluster_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cluster_support::*;

const MIB: u64 = 1024 * 1024;

/// One worker, so the worker that served a request is the only one there is.
fn start_one(dir: &Path) -> Cluster {
    let mut command = Command::new(env!("CARGO_BIN_EXE_payments"));
    command
        .args(["--listen", "127.0.0.1:0", "--workers", "1", "--data-dir"])
        .arg(dir);
    Cluster::start(command, Duration::from_secs(120))
}

fn only_worker(cluster: &Cluster) -> i32 {
    let pids = cluster.worker_pids();
    assert_eq!(pids.len(), 1, "one worker: {pids:?}");
    pids[0]
}

/// A `VmHWM`/`VmRSS` line of /proc/PID/status, in bytes.
fn status_bytes(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("a number of kB");
    kib * 1024
}

/// Peak RSS since start (or since the last [`reset_peak`]).
fn peak_rss(pid: i32) -> u64 {
    status_bytes(pid, "VmHWM:")
}

/// Writing 5 to clear_refs resets `VmHWM` to the current RSS (Linux ≥ 4.0),
/// so each phase of a test measures its own peak.
fn reset_peak(pid: i32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset VmHWM");
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("client")
}

/// The worst case for the settlement parser: the header, then one-character
/// lines up to exactly the default 64 MiB limit.
fn tiny_line_batch() -> Vec<u8> {
    let limit = 64 * MIB as usize;
    let mut body = Vec::with_capacity(limit);
    body.extend_from_slice(CSV_HEADER.as_bytes());
    body.push(b'\n');
    while body.len() + 2 <= limit {
        body.extend_from_slice(b"x\n");
    }
    body
}

#[tokio::test]
async fn tiny_lines_at_the_body_limit_stay_under_4x_the_body_in_worker_rss() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = start_one(dir.path());
    let pid = only_worker(&cluster);
    let body = tiny_line_batch();
    let lines = (body.len() - CSV_HEADER.len() - 1) / 2;
    let size = body.len() as u64;
    let c = client();

    // Synchronous: answered with the full result.
    let before = status_bytes(pid, "VmRSS:");
    reset_peak(pid);
    let resp = c
        .post(cluster.url("/v1/settlements"))
        .header("content-type", "text/csv")
        .body(body.clone())
        .send()
        .await
        .expect("sync batch");
    assert_eq!(resp.status(), 200);
    let result: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(result["total"], lines);
    assert_eq!(result["rejected"], lines);
    assert_eq!(result["errors"].as_array().map(Vec::len), Some(10_000));
    assert_eq!(result["errors"][9_999]["line"], 10_001);
    let sync_peak = peak_rss(pid);
    eprintln!(
        "sync: body {} MiB, worker RSS before {} MiB, peak {} MiB ({:.2}x the body)",
        size / MIB,
        before / MIB,
        sync_peak / MIB,
        sync_peak as f64 / size as f64
    );

    // Asynchronous: stored, then checked by the same (only) worker.
    reset_peak(pid);
    let resp = c
        .post(cluster.url("/v1/settlements?async=true"))
        .header("content-type", "text/csv")
        .body(body)
        .send()
        .await
        .expect("async batch");
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let started = Instant::now();
    let done = loop {
        let v: serde_json::Value = c
            .get(cluster.url(&location))
            .send()
            .await
            .expect("poll")
            .json()
            .await
            .expect("json");
        if v["status"] == "done" {
            break v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not done: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(done["rejected"], lines);
    let async_peak = peak_rss(pid);
    eprintln!(
        "async: peak {} MiB ({:.2}x the body)",
        async_peak / MIB,
        async_peak as f64 / size as f64
    );

    assert!(
        sync_peak < 4 * size,
        "sync batch peaked the worker at {} MiB, 4x the body is {} MiB",
        sync_peak / MIB,
        4 * size / MIB
    );
    assert!(
        async_peak < 4 * size,
        "async batch peaked the worker at {} MiB, 4x the body is {} MiB",
        async_peak / MIB,
        4 * size / MIB
    );
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// Deflate bits, least significant first (RFC 1951 §3.1.1).
#[derive(Default)]
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u64, count: u32) {
        self.acc |= value << self.n;
        self.n += count;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// Huffman codes are sent most significant bit first.
    fn code(&mut self, code: u64, len: u32) {
        let reversed = (0..len).fold(0, |r, i| (r << 1) | ((code >> i) & 1));
        self.put(reversed, len);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// A zlib stream of `n` zero bytes, written by hand with fixed Huffman codes
/// (a literal 0, then 258-byte copies at distance 1): encoding 400 MB with a
/// real compressor takes minutes in a debug build, this takes milliseconds.
fn zlib_zeros(n: u64) -> Vec<u8> {
    let mut bits = Bits::default();
    bits.put(1, 1); // BFINAL
    bits.put(1, 2); // BTYPE = fixed Huffman
    let literal_zero = |bits: &mut Bits| bits.code(0x30, 8);
    literal_zero(&mut bits);
    let copies = (n - 1) / 258;
    for _ in 0..copies {
        bits.code(0xC5, 8); // length code 285: 258 bytes
        bits.code(0, 5); // distance code 0: distance 1
    }
    for _ in 0..(n - 1) % 258 {
        literal_zero(&mut bits);
    }
    bits.code(0, 7); // end of block
    let mut out = vec![0x78, 0x01];
    out.extend_from_slice(&bits.finish());
    // Adler-32 of zeros: a stays 1, b adds 1 per byte.
    let adler = ((n % 65_521) << 16) | 1;
    out.extend_from_slice(&(adler as u32).to_be_bytes());
    out
}

/// A 16-bit RGBA PNG of `w`×`h` transparent black pixels (every filtered
/// byte is 0).
fn png16(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[16, 6, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    let raw = u64::from(h) * (1 + u64::from(w) * 8);
    png_chunk(&mut out, b"IDAT", &zlib_zeros(raw));
    png_chunk(&mut out, b"IEND", &[]);
    out
}

#[test]
fn the_hand_made_png_is_valid() {
    let img = image::load_from_memory(&png16(300, 7)).expect("decodes");
    assert_eq!((img.width(), img.height()), (300, 7));
    assert_eq!(img.color(), image::ColorType::Rgba16);
}

#[tokio::test]
async fn a_16_bit_png_just_under_the_pixel_cap_stays_under_256_mib() {
    // 7071² = 49,999,041 pixels, under the 50,000,000 cap; 400 MB decoded.
    let png = png16(7071, 7071);
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = start_one(dir.path());
    let pid = only_worker(&cluster);
    reset_peak(pid);
    let resp = client()
        .post(cluster.url("/v1/documents/thumbnail"))
        .body(png.clone())
        .send()
        .await
        .expect("thumbnail");
    let status = resp.status();
    let bytes = resp.bytes().await.expect("body");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    let thumb = image::load_from_memory(&bytes).expect("a JPEG");
    assert_eq!((thumb.width(), thumb.height()), (256, 256));
    let peak = peak_rss(pid);
    eprintln!(
        "16-bit PNG {}x{} ({} KiB): worker peak {} MiB",
        7071,
        7071,
        png.len() / 1024,
        peak / MIB
    );
    assert!(
        peak < 256 * MIB,
        "the worker peaked at {} MiB decoding it",
        peak / MIB
    );
}

#[tokio::test]
async fn a_jpeg_just_under_the_pixel_cap_decoded_whole_stays_under_256_mib() {
    // JPEGs are decoded whole (150 MB at this size) under the decode budget.
    let img = image::RgbImage::from_fn(7071, 7071, |x, y| {
        image::Rgb([(x / 64) as u8, (y / 64) as u8, 90])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 50)
        .encode_image(&img)
        .expect("encode");
    drop(img);
    let jpeg = out.into_inner();
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = start_one(dir.path());
    let pid = only_worker(&cluster);
    reset_peak(pid);
    let resp = client()
        .post(cluster.url("/v1/documents/thumbnail"))
        .body(jpeg.clone())
        .send()
        .await
        .expect("thumbnail");
    assert_eq!(resp.status(), 200);
    let thumb = image::load_from_memory(&resp.bytes().await.expect("body")).expect("a JPEG");
    assert_eq!((thumb.width(), thumb.height()), (256, 256));
    let peak = peak_rss(pid);
    eprintln!(
        "JPEG 7071x7071 ({} KiB): worker peak {} MiB",
        jpeg.len() / 1024,
        peak / MIB
    );
    assert!(peak < 256 * MIB, "the worker peaked at {} MiB", peak / MIB);
}

/// Sends only the headers of a request announcing `length` body bytes and
/// returns how long the answer took and the answer (read to the end of the
/// connection).
fn announce_only(
    addr: std::net::SocketAddr,
    path: &str,
    extra: &str,
    length: u64,
) -> (Duration, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let head =
        format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {length}\r\n\r\n");
    let started = Instant::now();
    stream.write_all(head.as_bytes()).expect("send headers");
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).expect("an answer");
    let elapsed = started.elapsed();
    // The server must close the connection rather than wait for the body:
    // read_to_end returns only at EOF (a timeout is an error).
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("the server closes the connection");
    let mut answer = String::from_utf8_lossy(&first).into_owned();
    answer.push_str(&String::from_utf8_lossy(&rest));
    (elapsed, answer)
}

#[test]
fn an_announced_oversize_body_gets_413_at_once_and_the_connection_closes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = start_one(dir.path());
    let cases = [
        (
            "/v1/settlements",
            "Content-Type: text/csv\r\n",
            67_108_865u64,
        ),
        ("/v1/settlements?async=true", "", 67_108_865),
        ("/v1/payments", "Idempotency-Key: k\r\n", 1024 * 1024 + 1),
        ("/v1/documents/thumbnail", "", 32 * MIB + 1),
    ];
    for (path, extra, length) in cases {
        let (elapsed, answer) = announce_only(cluster.addr, path, extra, length);
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
        assert!(answer.contains("payload_too_large"), "{path}: {answer}");
        assert!(
            elapsed < Duration::from_millis(100),
            "{path}: answered after {elapsed:?}"
        );
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn the_data_dir_is_0700_and_database_files_0600_whatever_the_umask() {
    let parent = tempfile::tempdir().expect("temp dir");
    let data = parent.path().join("fresh").join("data");
    // umask 0 would give 0777 / 0666 to anything created with default modes.
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("umask 000 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_payments"))
        .args(["--listen", "127.0.0.1:0", "--workers", "1", "--data-dir"])
        .arg(&data);
    let cluster = Cluster::start(command, Duration::from_secs(120));
    let resp = client()
        .post(cluster.url("/v1/payments"))
        .header("idempotency-key", "modes")
        .body(r#"{"merchant_id":"acme","amount":1,"currency":"EUR","reference":"r"}"#)
        .send()
        .await
        .expect("payment");
    assert_eq!(resp.status(), 201);
    assert_eq!(mode(&data), 0o700, "data dir");
    for name in [
        "payments.sqlite3",
        "payments.sqlite3-wal",
        "payments.sqlite3-shm",
    ] {
        assert_eq!(mode(&data.join(name)), 0o600, "{name}");
    }
}

#[test]
fn an_existing_world_readable_database_is_tightened_to_0600() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let _cluster = start_one(dir.path());
    }
    let db = dir.path().join("payments.sqlite3");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let _cluster = start_one(dir.path());
    assert_eq!(mode(&db), 0o600);
}
