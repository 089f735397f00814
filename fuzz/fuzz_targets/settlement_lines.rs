//! A settlement batch as `POST /v1/settlements` receives it: the header
//! line, the cut into chunks (first byte = chunk size) and every line's
//! check against the demo merchants. Lines are neither lost nor invented by
//! the cut, and a line accepted as valid really carries its merchant's
//! signature.
#![no_main]

use std::sync::OnceLock;

use payments::merchants::sign_line;
use payments::settlement::{check_chunk, count_lines, split_chunks, split_header, LineCheck};
use payments::Merchants;

fn merchants() -> &'static Merchants {
    static MERCHANTS: OnceLock<Merchants> = OnceLock::new();
    MERCHANTS.get_or_init(Merchants::demo)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&size, body)) = data.split_first() else {
        return;
    };
    let merchants = merchants();
    // Fuzzed bytes rarely start with the exact header line: check the lines
    // both after a real header and as the body itself.
    let lines = match split_header(body) {
        Ok(lines) => lines,
        Err(_) => body,
    };
    let chunks = split_chunks(lines, usize::from(size).max(1));
    let counted: usize = chunks.iter().map(|chunk| chunk.lines).sum();
    assert_eq!(
        counted,
        count_lines(lines),
        "the chunks lost or invented lines"
    );
    let mut next = 2;
    for chunk in &chunks {
        assert_eq!(chunk.first_line, next);
        next += chunk.lines;
        let checked = check_chunk(chunk, merchants);
        assert_eq!(checked.len(), chunk.lines);
        for line in checked {
            if let LineCheck::Valid(record) = line.check {
                let merchant = merchants.get(record.merchant_id).expect("a known merchant");
                assert!(record.amount >= 1);
                let signed = sign_line(
                    merchant.secret.as_bytes(),
                    record.id,
                    record.merchant_id,
                    &record.amount.to_string(),
                    record.currency,
                );
                assert!(
                    chunk
                        .bytes
                        .windows(signed.len())
                        .any(|w| w == signed.as_bytes()),
                    "accepted a line without its signature"
                );
            }
        }
    }
});
