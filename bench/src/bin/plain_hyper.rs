//! The comparison peer: one process, tokio's multi-threaded runtime (one
//! thread per core), hyper serving the same routes as the `hello` example.
//! This is what "a hand-rolled tokio setup" looks like.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "plain-hyper: listening on http://{}",
        listener.local_addr()?
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(answer);
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = if request.uri().path() == "/work" {
        let us = corral_bench::work_micros(request.uri().query());
        format!("worked {us} us ({:x})\n", corral_bench::burn_cpu(us))
    } else {
        format!("hello from plain hyper (pid {})", std::process::id())
    };
    Ok(Response::new(Full::new(Bytes::from(body))))
}
