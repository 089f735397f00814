//! Measurements: event-loop delay, worker statistics.
