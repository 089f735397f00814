//! The PROXY protocol header reader the primary runs on every connection
//! with `--proxy-protocol`: first byte = how many bytes arrive at a time.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| corral::fuzzing::proxy_header(data));
