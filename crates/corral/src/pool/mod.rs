//! The CPU pool: runs heavy closures off the event loop.
