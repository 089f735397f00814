//! Settlement signing, computed in the tests independently of the service's
//! own code, with the demo merchants' secrets written out here so the tests
//! do not trust the crate's copy.

/// Lower-case hex HMAC-SHA256 of `id|merchant|amount|currency`.
pub fn sign(secret: &str, id: &str, merchant: &str, amount: &str, currency: &str) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key");
    mac.update(format!("{id}|{merchant}|{amount}|{currency}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Demo merchant secrets (as in merchants.demo.toml).
pub fn secret(merchant: &str) -> &'static str {
    match merchant {
        "acme" => "acme-demo-secret-5f2b9c",
        "globex" => "globex-demo-secret-81d0e4",
        "initech" => "initech-demo-secret-c73a16",
        _ => "not-a-merchant",
    }
}

/// A correctly signed settlement line.
pub fn line(id: &str, merchant: &str, amount: &str, currency: &str) -> String {
    let sig = sign(secret(merchant), id, merchant, amount, currency);
    format!("{id},{merchant},{amount},{currency},{sig}")
}

/// The settlement CSV header line.
pub const HEADER: &str = "id,merchant_id,amount,currency,signature";
