//! Log lines on stderr, each tagged with the process's role and pid so the
//! interleaved output of a whole cluster stays readable.

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Installs the subscriber unless the program installed its own. The level
/// comes from `RUST_LOG` (default `info`).
pub(crate) fn init(tag: String) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A worker's stderr is a pipe to its primary; once the primary is
        // gone, reporting the failed write would panic (eprintln on EPIPE)
        // and take the logging thread, the watchdog included, with it.
        .log_internal_errors(false)
        .event_format(Tagged {
            tag,
            inner: Format::default().with_target(false),
        })
        .try_init();
}

struct Tagged {
    tag: String,
    inner: Format,
}

impl<S, N> FormatEvent<S, N> for Tagged
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "{} ", self.tag)?;
        self.inner.format_event(ctx, writer, event)
    }
}
