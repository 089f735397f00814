//! Generating signed demo settlement batches (`payments gen-batch`).

use std::fmt::Write as _;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::domain::merchants::{sign_line, Merchants};
use crate::domain::settlement::HEADER;

/// What to generate.
#[derive(Debug, Clone, clap::Args)]
pub struct GenArgs {
    /// Number of data lines.
    #[arg(long, default_value_t = 1000)]
    pub lines: usize,
    /// Merchants TOML file; the embedded demo merchants when absent.
    #[arg(long)]
    pub merchants: Option<std::path::PathBuf>,
    /// Seed for amounts and currencies (same seed, same batch).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Every Nth line gets a wrong signature (0 = none), to show rejections.
    #[arg(long, default_value_t = 0)]
    pub bad_every: usize,
    /// Prefix of the settlement ids; ids are `PREFIX-<n>`.
    #[arg(long, default_value = "stl")]
    pub id_prefix: String,
}

const CURRENCIES: [&str; 3] = ["EUR", "USD", "GBP"];

/// A CSV batch with header, `lines` lines signed with the merchants' secrets,
/// cycling through the merchants.
pub fn generate_batch(merchants: &Merchants, args: &GenArgs) -> String {
    let list = merchants.list();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut out = String::with_capacity(args.lines * 110 + HEADER.len() + 1);
    out.push_str(HEADER);
    out.push('\n');
    if list.is_empty() {
        return out;
    }
    for i in 0..args.lines {
        let m = list[i % list.len()];
        let id = format!("{}-{}-{i}", args.id_prefix, args.seed);
        let amount = rng.random_range(1..1_000_000u64).to_string();
        let currency = CURRENCIES[rng.random_range(0..CURRENCIES.len())];
        let mut sig = sign_line(m.secret.as_bytes(), &id, &m.id, &amount, currency);
        if args.bad_every > 0 && (i + 1) % args.bad_every == 0 {
            // Flip the last hex digit: well-formed but wrong.
            let last = if sig.ends_with('0') { '1' } else { '0' };
            sig.pop();
            sig.push(last);
        }
        let _ = writeln!(out, "{id},{},{amount},{currency},{sig}", m.id);
    }
    out
}
