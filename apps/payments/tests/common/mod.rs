//! Shared helpers: serve the router on 127.0.0.1:0 and talk to it over TCP.
#![allow(dead_code)]

use std::sync::Arc;

use payments::{AppState, Config, Heavy, LocalEvents};

/// A served router.
pub struct Server {
    pub base: String,
    pub state: AppState,
    pub client: reqwest::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// GETs `path` and decodes the JSON answer, whatever its status.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json")
    }
}

/// A fresh data directory.
pub fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Config with small test-friendly defaults over `dir`.
pub fn config(dir: &std::path::Path) -> Config {
    Config::new(dir)
}

/// Serve a state built from `config` with the default runner.
pub async fn serve(config: Config, slot: usize) -> Server {
    let state = AppState::new(config, slot).expect("state");
    serve_state(state).await
}

/// Serve with a given heavy runner.
pub async fn serve_with_heavy(config: Config, heavy: Heavy) -> Server {
    let state =
        AppState::with_parts(config, 0, heavy, Arc::new(LocalEvents::default())).expect("state");
    serve_state(state).await
}

/// Serve an existing state.
pub async fn serve_state(state: AppState) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = payments::router(state.clone());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Server {
        base: format!("http://{addr}"),
        state,
        client: reqwest::Client::new(),
        task,
    }
}

/// A closure occupying one thread of a heavy runner.
pub struct Blocker {
    release: std::sync::mpsc::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Blocker {
    /// Let the blocker end and wait until its pool place is free again.
    pub async fn release(self) {
        let _ = self.release.send(());
        let _ = self.task.await;
    }
}

/// Occupy one thread of a heavy runner until released. Returns once the
/// blocker is running. Dropping the blocker also lets the closure end.
pub async fn block_one(heavy: &Heavy) -> Blocker {
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let h = heavy.clone();
    let task = tokio::spawn(async move {
        let _ = h
            .run(move || {
                let _ = started_tx.send(());
                let _ = release_rx.recv();
            })
            .await;
    });
    started_rx.await.expect("blocker started");
    Blocker {
        release: release_tx,
        task,
    }
}

#[path = "../signing/mod.rs"]
mod signing;
// Not every test binary signs lines.
#[allow(unused_imports)]
pub use signing::{line, secret, sign, HEADER};
