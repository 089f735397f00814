//! Single-process runner for development (`payments serve`) and the batch
//! generator (`payments gen-batch`). The clustered main lives elsewhere.

use clap::{Parser, Subcommand};

use payments::gen::{generate_batch, GenArgs};
use payments::{AppState, Merchants, ServeArgs};

#[derive(Parser)]
#[command(name = "payments", about = "corral's demo merchant API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API from this one process.
    Serve(ServeArgs),
    /// Print a signed demo settlement CSV to stdout.
    GenBatch(GenArgs),
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::GenBatch(args) => {
            let merchants = match &args.merchants {
                Some(path) => Merchants::load(path)?,
                None => Merchants::demo(),
            };
            print!("{}", generate_batch(&merchants, &args));
            Ok(())
        }
        Command::Serve(args) => {
            let config = args.to_config()?;
            // One event loop, as each corral worker has.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let state = AppState::new(config, 0)?;
                let _sweeper = payments::jobs::start_sweeper(&state);
                let listener = tokio::net::TcpListener::bind(&args.listen).await?;
                println!("listening on http://{}", listener.local_addr()?);
                axum::serve(listener, payments::router(state)).await?;
                Ok(())
            })
        }
    }
}
