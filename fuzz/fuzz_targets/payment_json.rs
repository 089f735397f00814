//! The body of `POST /v1/payments` and its `Idempotency-Key`: whatever is
//! accepted satisfies the documented rules.
#![no_main]

use std::sync::OnceLock;

use payments::payment::{check_idempotency_key, parse_new_payment};
use payments::Merchants;

fn merchants() -> &'static Merchants {
    static MERCHANTS: OnceLock<Merchants> = OnceLock::new();
    MERCHANTS.get_or_init(Merchants::demo)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let merchants = merchants();
    if let Ok(payment) = parse_new_payment(data, merchants) {
        assert!(merchants.contains(&payment.merchant_id));
        assert!(payment.amount >= 1);
        assert!(
            payment.currency.len() == 3 && payment.currency.bytes().all(|b| b.is_ascii_uppercase())
        );
        assert!(payment.reference.chars().count() <= 255);
    }
    if let Ok(key) = check_idempotency_key(Some(data)) {
        assert!((1..=255).contains(&key.len()));
        assert!(key.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    }
});
