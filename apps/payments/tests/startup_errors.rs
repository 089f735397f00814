//! Every way the real binary can refuse to start is one sentence on stderr
//! that names the flag or file, the cause and the fix, with a non-zero exit;
//! never a Debug dump or a panic.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use corral_testkit::{wait_child, ChildGroup};

/// Runs `payments ARGS` (as `uid` when given) and returns its stderr once it
/// exited, asserting the exit was a failure.
fn refuses(args: &[&str], uid: Option<u32>) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_payments"));
    command
        .args(["--listen", "127.0.0.1:0", "--workers", "1"])
        .args(args);
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    let mut child = ChildGroup(
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start payments"),
    );
    let mut pipe = child.0.stderr.take().expect("piped stderr");
    // Read to EOF on a thread so a hung binary fails the wait below instead
    // of hanging the test.
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let status = wait_child(&mut child.0, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("payments {args:?} did not exit"));
    let text = reader.join().expect("stderr reader");
    assert!(!status.success(), "payments {args:?} started: {text}");
    assert_eq!(status.code(), Some(1), "{text}");
    one_sentence(&text);
    text
}

/// One line, ending with a full stop, and no Debug formatting of errors.
fn one_sentence(text: &str) {
    let text = text.trim_end();
    assert_eq!(text.lines().count(), 1, "one line: {text:?}");
    assert!(text.starts_with("error: "), "{text:?}");
    assert!(text.ends_with('.'), "one sentence: {text:?}");
    for debug in [
        "Os {",
        "kind:",
        "Error {",
        "SqliteFailure",
        "panicked",
        "Some(",
    ] {
        assert!(!text.contains(debug), "a Debug dump ({debug}): {text:?}");
    }
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

#[test]
fn a_data_dir_under_a_regular_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("file");
    std::fs::write(&file, "x").expect("write");
    let data = file.join("data");
    let err = refuses(&["--data-dir", arg(&data)], None);
    assert!(err.contains("--data-dir"), "{err}");
    assert!(err.contains(arg(&data)), "{err}");
    assert!(err.contains("Not a directory"), "{err}");
}

#[test]
fn an_unreadable_data_dir() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    // Root reads anything: run as `nobody` then, which may enter the temp dir
    // but not the data dir inside it.
    let uid = is_root().then_some(65_534);
    if uid.is_some() {
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let err = refuses(&["--data-dir", arg(&data)], uid);
    assert!(err.contains("--data-dir"), "{err}");
    assert!(err.contains(arg(&data)), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
}

#[test]
fn a_data_dir_file_that_is_not_a_database() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("payments.sqlite3");
    std::fs::write(&db, "these are my notes, not a database\n".repeat(200)).expect("write");
    let err = refuses(&["--data-dir", arg(dir.path())], None);
    assert!(err.contains(arg(&db)), "{err}");
    assert!(err.contains("not a SQLite database"), "{err}");
    assert!(err.contains("--data-dir"), "{err}");
}

#[test]
fn a_malformed_merchants_file_names_its_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let merchants = dir.path().join("merchants.toml");
    std::fs::write(
        &merchants,
        "[[merchant]]\nid = \"acme\"\nsecret = [\"unclosed\"\n",
    )
    .expect("write");
    let data = dir.path().join("data");
    let err = refuses(
        &["--data-dir", arg(&data), "--merchants", arg(&merchants)],
        None,
    );
    assert!(err.contains("--merchants"), "{err}");
    assert!(err.contains(arg(&merchants)), "{err}");
    assert!(err.contains("line 3"), "{err}");
}

#[test]
fn a_missing_merchants_file_and_a_duplicate_merchant() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let missing = dir.path().join("nowhere.toml");
    let err = refuses(
        &["--data-dir", arg(&data), "--merchants", arg(&missing)],
        None,
    );
    assert!(err.contains(arg(&missing)), "{err}");
    assert!(err.contains("No such file"), "{err}");

    let twice = dir.path().join("twice.toml");
    std::fs::write(
        &twice,
        "[[merchant]]\nid = \"a\"\nsecret = \"x\"\n[[merchant]]\nid = \"a\"\nsecret = \"y\"\n",
    )
    .expect("write");
    let err = refuses(
        &["--data-dir", arg(&data), "--merchants", arg(&twice)],
        None,
    );
    assert!(err.contains(arg(&twice)), "{err}");
    assert!(err.contains("\"a\" appears twice"), "{err}");
}

#[test]
fn a_database_flag_that_is_not_postgres_or_cannot_connect() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let err = refuses(
        &[
            "--data-dir",
            arg(&data),
            "--database",
            "mysql://root@127.0.0.1/x",
        ],
        None,
    );
    assert!(err.contains("--database mysql://root@127.0.0.1/x"), "{err}");
    assert!(err.contains("postgres://"), "{err}");

    // Nothing listens on port 1; the password never shows.
    let err = refuses(
        &[
            "--data-dir",
            arg(&data),
            "--database",
            "postgres://corral:hunter2@127.0.0.1:1/corral_test",
        ],
        None,
    );
    assert!(
        err.contains("--database postgres://corral:***@127.0.0.1:1/corral_test"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}
