//! The header that travels with a passed connection's descriptor.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| corral::fuzzing::passed_header(data));
