//! Who may ask the payment service for what, WeChat-Pay style.
//!
//! - **Notifications** (payment service → merchant): signed over
//!   `timestamp \n nonce \n body` with HMAC-SHA256 under the merchant's key;
//!   the merchant refuses anything that does not verify or is older than
//!   five minutes.
//! - **Merchant requests** (merchant → payment service: open, query, close,
//!   refund a trade): signed over `METHOD \n path?query \n timestamp \n
//!   nonce \n body` under the same key, with the merchant id in
//!   [`MCH_ID`]. A nonce is accepted once.
//! - **Wallet credentials** (`Authorization: Bearer <wallet>.<mac>`): the
//!   only way to move money out of a wallet or read it. The assistant server
//!   holds one per user; a bare wallet id moves nothing.
//! - **The admin credential** (`Authorization: Bearer admin.<mac>`): the
//!   sandbox's own knobs (balances, the clock, faults), for tests and the
//!   evaluator.
//!
//! Every key is derived from the sandbox secret, so services running in
//! separate processes agree on keys when they are given the same `--secret`.
//! `docs/sandbox.md` says what a real WeChat Pay / Alipay integration puts
//! in their place.

use super::core::{header, ApiError};
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

pub const TIMESTAMP: &str = "x-errand-timestamp";
pub const NONCE: &str = "x-errand-nonce";
pub const SIGNATURE: &str = "x-errand-signature";
/// The merchant a signed request comes from.
pub const MCH_ID: &str = "x-errand-mch-id";
/// How far a notification's timestamp may be from the merchant's clock.
pub const MAX_SKEW_MS: i64 = 5 * 60 * 1000;

pub fn merchant_key(secret: &[u8], mch_id: &str) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(b"errand-merchant-key\n");
    mac.update(mch_id.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// HMAC-SHA256 of `parts` joined by newlines.
fn mac_of(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            mac.update(b"\n");
        }
        mac.update(p);
    }
    mac
}

fn mac(key: &[u8], timestamp_ms: i64, nonce: &str, body: &[u8]) -> HmacSha256 {
    mac_of(key, &[timestamp_ms.to_string().as_bytes(), nonce.as_bytes(), body])
}

/// The timestamp, nonce and signature headers, checked for shape and for a
/// timestamp within [`MAX_SKEW_MS`] of now; a failure is a 401 with `code`.
fn signature_headers<'h>(headers: &'h HeaderMap, now_ms: i64, code: &'static str) -> Result<(i64, &'h str, Vec<u8>), ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, code, m.to_string());
    let ts: i64 = header(headers, TIMESTAMP)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| unauthorized("missing or malformed timestamp header"))?;
    let nonce = header(headers, NONCE).filter(|n| !n.is_empty() && n.len() <= 64).ok_or_else(|| unauthorized("missing nonce header"))?;
    let sig = header(headers, SIGNATURE)
        .and_then(|s| hex::decode(s).ok())
        .ok_or_else(|| unauthorized("missing or malformed signature header"))?;
    if now_ms.abs_diff(ts) > MAX_SKEW_MS as u64 {
        return Err(unauthorized("the signed timestamp is too far from now"));
    }
    Ok((ts, nonce, sig))
}

pub fn sign(key: &[u8], timestamp_ms: i64, nonce: &str, body: &[u8]) -> String {
    hex::encode(mac(key, timestamp_ms, nonce, body).finalize().into_bytes())
}

/// Checks the three signature headers against `body`.
pub fn verify(key: &[u8], headers: &HeaderMap, body: &[u8], now_ms: i64) -> Result<(), ApiError> {
    let (ts, nonce, sig) = signature_headers(headers, now_ms, "bad_signature")?;
    mac(key, ts, nonce, body)
        .verify_slice(&sig)
        .map_err(|_| ApiError::new(StatusCode::UNAUTHORIZED, "bad_signature", "signature does not match"))
}

fn request_mac(key: &[u8], method: &str, path: &str, timestamp_ms: i64, nonce: &str, body: &[u8]) -> HmacSha256 {
    mac_of(key, &[method.as_bytes(), path.as_bytes(), timestamp_ms.to_string().as_bytes(), nonce.as_bytes(), body])
}

/// The headers a merchant's request to the payment service carries: its id,
/// a timestamp, a fresh nonce and the signature over the request.
/// `key` is the merchant's ([`merchant_key`]).
pub fn request_headers(key: &[u8], mch_id: &str, method: &str, path: &str, body: &[u8], now_ms: i64) -> [(&'static str, String); 4] {
    let nonce = hex::encode(rand::random::<[u8; 12]>());
    let sig = hex::encode(request_mac(key, method, path, now_ms, &nonce, body).finalize().into_bytes());
    [(MCH_ID, mch_id.to_owned()), (TIMESTAMP, now_ms.to_string()), (NONCE, nonce), (SIGNATURE, sig)]
}

/// Checks a merchant's signed request; answers the merchant id and the nonce
/// (the caller refuses a nonce it has seen).
pub fn verify_request(secret: &[u8], headers: &HeaderMap, method: &str, path: &str, body: &[u8], now_ms: i64) -> Result<(String, String), ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", m.to_string());
    let mch = header(headers, MCH_ID).ok_or_else(|| unauthorized("only a merchant may do this: sign the request (x-errand-mch-id, timestamp, nonce, signature)"))?;
    let (ts, nonce, sig) = signature_headers(headers, now_ms, "unauthenticated")?;
    request_mac(&merchant_key(secret, mch), method, path, ts, nonce, body)
        .verify_slice(&sig)
        .map_err(|_| unauthorized("signature does not match"))?;
    Ok((mch.to_owned(), nonce.to_owned()))
}

fn credential_mac(secret: &[u8], label: &str, id: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(label.as_bytes());
    mac.update(b"\n");
    mac.update(id.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The bearer credential that moves and reads `wallet_id`.
pub fn wallet_credential(secret: &[u8], wallet_id: &str) -> String {
    format!("{wallet_id}.{}", credential_mac(secret, "errand-wallet-credential", wallet_id))
}

/// Every wallet's credential under `secret`, as an assistant server holds
/// them (wrapped in `agent::PayCredentials` by the wiring).
pub fn wallet_credentials(secret: &[u8]) -> std::sync::Arc<dyn Fn(&str) -> String + Send + Sync> {
    let secret = secret.to_vec();
    std::sync::Arc::new(move |w: &str| wallet_credential(&secret, w))
}

/// The bearer credential for the sandbox's admin endpoints.
pub fn admin_credential(secret: &[u8]) -> String {
    format!("admin.{}", credential_mac(secret, "errand-admin-credential", "admin"))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = header(headers, "authorization")?;
    v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).map(str::trim)
}

fn same(a: &str, b: &str) -> bool {
    // Compared as MACs of the two, so the time taken says nothing about where they differ.
    let k = rand::random::<[u8; 16]>();
    let m = |s: &str| {
        let mut mac = HmacSha256::new_from_slice(&k).expect("HMAC takes any key length");
        mac.update(s.as_bytes());
        mac.finalize().into_bytes()
    };
    m(a) == m(b)
}

/// The wallet whose credential the request carries, if it carries a valid one.
pub fn wallet_of(secret: &[u8], headers: &HeaderMap) -> Option<String> {
    let token = bearer(headers)?;
    let (wallet, _) = token.rsplit_once('.')?;
    (!wallet.is_empty() && same(token, &wallet_credential(secret, wallet))).then(|| wallet.to_owned())
}

/// Whether the request carries the admin credential.
pub fn is_admin(secret: &[u8], headers: &HeaderMap) -> bool {
    bearer(headers).is_some_and(|t| same(t, &admin_credential(secret)))
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

    fn with(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn merchant_requests_verify_only_as_signed() {
        let body = br#"{"out_refund_no":"r1","amount":100}"#;
        let h = with(&request_headers(&merchant_key(b"secret", "food"), "food", "POST", "/v1/trades/food-1/refund", body, 1_000));
        assert_eq!(verify_request(b"secret", &h, "POST", "/v1/trades/food-1/refund", body, 2_000).unwrap().0, "food");
        // Another path, method, body, secret, or a stale clock.
        assert!(verify_request(b"secret", &h, "POST", "/v1/trades/ride-1/refund", body, 2_000).is_err());
        assert!(verify_request(b"secret", &h, "GET", "/v1/trades/food-1/refund", body, 2_000).is_err());
        assert!(verify_request(b"secret", &h, "POST", "/v1/trades/food-1/refund", b"{}", 2_000).is_err());
        assert!(verify_request(b"other", &h, "POST", "/v1/trades/food-1/refund", body, 2_000).is_err());
        assert!(verify_request(b"secret", &h, "POST", "/v1/trades/food-1/refund", body, 1_000 + MAX_SKEW_MS + 1).is_err());
        // Claiming to be another merchant with food's signature.
        let mut forged = h.clone();
        forged.insert(MCH_ID, "ride".parse().unwrap());
        assert!(verify_request(b"secret", &forged, "POST", "/v1/trades/food-1/refund", body, 2_000).is_err());
    }

    #[test]
    fn wallet_and_admin_credentials() {
        let auth = |t: &str| with(&[("authorization", format!("Bearer {t}"))]);
        let demo = wallet_credential(b"secret", "demo");
        assert_eq!(wallet_of(b"secret", &auth(&demo)).as_deref(), Some("demo"));
        assert_eq!(wallet_of(b"other", &auth(&demo)), None, "another sandbox's credential");
        assert_eq!(wallet_of(b"secret", &auth("demo")), None, "a bare wallet id");
        let forged = demo.replace("demo.", "friend.");
        assert_eq!(wallet_of(b"secret", &auth(&forged)), None, "demo's mac under another wallet id");
        assert_eq!(wallet_of(b"secret", &HeaderMap::new()), None);
        assert!(is_admin(b"secret", &auth(&admin_credential(b"secret"))));
        assert!(!is_admin(b"secret", &auth(&demo)));
        assert_eq!(wallet_of(b"secret", &auth(&admin_credential(b"secret"))), None, "admin is not a wallet");
    }
}
