//! The payments service, clustered on every core by corral, and a generator
//! of signed demo settlement batches.
//!
//! ```text
//! payments [--listen ADDR] [--workers N|max] [--data-dir DIR] [--merchants FILE]
//! payments gen-batch --lines 1000 > batch.csv
//! ```

use clap::{Parser, Subcommand};

use payments::gen::{generate_batch, GenArgs};
use std::process::ExitCode;
use std::sync::Arc;

use payments::events::ClusterEvents;
use payments::{AppState, Heavy, Merchants, ServeArgs};

#[derive(Parser)]
#[command(
    name = "payments",
    about = "corral's demo merchant API: payments, settlement batches, document thumbnails",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    cluster: corral::ClusterArgs,

    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print a signed demo settlement CSV to stdout.
    GenBatch(GenArgs),
}

/// Start-up errors are printed as their one-sentence Display (never Debug),
/// with exit status 1.
fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = e.to_string();
            let end = if text.ends_with('.') { "" } else { "." };
            eprintln!("error: {text}{end}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    if let Some(Command::GenBatch(args)) = cli.command {
        let merchants = match &args.merchants {
            Some(path) => Merchants::load(path)?,
            None => Merchants::demo(),
        };
        print!("{}", generate_batch(&merchants, &args));
        return Ok(());
    }
    // Read the merchants file and open the database once in the primary, so a
    // bad file or an unwritable directory is reported before any worker starts.
    let config = cli.serve.to_config()?;
    if !corral::Cluster::is_worker() {
        payments::store::open(
            &config.database,
            &config.data_dir,
            config.synchronous,
            config.busy_timeout,
        )?;
    }
    let mut cluster = cli.cluster.builder().pool_queue(config.pool_queue);
    if let Some(threads) = cli.serve.pool_threads {
        cluster = cluster.pool_threads(threads);
    }
    if let Some(broadcast) = cli.serve.broadcast.clone() {
        cluster = cluster.broadcast(broadcast);
    }
    cluster.run(move |worker| async move {
        // Heavy work runs on the worker's corral pool; events travel through
        // corral's broadcast so a subscriber on any worker sees them all.
        let heavy = Heavy::with_pool(worker.pool().clone(), config.pool_queue)
            .with_retry_after(config.retry_after_secs);
        let events = Arc::new(ClusterEvents::start(worker.clone()));
        let state = AppState::with_parts(config, worker.slot(), heavy, events)
            .map_err(corral::BoxError::from)?;
        // Readiness fails as soon as the node drains, while this worker
        // still serves (--drain-delay), so balancers move traffic first.
        let readiness = worker.clone();
        state.report_draining_by(move || readiness.is_node_draining());
        let _sweeper = payments::jobs::start_sweeper(&state);
        worker.register_metrics(|registry| state.metrics().register(registry));
        // Header and idle timeouts, the connection cap and request tracking
        // come with corral's serve.
        worker
            .serve(payments::router(state))
            .await
            .map_err(corral::BoxError::from)
    })?;
    Ok(())
}
