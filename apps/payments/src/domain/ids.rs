//! Ids and timestamps of stored records.

use rand::Rng;

/// `pay_` + 24 random characters from a URL-safe alphabet.
pub fn new_payment_id() -> String {
    format!("pay_{}", random_token(24))
}

/// `stl_` + 24 random characters: a settlement batch.
pub fn new_batch_id() -> String {
    format!("stl_{}", random_token(24))
}

/// A random lower-case alphanumeric token.
pub fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Current time, RFC 3339 in UTC with millisecond precision.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_shapes() {
        let p = new_payment_id();
        assert!(p.starts_with("pay_") && p.len() == 28, "{p}");
        assert!(new_batch_id().starts_with("stl_"));
        assert!(random_token(40)
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
        assert!(now_rfc3339().ends_with('Z'));
    }
}
