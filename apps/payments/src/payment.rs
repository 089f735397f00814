//! Payments: request validation, the payment record, and the idempotency
//! rules (what a key may be, what "the same request" means).
//!
//! Storage and the cross-process race are handled in [`crate::store`]; this
//! module is pure so every rule can be tested on its own.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;
use crate::merchants::Merchants;
use axum::http::StatusCode;

/// Largest accepted `POST /v1/payments` body.
pub const MAX_PAYMENT_BODY: usize = 1024 * 1024;

/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Longest `reference`, in characters.
pub const MAX_REFERENCE_CHARS: usize = 255;

/// A validated payment request: the four fields that identify it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewPayment {
    /// A known merchant.
    pub merchant_id: String,
    /// Minor units, 1 ..= 2^63-1.
    pub amount: i64,
    /// Three upper-case ASCII letters.
    pub currency: String,
    /// Free text, at most 255 characters.
    pub reference: String,
}

impl NewPayment {
    /// The canonical form of the request, compared when a key is reused:
    /// equal JSON over the four fields, whatever the key order or spacing.
    pub fn fingerprint(&self) -> String {
        // Field order is fixed by the struct, so equal requests give equal text.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A stored payment, as answered by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// `pay_…`.
    pub id: String,
    /// Merchant.
    pub merchant_id: String,
    /// Minor units.
    pub amount: i64,
    /// ISO-style currency code.
    pub currency: String,
    /// Merchant's reference.
    pub reference: String,
    /// Always `captured` for now.
    pub status: String,
    /// RFC 3339, UTC.
    pub created_at: String,
}

impl Payment {
    /// A new captured payment with a fresh id and the current time.
    pub fn capture(req: &NewPayment) -> Self {
        Payment {
            id: new_payment_id(),
            merchant_id: req.merchant_id.clone(),
            amount: req.amount,
            currency: req.currency.clone(),
            reference: req.reference.clone(),
            status: "captured".into(),
            created_at: now_rfc3339(),
        }
    }

    /// The JSON answer body.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `pay_` + 24 random characters from a URL-safe alphabet.
pub fn new_payment_id() -> String {
    format!("pay_{}", random_token(24))
}

/// A random lower-case alphanumeric token.
pub fn random_token(len: usize) -> String {
    use rand::Rng;
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

/// Check an `Idempotency-Key` header value: 1–255 visible ASCII characters.
/// Absent or empty → 400 `missing_idempotency_key`; otherwise bad → 400
/// `invalid_idempotency_key`.
pub fn check_idempotency_key(value: Option<&[u8]>) -> Result<String, ApiError> {
    let bytes = match value {
        None | Some(b"") => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "missing_idempotency_key",
                "the Idempotency-Key header is required",
            ))
        }
        Some(b) => b,
    };
    let visible = bytes.iter().all(|b| (0x21..=0x7e).contains(b));
    if bytes.len() > MAX_IDEMPOTENCY_KEY || !visible {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        ));
    }
    // All bytes are ASCII, so this cannot fail.
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// Parse and validate a payment body. Malformed JSON → 400; anything else
/// wrong → 422 naming the field (checked in order: merchant_id, amount,
/// currency, reference, then whether the merchant exists).
pub fn parse_new_payment(body: &[u8], merchants: &Merchants) -> Result<NewPayment, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("request body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            "request body must be a JSON object",
        ));
    };

    let merchant_id = match obj.get("merchant_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => {
            return Err(ApiError::invalid_field(
                "merchant_id",
                "merchant_id must not be empty",
            ))
        }
        Some(_) => {
            return Err(ApiError::invalid_field(
                "merchant_id",
                "merchant_id must be a string",
            ))
        }
        None => {
            return Err(ApiError::invalid_field(
                "merchant_id",
                "merchant_id is required",
            ))
        }
    };

    let amount =
        match obj.get("amount") {
            // `as_i64` is None for floats (even `100.0`) and for integers above 2^63-1.
            Some(Value::Number(n)) => match n.as_i64() {
                Some(a) if a >= 1 => a,
                _ => return Err(ApiError::invalid_field(
                    "amount",
                    "amount must be an integer number of minor units from 1 to 9223372036854775807",
                )),
            },
            Some(_) => {
                return Err(ApiError::invalid_field(
                    "amount",
                    "amount must be an integer",
                ))
            }
            None => return Err(ApiError::invalid_field("amount", "amount is required")),
        };

    let currency = match obj.get("currency") {
        Some(Value::String(s)) if is_currency(s) => s.clone(),
        Some(_) => {
            return Err(ApiError::invalid_field(
                "currency",
                "currency must be three upper-case letters, e.g. EUR",
            ))
        }
        None => return Err(ApiError::invalid_field("currency", "currency is required")),
    };

    let reference = match obj.get("reference") {
        Some(Value::String(s)) if s.chars().count() <= MAX_REFERENCE_CHARS => s.clone(),
        Some(Value::String(_)) => {
            return Err(ApiError::invalid_field(
                "reference",
                "reference must be at most 255 characters",
            ))
        }
        Some(_) => {
            return Err(ApiError::invalid_field(
                "reference",
                "reference must be a string",
            ))
        }
        None => {
            return Err(ApiError::invalid_field(
                "reference",
                "reference is required",
            ))
        }
    };

    if !merchants.contains(&merchant_id) {
        return Err(ApiError {
            code: "unknown_merchant",
            ..ApiError::invalid_field("merchant_id", format!("unknown merchant {merchant_id:?}"))
        });
    }

    Ok(NewPayment {
        merchant_id,
        amount,
        currency,
        reference,
    })
}

/// Three upper-case ASCII letters.
pub fn is_currency(s: &str) -> bool {
    s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase())
}

/// 409 for a key reused with a different body.
pub fn key_conflict() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_key_reused",
        "this Idempotency-Key was already used with a different request body",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m() -> Merchants {
        Merchants::demo()
    }

    fn code(body: &str) -> (u16, &'static str, Option<&'static str>) {
        match parse_new_payment(body.as_bytes(), &m()) {
            Ok(_) => (200, "ok", None),
            Err(e) => (e.status.as_u16(), e.code, e.field),
        }
    }

    #[test]
    fn validation_rules() {
        let ok = r#"{"merchant_id":"acme","amount":100,"currency":"EUR","reference":"r"}"#;
        assert_eq!(code(ok).0, 200);
        assert_eq!(code("{").0, 400);
        assert_eq!(code("[]").0, 422);
        assert_eq!(
            code(r#"{"merchant_id":"acme","amount":100.0,"currency":"EUR","reference":"r"}"#),
            (422, "invalid_field", Some("amount"))
        );
        assert_eq!(
            code(r#"{"merchant_id":"acme","amount":0,"currency":"EUR","reference":"r"}"#).2,
            Some("amount")
        );
        assert_eq!(
            code(r#"{"merchant_id":"acme","amount":9223372036854775808,"currency":"EUR","reference":"r"}"#).2,
            Some("amount")
        );
        assert_eq!(
            code(r#"{"merchant_id":"acme","amount":9223372036854775807,"currency":"EUR","reference":"r"}"#).0,
            200
        );
        assert_eq!(
            code(r#"{"merchant_id":"acme","amount":1,"currency":"eur","reference":"r"}"#).2,
            Some("currency")
        );
        assert_eq!(
            code(r#"{"merchant_id":"acme","amount":1,"currency":"EUR"}"#).2,
            Some("reference")
        );
        let long = "é".repeat(256);
        let body =
            format!(r#"{{"merchant_id":"acme","amount":1,"currency":"EUR","reference":"{long}"}}"#);
        assert_eq!(code(&body).2, Some("reference"));
        assert_eq!(
            code(r#"{"merchant_id":"nobody","amount":1,"currency":"EUR","reference":"r"}"#),
            (422, "unknown_merchant", Some("merchant_id"))
        );
    }

    #[test]
    fn fingerprint_ignores_key_order_and_spacing() {
        let a = parse_new_payment(
            br#"{"merchant_id":"acme","amount":1,"currency":"EUR","reference":"r","x":1}"#,
            &m(),
        )
        .expect("valid");
        let b = parse_new_payment(
            br#"{ "reference": "r", "currency": "EUR", "amount": 1, "merchant_id": "acme" }"#,
            &m(),
        )
        .expect("valid");
        assert_eq!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn idempotency_keys() {
        assert_eq!(
            check_idempotency_key(None).map_err(|e| e.code),
            Err("missing_idempotency_key")
        );
        assert_eq!(
            check_idempotency_key(Some(b"")).map_err(|e| e.code),
            Err("missing_idempotency_key")
        );
        assert!(check_idempotency_key(Some(b"a b")).is_err());
        assert!(check_idempotency_key(Some("k".repeat(256).as_bytes())).is_err());
        assert!(check_idempotency_key(Some("k".repeat(255).as_bytes())).is_ok());
    }
}
