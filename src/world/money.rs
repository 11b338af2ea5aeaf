//! Amounts as people read them: one format for the confirmation, cards,
//! notices and every mini-program's summaries and errors, so the amount a
//! person confirms reads exactly like the amount the merchant states.
//!
//! Amounts are integers in the currency's minor unit (fen for CNY; KRW has
//! none). `¥1,234.56`, `₩12,000`, `-¥0.50`.

/// `amount` minor units of `currency` for people to read.
pub fn display(amount: i64, currency: &str) -> String {
    let sign = if amount < 0 { "-" } else { "" };
    let a = amount.unsigned_abs();
    match currency {
        "CNY" => format!("{sign}¥{}.{:02}", grouped(a / 100), a % 100),
        "KRW" => format!("{sign}₩{}", grouped(a)),
        other => format!("{sign}{} {other}", grouped(a)),
    }
}

/// `1234567` → `1,234,567`: thousands grouped the way amounts are (and
/// the evaluator's counts).
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_currencies_with_groups_and_signs() {
        assert_eq!(display(3800, "CNY"), "¥38.00");
        assert_eq!(display(4530, "CNY"), "¥45.30");
        assert_eq!(display(5, "CNY"), "¥0.05");
        assert_eq!(display(123_456, "CNY"), "¥1,234.56");
        assert_eq!(display(100_000_000, "CNY"), "¥1,000,000.00");
        assert_eq!(display(-50, "CNY"), "-¥0.50");
        assert_eq!(display(-123_456, "CNY"), "-¥1,234.56");
        assert_eq!(display(500, "KRW"), "₩500");
        assert_eq!(display(12_000, "KRW"), "₩12,000");
        assert_eq!(display(1_234_567, "KRW"), "₩1,234,567");
        assert_eq!(display(-59_800, "KRW"), "-₩59,800");
        assert_eq!(display(0, "KRW"), "₩0");
        assert_eq!(display(2150, "USD"), "2,150 USD");
        assert_eq!(display(i64::MIN, "KRW"), "-₩9,223,372,036,854,775,808");
    }
}
