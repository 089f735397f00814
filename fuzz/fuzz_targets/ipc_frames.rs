//! The length-delimited frames and postcard messages on a worker's IPC
//! socket: first byte = how many bytes arrive at a time.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| corral::fuzzing::ipc_frames(data));
