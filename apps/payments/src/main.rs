//! The payments service, clustered on every core by corral, and a generator
//! of signed demo settlement batches.
//!
//! ```text
//! payments [--listen ADDR] [--workers N|max] [--data-dir DIR] [--merchants FILE]
//! payments gen-batch --lines 1000 > batch.csv
//! ```

use clap::{Parser, Subcommand};

use payments::gen::{generate_batch, GenArgs};
use payments::{AppState, Merchants, ServeArgs};

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
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
        AppState::new(config.clone(), 0)?;
    } else {
        // Settlement chunks are checked on rayon's global pool; size it like
        // the heavy runner so `--pool-threads` bounds the CPU threads a worker
        // uses (rayon would otherwise start one per core in every worker).
        rayon::ThreadPoolBuilder::new()
            .num_threads(config.pool_threads)
            .build_global()?;
    }
    cli.cluster.builder().run(move |worker| async move {
        let state = AppState::new(config, worker.slot()).map_err(corral::BoxError::from)?;
        let _sweeper = payments::jobs::start_sweeper(&state);
        let app = payments::router(state).layer(worker.track_requests());
        axum::serve(worker.listener(), app)
            .with_graceful_shutdown(worker.shutdown())
            .await
            .map_err(corral::BoxError::from)
    })?;
    Ok(())
}
