//! Confirmed terms: the money a user agreed to must be the money charged.
//!
//! The assistant shows a tool's quote (`amount`, `currency`) and calls the
//! real endpoint only after the user says yes. Between the two, terms can
//! move (a kitchen starts cooking, a bike ride gets longer), so on the
//! confirmed call the assistant repeats what the user agreed to in
//! `X-Errand-Confirmed-Amount` (integer minor units) and
//! `X-Errand-Confirmed-Currency` (`CNY` or `KRW`). A service reads them with
//! [`confirmed_terms`] and, before changing anything, compares them with what
//! it is about to charge using [`check_terms`]: a difference is a 409
//! `terms_changed` telling the caller to quote again. Callers that send no
//! such headers (curl, other clients) are served as before.

use crate::world::money;
use super::core::{ApiError, ApiResult};
use axum::http::HeaderMap;

/// The amount the user confirmed, in minor units (fen, won).
pub const AMOUNT_HEADER: &str = "x-errand-confirmed-amount";
/// The currency of [`AMOUNT_HEADER`]: `CNY` or `KRW`.
pub const CURRENCY_HEADER: &str = "x-errand-confirmed-currency";

fn header<'a>(headers: &'a HeaderMap, name: &str) -> ApiResult<Option<&'a str>> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| ApiError::bad_request(format!("header {name} is not plain text; send e.g. {name}: 3800"))),
    }
}

/// The confirmed `(amount, currency)` sent with a confirmed call, or `None`
/// when the caller sent neither header. Sending only one of them, a
/// non-integer or negative amount, or an unknown currency is a 400.
pub fn confirmed_terms(headers: &HeaderMap) -> ApiResult<Option<(i64, String)>> {
    let amount = header(headers, AMOUNT_HEADER)?;
    let currency = header(headers, CURRENCY_HEADER)?;
    let (amount, currency) = match (amount, currency) {
        (None, None) => return Ok(None),
        (Some(a), Some(c)) => (a, c),
        _ => {
            return Err(ApiError::bad_request(
                "send both X-Errand-Confirmed-Amount and X-Errand-Confirmed-Currency (the quote's amount and currency), or neither",
            ))
        }
    };
    let amount: i64 = amount.parse().ok().filter(|a| *a >= 0).ok_or_else(|| {
        ApiError::bad_request(format!(
            "X-Errand-Confirmed-Amount '{}' is not a whole non-negative number of minor units; send the quote's `amount`, e.g. 3800 for ¥38.00",
            amount.chars().take(40).collect::<String>()
        ))
    })?;
    let currency = currency.to_ascii_uppercase();
    if !matches!(currency.as_str(), "CNY" | "KRW") {
        return Err(ApiError::bad_request(format!(
            "X-Errand-Confirmed-Currency '{}' is not CNY or KRW; send the quote's `currency`",
            currency.chars().take(40).collect::<String>()
        )));
    }
    Ok(Some((amount, currency)))
}

/// Refuses with 409 `terms_changed` when the confirmed terms differ from the
/// `amount`/`currency` about to be charged. `what` names the money in the
/// message ("the cancellation fee", "the total"). No confirmed terms: always fine.
pub fn check_terms(
    confirmed: Option<(i64, String)>,
    what: &str,
    amount: i64,
    currency: &str,
) -> ApiResult<()> {
    let Some((c_amount, c_currency)) = confirmed else {
        return Ok(());
    };
    if c_amount == amount && c_currency == currency {
        return Ok(());
    }
    Err(ApiError::conflict(
        "terms_changed",
        format!(
            "{what} is now {}, not the {} you confirmed; nothing was changed; ask for a new quote and confirm again",
            money::display(amount, currency),
            money::display(c_amount, &c_currency)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn parses_both_or_neither() {
        assert_eq!(confirmed_terms(&HeaderMap::new()).unwrap(), None);
        let h = headers(&[(AMOUNT_HEADER, " 2150 "), (CURRENCY_HEADER, "cny")]);
        assert_eq!(confirmed_terms(&h).unwrap(), Some((2150, "CNY".to_string())));
        for bad in [
            headers(&[(AMOUNT_HEADER, "2150")]),
            headers(&[(CURRENCY_HEADER, "CNY")]),
            headers(&[(AMOUNT_HEADER, "21.50"), (CURRENCY_HEADER, "CNY")]),
            headers(&[(AMOUNT_HEADER, "-1"), (CURRENCY_HEADER, "CNY")]),
            headers(&[(AMOUNT_HEADER, "100"), (CURRENCY_HEADER, "USD")]),
        ] {
            assert_eq!(confirmed_terms(&bad).unwrap_err().status.as_u16(), 400);
        }
    }

    #[test]
    fn differences_are_terms_changed() {
        assert!(check_terms(None, "the total", 5, "CNY").is_ok());
        assert!(check_terms(Some((5, "CNY".into())), "the total", 5, "CNY").is_ok());
        let e = check_terms(Some((0, "CNY".into())), "the cancellation fee", 2150, "CNY").unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (409, "terms_changed"));
        assert!(e.message.starts_with("the cancellation fee is now ¥21.50, not the ¥0.00 you confirmed"), "{}", e.message);
        let e = check_terms(Some((5, "KRW".into())), "the total", 5, "CNY").unwrap_err();
        assert_eq!(e.code, "terms_changed");
    }
}
