//! The second comparison peer: one process, tokio's multi-threaded runtime,
//! axum serving the same routes as the `hello` example (the same framework
//! corral's example uses, so the comparison isolates the process model).

use axum::extract::RawQuery;
use axum::routing::get;
use axum::Router;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("plain-axum: listening on http://{}", listener.local_addr()?);
    let greeting = format!("hello from plain axum (pid {})", std::process::id());
    let app = Router::new()
        .route("/", get(move || async move { greeting }))
        .route(
            "/work",
            get(|RawQuery(query): RawQuery| async move {
                let us = corral_bench::work_micros(query.as_deref());
                format!("worked {us} us ({:x})\n", corral_bench::burn_cpu(us))
            }),
        );
    axum::serve(listener, app).await
}
