//! CPU-heavy work and its bounds: the admission-bounded runner on the
//! worker's corral pool, and thumbnail decoding under memory limits.

pub mod heavy;
pub mod thumbnail;

pub use heavy::{Admission, Heavy, HeavyError, Overloaded};
