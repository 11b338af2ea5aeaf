//! Signatures on payment notifications, WeChat-Pay style: the payment
//! service signs `timestamp \n nonce \n body` with HMAC-SHA256 under a key it
//! shares with the merchant, and the merchant refuses anything that does not
//! verify or is older than five minutes.
//!
//! Each merchant's key is derived from the sandbox secret and its merchant
//! id, so services running in separate processes agree on keys when they are
//! given the same `--secret`.

use super::core::{header, ApiError};
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

pub const TIMESTAMP: &str = "x-errand-timestamp";
pub const NONCE: &str = "x-errand-nonce";
pub const SIGNATURE: &str = "x-errand-signature";
/// How far a notification's timestamp may be from the merchant's clock.
pub const MAX_SKEW_MS: i64 = 5 * 60 * 1000;

pub fn merchant_key(secret: &[u8], mch_id: &str) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(b"errand-merchant-key\n");
    mac.update(mch_id.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn mac(key: &[u8], timestamp_ms: i64, nonce: &str, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(timestamp_ms.to_string().as_bytes());
    mac.update(b"\n");
    mac.update(nonce.as_bytes());
    mac.update(b"\n");
    mac.update(body);
    mac
}

pub fn sign(key: &[u8], timestamp_ms: i64, nonce: &str, body: &[u8]) -> String {
    hex::encode(mac(key, timestamp_ms, nonce, body).finalize().into_bytes())
}

/// Checks the three signature headers against `body`.
pub fn verify(key: &[u8], headers: &HeaderMap, body: &[u8], now_ms: i64) -> Result<(), ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "bad_signature", m.to_string());
    let ts: i64 = header(headers, TIMESTAMP)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| unauthorized("missing or malformed timestamp header"))?;
    let nonce = header(headers, NONCE).ok_or_else(|| unauthorized("missing nonce header"))?;
    let sig = header(headers, SIGNATURE)
        .and_then(|s| hex::decode(s).ok())
        .ok_or_else(|| unauthorized("missing or malformed signature header"))?;
    if now_ms.abs_diff(ts) > MAX_SKEW_MS as u64 {
        return Err(unauthorized("notification timestamp is too far from now"));
    }
    mac(key, ts, nonce, body)
        .verify_slice(&sig)
        .map_err(|_| unauthorized("signature does not match"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ts: i64, nonce: &str, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TIMESTAMP, ts.to_string().parse().unwrap());
        h.insert(NONCE, nonce.parse().unwrap());
        h.insert(SIGNATURE, sig.parse().unwrap());
        h
    }

    #[test]
    fn signatures_verify_and_tampering_is_caught() {
        let key = merchant_key(b"secret", "food");
        let body = br#"{"out_trade_no":"food-1","amount":3800}"#;
        let sig = sign(&key, 1_000, "n1", body);
        assert!(verify(&key, &headers(1_000, "n1", &sig), body, 2_000).is_ok());
        // Another merchant's key, a changed body, a changed nonce, a stale timestamp.
        let other = merchant_key(b"secret", "ride");
        assert!(verify(&other, &headers(1_000, "n1", &sig), body, 2_000).is_err());
        assert!(verify(&key, &headers(1_000, "n1", &sig), br#"{"out_trade_no":"food-1","amount":99900}"#, 2_000).is_err());
        assert!(verify(&key, &headers(1_000, "n2", &sig), body, 2_000).is_err());
        assert!(verify(&key, &headers(1_000, "n1", &sig), body, 1_000 + MAX_SKEW_MS + 1).is_err());
        assert!(verify(&key, &HeaderMap::new(), body, 2_000).is_err());
    }
}
