//! Settlement batches: the CSV format, the per-line checks, and the merge of
//! checked lines into a batch result.
//!
//! Checking is pure and works on independent chunks of whole lines, so the
//! chunks of a large batch run in parallel (rayon) on the CPU pool. The merge
//! is sequential because `duplicate` and `already_settled` depend on the lines
//! accepted before: it takes a `claim` callback that the store implements
//! inside one write transaction, so a batch commits atomically and every id is
//! settled exactly once even when batches race across processes.

use std::collections::{BTreeMap, HashSet};

use hmac::Mac;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::merchants::{feed, Merchants};
use super::payment::is_currency;

/// Why a whole batch was refused before any line was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SettlementError {
    /// A missing or wrong header line, or an empty body.
    #[error("the first line must be exactly `id,merchant_id,amount,currency,signature`")]
    BadHeader,
}

/// The required first line.
pub const HEADER: &str = "id,merchant_id,amount,currency,signature";

/// At most this many errors are listed in a result.
pub const MAX_ERRORS: usize = 10_000;

/// Target size of one parallel chunk, in bytes (cut at the next line end).
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Why a line was rejected. When several apply, the first in this order wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Not five well-formed fields.
    Malformed,
    /// The merchant is not known.
    UnknownMerchant,
    /// The signature does not match.
    BadSignature,
    /// The id was accepted earlier in this batch.
    Duplicate,
    /// The id was settled by an earlier batch.
    AlreadySettled,
}

/// A line that passed the checks that need only the line itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Settlement id, unique across merchants.
    pub id: &'a str,
    /// Known merchant.
    pub merchant_id: &'a str,
    /// Minor units, 1 ..= 2^63-1.
    pub amount: i64,
    /// Three upper-case letters.
    pub currency: &'a str,
}

/// The outcome of checking one line alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineCheck<'a> {
    /// Well-formed, known merchant, good signature.
    Valid(Record<'a>),
    /// Rejected; `id` is the first field when there is one.
    Rejected {
        /// The id field as written, if any.
        id: Option<&'a str>,
        /// Why.
        reason: Reason,
    },
}

/// A line rejected by the checks that need only the line itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection<'a> {
    /// Physical 1-based line number (the header is 1).
    pub line: usize,
    /// The id field as written, if any.
    pub id: Option<&'a str>,
    /// Why.
    pub reason: Reason,
}

/// Checked lines in a compact form: what the merge needs and nothing per
/// line beyond it. A valid line is at least 75 bytes of body, so keeping
/// its record costs less than the body did; rejected lines (which can be
/// one byte each) are kept only while they can still be among the first
/// [`MAX_ERRORS`], and otherwise only counted. This keeps a batch's memory
/// within a small multiple of its body whatever its lines look like.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked<'a> {
    /// Data lines checked.
    pub lines: usize,
    /// Valid lines with their line numbers, in line order.
    pub valid: Vec<(usize, Record<'a>)>,
    /// The first [`MAX_ERRORS`] rejected lines, in line order.
    pub rejected: Vec<Rejection<'a>>,
    /// All rejected lines, listed or not.
    pub rejected_count: usize,
}

impl<'a> Checked<'a> {
    /// Data lines checked.
    pub fn len(&self) -> usize {
        self.lines
    }

    /// Whether no line was checked.
    pub fn is_empty(&self) -> bool {
        self.lines == 0
    }

    /// Append the lines that follow (a later chunk's result).
    fn append(&mut self, next: Checked<'a>) {
        self.lines += next.lines;
        self.valid.extend(next.valid);
        let room = MAX_ERRORS.saturating_sub(self.rejected.len());
        self.rejected.extend(next.rejected.into_iter().take(room));
        self.rejected_count += next.rejected_count;
    }
}

/// One rejected line in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineError {
    /// Physical line number (header is 1).
    pub line: usize,
    /// The id field, or null when the line has none.
    pub id: Option<String>,
    /// Why.
    pub reason: Reason,
}

/// Count and sum of accepted lines for one merchant and currency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Total {
    /// Accepted lines.
    pub count: u64,
    /// Sum of their amounts (wide, since each amount may reach 2^63-1).
    pub amount: u128,
}

/// The answer for a finished batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResult {
    /// `stl_…`.
    pub batch_id: String,
    /// Data lines (header excluded).
    pub total: usize,
    /// Lines settled by this batch.
    pub accepted: usize,
    /// Lines rejected, all of them even when `errors` is truncated.
    pub rejected: usize,
    /// merchant → currency → totals, accepted lines only.
    pub totals: BTreeMap<String, BTreeMap<String, Total>>,
    /// Rejected lines sorted by line, at most [`MAX_ERRORS`].
    pub errors: Vec<LineError>,
    /// True when `errors` was cut at [`MAX_ERRORS`].
    pub errors_truncated: bool,
}

/// A contiguous run of whole lines.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    /// Physical number of the chunk's first line.
    pub first_line: usize,
    /// Number of lines in the chunk.
    pub lines: usize,
    /// The lines, each ended by `\n` except possibly the body's last one.
    pub bytes: &'a [u8],
}

/// Check the header line and return the data lines after it.
pub fn split_header(body: &[u8]) -> Result<&[u8], SettlementError> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let (first, rest) = match body.iter().position(|&b| b == b'\n') {
        Some(i) => (&body[..i], &body[i + 1..]),
        None => (body, &body[body.len()..]),
    };
    let first = first.strip_suffix(b"\r").unwrap_or(first);
    if first != HEADER.as_bytes() {
        return Err(SettlementError::BadHeader);
    }
    Ok(rest)
}

/// Number of data lines: a final newline does not make an extra line.
pub fn count_lines(data: &[u8]) -> usize {
    if data.is_empty() {
        return 0;
    }
    let newlines = data.iter().filter(|&&b| b == b'\n').count();
    if data.ends_with(b"\n") {
        newlines
    } else {
        newlines + 1
    }
}

/// Cut the data lines into chunks of about `target` bytes of whole lines.
pub fn split_chunks(data: &[u8], target: usize) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut next_line = 2; // line 1 is the header
    while start < data.len() {
        let want = (start + target.max(1)).min(data.len());
        let end = match data[want - 1..].iter().position(|&b| b == b'\n') {
            Some(i) => want + i,
            None => data.len(),
        };
        let bytes = &data[start..end];
        let lines = count_lines(bytes);
        chunks.push(Chunk {
            first_line: next_line,
            lines,
            bytes,
        });
        next_line += lines;
        start = end;
    }
    chunks
}

/// Check every line of a chunk on its own.
pub fn check_chunk<'a>(chunk: &Chunk<'a>, merchants: &Merchants) -> Checked<'a> {
    let mut bytes = chunk.bytes;
    if let Some(stripped) = bytes.strip_suffix(b"\n") {
        bytes = stripped;
    }
    let mut out = Checked::default();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = chunk.first_line + i;
        out.lines += 1;
        match check_line(raw, merchants) {
            LineCheck::Valid(record) => out.valid.push((line, record)),
            LineCheck::Rejected { id, reason } => {
                out.rejected_count += 1;
                if out.rejected.len() < MAX_ERRORS {
                    out.rejected.push(Rejection { line, id, reason });
                }
            }
        }
    }
    out
}

/// Check one line (without its `\n`; a trailing `\r` is accepted).
pub fn check_line<'a>(raw: &'a [u8], merchants: &Merchants) -> LineCheck<'a> {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let malformed = |id| LineCheck::Rejected {
        id,
        reason: Reason::Malformed,
    };
    let Ok(text) = std::str::from_utf8(raw) else {
        return malformed(None);
    };
    let mut fields = text.split(',');
    let id = fields.next().filter(|s| !s.is_empty());
    let (Some(merchant_id), Some(amount_text), Some(currency), Some(signature), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return malformed(id);
    };
    let Some(id_text) = id else {
        return malformed(None);
    };
    let mut sig = [0u8; 32];
    let well_formed = is_valid_id(id_text)
        && !merchant_id.is_empty()
        && is_currency(currency)
        && signature.len() == 64
        && signature
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && hex::decode_to_slice(signature, &mut sig).is_ok();
    let amount = match parse_amount(amount_text) {
        Some(a) if well_formed => a,
        _ => return malformed(id),
    };
    let Some(mut mac) = merchants.mac(merchant_id) else {
        return LineCheck::Rejected {
            id,
            reason: Reason::UnknownMerchant,
        };
    };
    feed(&mut mac, id_text, merchant_id, amount_text, currency);
    // Constant-time comparison.
    if mac.verify_slice(&sig).is_err() {
        return LineCheck::Rejected {
            id,
            reason: Reason::BadSignature,
        };
    }
    LineCheck::Valid(Record {
        id: id_text,
        merchant_id,
        amount,
        currency,
    })
}

/// An id: 1–255 visible ASCII characters.
fn is_valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// Digits only, no sign, no leading zero, 1 ..= 2^63-1.
pub fn parse_amount(s: &str) -> Option<i64> {
    if s.is_empty() || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<i64>().ok()
}

/// Check all data lines, in parallel chunks. `on_progress(lines_done)` is
/// called after each wave of chunks so callers can report progress.
///
/// ```
/// use payments::settlement::{check_all, merge, split_header, Reason};
/// use payments::Merchants;
///
/// let body = b"id,merchant_id,amount,currency,signature\nx\n";
/// let checked = check_all(split_header(body)?, &Merchants::demo(), |_| {});
/// let result = merge::<()>("stl_demo", &checked, |_| Ok(true)).unwrap();
/// assert_eq!((result.total, result.rejected), (1, 1));
/// assert_eq!(result.errors[0].reason, Reason::Malformed);
/// # Ok::<(), payments::settlement::SettlementError>(())
/// ```
pub fn check_all<'a>(
    data: &'a [u8],
    merchants: &Merchants,
    mut on_progress: impl FnMut(usize),
) -> Checked<'a> {
    let chunks = split_chunks(data, CHUNK_BYTES);
    // A wave keeps every rayon thread busy while letting progress be
    // reported, and bounds the rejections held before they are cut to
    // MAX_ERRORS to a few chunks' worth.
    let wave = rayon::current_num_threads().max(1) * 4;
    let mut out = Checked::default();
    for group in chunks.chunks(wave) {
        let checked: Vec<Checked<'a>> = group
            .par_iter()
            .map(|c| check_chunk(c, merchants))
            .collect();
        for part in checked {
            out.append(part);
        }
        on_progress(out.lines);
    }
    out
}

/// Merge checked lines, in line order, into a batch result.
///
/// `claim(record)` must record the id as settled by this batch and return
/// `Ok(true)`, or return `Ok(false)` when an earlier batch already settled it.
/// It is called for each valid line whose id this batch has not accepted yet.
pub fn merge<E>(
    batch_id: &str,
    checked: &Checked<'_>,
    mut claim: impl FnMut(&Record<'_>) -> Result<bool, E>,
) -> Result<BatchResult, E> {
    let mut accepted_ids: HashSet<&str> = HashSet::new();
    let mut totals: BTreeMap<String, BTreeMap<String, Total>> = BTreeMap::new();
    let mut errors = Vec::new();
    // Rejections found here (duplicate, already settled); the checks'
    // are all counted in `checked.rejected_count`.
    let mut merge_rejected = 0;
    let mut listed = checked.rejected.iter().peekable();
    let push = |errors: &mut Vec<LineError>, line: usize, id: Option<&str>, reason| {
        if errors.len() < MAX_ERRORS {
            errors.push(LineError {
                line,
                id: id.map(str::to_owned),
                reason,
            });
        }
    };
    for (line, rec) in &checked.valid {
        // Errors are listed in line order: first the checks' rejections
        // that come before this line. Those not listed come after
        // MAX_ERRORS listed ones, so they could not be listed anyway.
        while let Some(r) = listed.next_if(|r| r.line < *line) {
            push(&mut errors, r.line, r.id, r.reason);
        }
        // Only an accepted id makes later lines duplicates; a line
        // rejected as already settled does not.
        if accepted_ids.contains(rec.id) {
            merge_rejected += 1;
            push(&mut errors, *line, Some(rec.id), Reason::Duplicate);
        } else if claim(rec)? {
            accepted_ids.insert(rec.id);
            let t = totals
                .entry(rec.merchant_id.to_owned())
                .or_default()
                .entry(rec.currency.to_owned())
                .or_default();
            t.count += 1;
            t.amount += rec.amount as u128;
        } else {
            merge_rejected += 1;
            push(&mut errors, *line, Some(rec.id), Reason::AlreadySettled);
        }
    }
    for r in listed {
        push(&mut errors, r.line, r.id, r.reason);
    }
    let rejected = checked.rejected_count + merge_rejected;
    Ok(BatchResult {
        batch_id: batch_id.to_owned(),
        total: checked.lines,
        accepted: accepted_ids.len(),
        rejected,
        totals,
        errors_truncated: rejected > MAX_ERRORS,
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::merchants::sign_line;

    fn signed(id: &str, m: &str, amount: &str, cur: &str) -> String {
        let merchants = Merchants::demo();
        let secret = merchants
            .get(m)
            .map(|x| x.secret.clone())
            .unwrap_or_default();
        format!(
            "{id},{m},{amount},{cur},{}",
            sign_line(secret.as_bytes(), id, m, amount, cur)
        )
    }

    #[test]
    fn header_rules() {
        assert!(split_header(b"").is_err());
        assert!(split_header(b"id,merchant_id\n").is_err());
        assert_eq!(
            split_header(HEADER.as_bytes()).map(|d| d.len()).ok(),
            Some(0)
        );
        assert_eq!(
            split_header(format!("{HEADER}\r\nx").as_bytes()).ok(),
            Some(&b"x"[..])
        );
    }

    #[test]
    fn line_counting() {
        assert_eq!(count_lines(b""), 0);
        assert_eq!(count_lines(b"a"), 1);
        assert_eq!(count_lines(b"a\n"), 1);
        assert_eq!(count_lines(b"a\n\nb"), 3);
    }

    #[test]
    fn chunks_cover_all_lines_in_order() {
        let data: String = (0..1000).map(|i| format!("line{i}\n")).collect();
        let chunks = split_chunks(data.as_bytes(), 37);
        assert_eq!(chunks.iter().map(|c| c.lines).sum::<usize>(), 1000);
        let mut expect = 2;
        for c in &chunks {
            assert_eq!(c.first_line, expect);
            expect += c.lines;
        }
    }

    #[test]
    fn reasons_and_precedence() {
        let m = Merchants::demo();
        let good = signed("s1", "acme", "100", "EUR");
        assert!(matches!(
            check_line(good.as_bytes(), &m),
            LineCheck::Valid(_)
        ));
        let reason = |line: &str| match check_line(line.as_bytes(), &m) {
            LineCheck::Rejected { reason, .. } => Some(reason),
            LineCheck::Valid(_) => None,
        };
        assert_eq!(reason(""), Some(Reason::Malformed));
        assert_eq!(reason("a,b,c"), Some(Reason::Malformed));
        assert_eq!(
            reason(&signed("s1", "acme", "0100", "EUR")),
            Some(Reason::Malformed)
        );
        assert_eq!(
            reason(&signed("s1", "acme", "-1", "EUR")),
            Some(Reason::Malformed)
        );
        assert_eq!(
            reason(&signed("s1", "acme", "9223372036854775808", "EUR")),
            Some(Reason::Malformed)
        );
        assert_eq!(
            reason(&signed("s1", "acme", "9223372036854775807", "EUR")),
            None
        );
        // Malformed beats unknown merchant.
        assert_eq!(
            reason(&signed("s1", "nobody", "1", "eur")),
            Some(Reason::Malformed)
        );
        assert_eq!(
            reason(&signed("s1", "nobody", "1", "EUR")),
            Some(Reason::UnknownMerchant)
        );
        let tampered = signed("s1", "acme", "100", "EUR").replace(",100,", ",101,");
        assert_eq!(reason(&tampered), Some(Reason::BadSignature));
        assert_eq!(reason(&format!("{good}\r")), None);
    }

    #[test]
    fn duplicate_only_after_an_accepted_line() {
        let m = Merchants::demo();
        let bad = signed("d", "acme", "1", "EUR").replace(",1,", ",2,");
        let good = signed("d", "acme", "1", "EUR");
        let data = format!("{bad}\n{good}\n{good}\n");
        let lines = check_all(data.as_bytes(), &m, |_| {});
        assert_eq!(
            (lines.lines, lines.valid.len(), lines.rejected_count),
            (3, 2, 1)
        );
        let r = merge::<()>("b", &lines, |_| Ok(true)).expect("merge");
        assert_eq!((r.accepted, r.rejected), (1, 2));
        assert_eq!(r.errors[0].reason, Reason::BadSignature);
        assert_eq!(r.errors[1].reason, Reason::Duplicate);
        assert_eq!(r.errors[1].line, 4);
        // Settled earlier: both lines are already_settled, none duplicate.
        let r = merge::<()>("b", &lines, |_| Ok(false)).expect("merge");
        assert_eq!(r.accepted, 0);
        assert_eq!(r.errors[1].reason, Reason::AlreadySettled);
        assert_eq!(r.errors[2].reason, Reason::AlreadySettled);
    }

    #[test]
    fn rejections_beyond_the_cap_are_counted_not_kept() {
        let m = Merchants::demo();
        let good = signed("late", "acme", "1", "EUR");
        // More malformed lines than the cap, over several chunks and waves,
        // then a valid line settled twice: its duplicate is counted too.
        let mut data = "x\n".repeat(MAX_ERRORS + CHUNK_BYTES);
        data.push_str(&format!("{good}\n{good}\n"));
        let lines = check_all(data.as_bytes(), &m, |_| {});
        assert_eq!(lines.rejected.len(), MAX_ERRORS);
        assert_eq!(lines.rejected_count, MAX_ERRORS + CHUNK_BYTES);
        let r = merge::<()>("b", &lines, |_| Ok(true)).expect("merge");
        assert_eq!(r.total, MAX_ERRORS + CHUNK_BYTES + 2);
        assert_eq!((r.accepted, r.rejected), (1, MAX_ERRORS + CHUNK_BYTES + 1));
        assert!(r.errors_truncated);
        assert_eq!(r.errors.len(), MAX_ERRORS);
        assert!(r.errors.windows(2).all(|w| w[0].line < w[1].line));
        assert_eq!(r.errors[MAX_ERRORS - 1].line, MAX_ERRORS + 1);
    }

    #[test]
    fn errors_interleave_in_line_order() {
        let m = Merchants::demo();
        let good = signed("i", "acme", "1", "EUR");
        let data = format!("x\n{good}\ny\n{good}\nz\n");
        let lines = check_all(data.as_bytes(), &m, |_| {});
        let r = merge::<()>("b", &lines, |_| Ok(true)).expect("merge");
        let got: Vec<(usize, Reason)> = r.errors.iter().map(|e| (e.line, e.reason)).collect();
        assert_eq!(
            got,
            vec![
                (2, Reason::Malformed),
                (4, Reason::Malformed),
                (5, Reason::Duplicate),
                (6, Reason::Malformed)
            ]
        );
    }
}
