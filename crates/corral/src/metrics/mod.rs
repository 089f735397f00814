//! Measurements: event-loop delay, worker statistics.

mod event_loop_delay;

pub use event_loop_delay::{EventLoopDelay, LoopDelayStats};
