//! Payments: request validation, the payment record, and the idempotency
//! rules (what a key may be, what "the same request" means).
//!
//! Storage and the cross-process race are handled by the store; this
//! module is pure so every rule can be tested on its own.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ids::{new_payment_id, now_rfc3339};
use super::merchants::Merchants;

/// Why a payment request was refused, in the order the checks run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// No `Idempotency-Key`, or an empty one.
    #[error("the Idempotency-Key header is required")]
    MissingKey,
    /// A key that is not 1–255 visible ASCII characters.
    #[error("Idempotency-Key must be 1 to 255 visible ASCII characters")]
    InvalidKey,
    /// The body is not JSON.
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// JSON, but not an object.
    #[error("request body must be a JSON object")]
    NotAnObject,
    /// One field is missing or wrong.
    #[error("{message}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// `merchant_id` names no known merchant.
    #[error("unknown merchant {0:?}")]
    UnknownMerchant(String),
    /// The key was used before with another request.
    #[error("this Idempotency-Key was already used with a different request body")]
    KeyReused,
}

impl PaymentError {
    fn field(field: &'static str, message: impl Into<String>) -> Self {
        PaymentError::InvalidField {
            field,
            message: message.into(),
        }
    }
}

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

/// Check an `Idempotency-Key` header value: 1–255 visible ASCII characters.
/// Absent or empty is [`PaymentError::MissingKey`].
pub fn check_idempotency_key(value: Option<&[u8]>) -> Result<String, PaymentError> {
    let bytes = match value {
        None | Some(b"") => return Err(PaymentError::MissingKey),
        Some(b) => b,
    };
    let visible = bytes.iter().all(|b| (0x21..=0x7e).contains(b));
    if bytes.len() > MAX_IDEMPOTENCY_KEY || !visible {
        return Err(PaymentError::InvalidKey);
    }
    // All bytes are ASCII, so this cannot fail.
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// Parse and validate a payment body: malformed JSON first, then each
/// field in order (merchant_id, amount, currency, reference), then whether
/// the merchant exists.
pub fn parse_new_payment(body: &[u8], merchants: &Merchants) -> Result<NewPayment, PaymentError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| PaymentError::MalformedJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(PaymentError::NotAnObject);
    };

    let merchant_id = match obj.get("merchant_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => {
            return Err(PaymentError::field(
                "merchant_id",
                "merchant_id must not be empty",
            ))
        }
        Some(_) => {
            return Err(PaymentError::field(
                "merchant_id",
                "merchant_id must be a string",
            ))
        }
        None => {
            return Err(PaymentError::field(
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
                _ => return Err(PaymentError::field(
                    "amount",
                    "amount must be an integer number of minor units from 1 to 9223372036854775807",
                )),
            },
            Some(_) => return Err(PaymentError::field("amount", "amount must be an integer")),
            None => return Err(PaymentError::field("amount", "amount is required")),
        };

    let currency = match obj.get("currency") {
        Some(Value::String(s)) if is_currency(s) => s.clone(),
        Some(_) => {
            return Err(PaymentError::field(
                "currency",
                "currency must be three upper-case letters, e.g. EUR",
            ))
        }
        None => return Err(PaymentError::field("currency", "currency is required")),
    };

    let reference = match obj.get("reference") {
        Some(Value::String(s)) if s.chars().count() <= MAX_REFERENCE_CHARS => s.clone(),
        Some(Value::String(_)) => {
            return Err(PaymentError::field(
                "reference",
                "reference must be at most 255 characters",
            ))
        }
        Some(_) => {
            return Err(PaymentError::field(
                "reference",
                "reference must be a string",
            ))
        }
        None => return Err(PaymentError::field("reference", "reference is required")),
    };

    if !merchants.contains(&merchant_id) {
        return Err(PaymentError::UnknownMerchant(merchant_id));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn m() -> Merchants {
        Merchants::demo()
    }

    /// A short name of the outcome and the field it is about.
    fn code(body: &str) -> (u16, &'static str, Option<&'static str>) {
        match parse_new_payment(body.as_bytes(), &m()) {
            Ok(_) => (200, "ok", None),
            Err(PaymentError::MalformedJson(_)) => (400, "malformed_json", None),
            Err(PaymentError::NotAnObject) => (422, "invalid_body", None),
            Err(PaymentError::InvalidField { field, .. }) => (422, "invalid_field", Some(field)),
            Err(PaymentError::UnknownMerchant(_)) => (422, "unknown_merchant", Some("merchant_id")),
            Err(e) => panic!("not a body error: {e}"),
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
        assert_eq!(check_idempotency_key(None), Err(PaymentError::MissingKey));
        assert_eq!(
            check_idempotency_key(Some(b"")),
            Err(PaymentError::MissingKey)
        );
        assert_eq!(
            check_idempotency_key(Some(b"a b")),
            Err(PaymentError::InvalidKey)
        );
        assert!(check_idempotency_key(Some("k".repeat(256).as_bytes())).is_err());
        assert!(check_idempotency_key(Some("k".repeat(255).as_bytes())).is_ok());
    }
}
