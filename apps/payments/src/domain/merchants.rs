//! The merchants allowed to use the API and their signing secrets.
//!
//! Loaded once at start from a TOML file of `[[merchant]]` tables; a demo file
//! is embedded so the binary runs from any directory.

use std::collections::HashMap;
use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;

/// The demo merchants file shipped inside the binary.
pub const DEMO_MERCHANTS_TOML: &str = include_str!("../../merchants.demo.toml");

/// HMAC-SHA256, the settlement signature scheme.
pub type HmacSha256 = Hmac<Sha256>;

/// One merchant.
#[derive(Debug, Clone, Deserialize)]
pub struct Merchant {
    /// Merchant id as used in requests.
    pub id: String,
    /// Signing secret, used as raw UTF-8 bytes.
    pub secret: String,
}

#[derive(Deserialize)]
struct MerchantsFile {
    #[serde(default)]
    merchant: Vec<Merchant>,
}

/// Why a merchants file was refused. Each message is one sentence naming
/// the file (or flag), the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum MerchantsError {
    /// The file could not be read.
    #[error(
        "--merchants {path}: cannot read the file ({source}); pass a readable merchants TOML file"
    )]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML is invalid.
    #[error("{origin}: line {line}: {message}; fix the TOML (a list of [[merchant]] tables with id and secret strings)")]
    Parse {
        /// `--merchants FILE` or `the merchants TOML`.
        origin: String,
        /// 1-based line of the error.
        line: usize,
        /// The parser's explanation.
        message: String,
    },
    /// An id is empty or appears twice.
    #[error("{origin}: {problem}; give every merchant its own non-empty id")]
    Invalid {
        /// `--merchants FILE` or `the merchants TOML`.
        origin: String,
        /// What is wrong.
        problem: String,
    },
}

/// The set of known merchants, with a ready HMAC key per merchant.
#[derive(Clone)]
pub struct Merchants {
    by_id: HashMap<String, (Merchant, HmacSha256)>,
}

impl std::fmt::Debug for Merchants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        let mut ids: Vec<&String> = self.by_id.keys().collect();
        ids.sort();
        f.debug_struct("Merchants").field("ids", &ids).finish()
    }
}

impl Merchants {
    /// Parse a merchants TOML document.
    pub fn from_toml(text: &str) -> Result<Self, MerchantsError> {
        Self::parse(text, "the merchants TOML")
    }

    /// Parse `text`, naming it `origin` in errors.
    fn parse(text: &str, origin: &str) -> Result<Self, MerchantsError> {
        let file: MerchantsFile = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |span| span.start).min(text.len());
            MerchantsError::Parse {
                origin: origin.to_owned(),
                line: text.as_bytes()[..at]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1,
                message: e.message().trim_end_matches('.').to_owned(),
            }
        })?;
        Self::from_list_named(file.merchant, origin)
    }

    /// Build from a list; ids must be non-empty and unique.
    pub fn from_list(list: Vec<Merchant>) -> Result<Self, MerchantsError> {
        Self::from_list_named(list, "the merchants list")
    }

    fn from_list_named(list: Vec<Merchant>, origin: &str) -> Result<Self, MerchantsError> {
        let invalid = |problem: String| MerchantsError::Invalid {
            origin: origin.to_owned(),
            problem,
        };
        let mut by_id = HashMap::with_capacity(list.len());
        for m in list {
            if m.id.is_empty() {
                return Err(invalid("a merchant has an empty id".into()));
            }
            let mac = HmacSha256::new_from_slice(m.secret.as_bytes())
                .map_err(|e| invalid(format!("merchant {:?} has an unusable secret: {e}", m.id)))?;
            let id = m.id.clone();
            if by_id.insert(id.clone(), (m, mac)).is_some() {
                return Err(invalid(format!("merchant id {id:?} appears twice")));
            }
        }
        Ok(Merchants { by_id })
    }

    /// Read a merchants file (the `--merchants` flag).
    pub fn load(path: &Path) -> Result<Self, MerchantsError> {
        let text = std::fs::read_to_string(path).map_err(|source| MerchantsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &format!("--merchants {}", path.display()))
    }

    /// The embedded demo merchants.
    pub fn demo() -> Self {
        // The embedded file is part of the build; a test checks it parses.
        Self::from_toml(DEMO_MERCHANTS_TOML).unwrap_or_else(|_| Merchants {
            by_id: HashMap::new(),
        })
    }

    /// Whether `id` is a known merchant.
    pub fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    /// The merchant with this id.
    pub fn get(&self, id: &str) -> Option<&Merchant> {
        self.by_id.get(id).map(|(m, _)| m)
    }

    /// A fresh HMAC keyed with the merchant's secret (cloned from a prepared
    /// key, so per-line signature checks do not redo the key schedule).
    pub fn mac(&self, id: &str) -> Option<HmacSha256> {
        self.by_id.get(id).map(|(_, mac)| mac.clone())
    }

    /// All merchants, sorted by id.
    pub fn list(&self) -> Vec<&Merchant> {
        let mut v: Vec<&Merchant> = self.by_id.values().map(|(m, _)| m).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Number of merchants.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are no merchants.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// The settlement signature of one line: lower-case hex HMAC-SHA256 of
/// `id|merchant_id|amount|currency`, keyed with the merchant's secret.
pub fn sign_line(
    secret: &[u8],
    id: &str,
    merchant_id: &str,
    amount: &str,
    currency: &str,
) -> String {
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        // HMAC accepts keys of any length; this branch cannot be taken.
        Err(_) => return String::new(),
    };
    feed(&mut mac, id, merchant_id, amount, currency);
    hex::encode(mac.finalize().into_bytes())
}

/// Feed the signed text of a line into `mac`.
pub fn feed(mac: &mut HmacSha256, id: &str, merchant_id: &str, amount: &str, currency: &str) {
    mac.update(id.as_bytes());
    mac.update(b"|");
    mac.update(merchant_id.as_bytes());
    mac.update(b"|");
    mac.update(amount.as_bytes());
    mac.update(b"|");
    mac.update(currency.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_file_parses() {
        let m = Merchants::from_toml(DEMO_MERCHANTS_TOML).expect("demo merchants parse");
        assert!(m.len() >= 2);
        assert!(m.contains("acme"));
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let text = "[[merchant]]\nid='a'\nsecret='x'\n[[merchant]]\nid='a'\nsecret='y'\n";
        assert!(Merchants::from_toml(text).is_err());
    }

    #[test]
    fn parse_errors_name_the_line() {
        let text = "[[merchant]]\nid = 'a'\nsecret = ['x'\n";
        let err = Merchants::from_toml(text).expect_err("refused");
        assert!(
            matches!(err, MerchantsError::Parse { line: 3, .. }),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("the merchants TOML: line 3: "),
            "{err}"
        );
    }

    #[test]
    fn known_hmac_vector() {
        // RFC 4231 test case 2.
        let mut mac = HmacSha256::new_from_slice(b"Jefe").expect("key");
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
