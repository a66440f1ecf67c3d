//! Money formatting: an integer amount of a currency's minor units shown in major units
//! ("1234 USD" → "12.34 USD", "15000 KRW" → "15,000 KRW").

/// Currencies with no minor unit (ISO 4217 exponent 0).
const ZERO_DECIMAL_CURRENCIES: &[&str] = &[
    "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
    "VUV", "XAF", "XOF", "XPF",
];

/// Currencies with three decimal places (ISO 4217 exponent 3).
const THREE_DECIMAL_CURRENCIES: &[&str] = &["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];

/// How many decimal places `currency` (ISO 4217 code, any case) has: 0, 3, or 2 for every
/// currency not in the small tables above.
pub fn minor_unit_digits(currency: &str) -> u32 {
    let code = currency.to_ascii_uppercase();
    if ZERO_DECIMAL_CURRENCIES.contains(&code.as_str()) {
        0
    } else if THREE_DECIMAL_CURRENCIES.contains(&code.as_str()) {
        3
    } else {
        2
    }
}

/// Formats `amount_minor` minor units of `currency` as "<major units> <CODE>", grouping
/// thousands with commas: `format_minor(123456, "USD")` is "1,234.56 USD".
pub fn format_minor(amount_minor: i64, currency: &str) -> String {
    let digits = minor_unit_digits(currency);
    let scale = 10u64.pow(digits);
    let magnitude = amount_minor.unsigned_abs();
    let sign = if amount_minor < 0 { "-" } else { "" };
    let major = group_thousands(magnitude / scale);
    let code = currency.to_ascii_uppercase();
    if digits == 0 {
        format!("{sign}{major} {code}")
    } else {
        let minor = magnitude % scale;
        format!(
            "{sign}{major}.{minor:0width$} {code}",
            width = digits as usize
        )
    }
}

/// `1234567` → `"1,234,567"`.
fn group_thousands(n: u64) -> String {
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
    fn two_decimal_currencies_show_cents() {
        assert_eq!(format_minor(1234, "USD"), "12.34 USD");
        assert_eq!(format_minor(5, "EUR"), "0.05 EUR");
        assert_eq!(format_minor(0, "USD"), "0.00 USD");
    }

    #[test]
    fn zero_decimal_currencies_have_no_fraction() {
        assert_eq!(format_minor(1234, "KRW"), "1,234 KRW");
        assert_eq!(format_minor(980, "JPY"), "980 JPY");
    }

    #[test]
    fn three_decimal_currencies_show_three_places() {
        assert_eq!(format_minor(1234, "KWD"), "1.234 KWD");
        assert_eq!(format_minor(5, "BHD"), "0.005 BHD");
    }

    #[test]
    fn unknown_currencies_default_to_two_decimals() {
        assert_eq!(minor_unit_digits("XYZ"), 2);
        assert_eq!(format_minor(100, "xyz"), "1.00 XYZ");
    }

    #[test]
    fn negative_amounts_keep_their_sign() {
        assert_eq!(format_minor(-1234, "USD"), "-12.34 USD");
        assert_eq!(format_minor(-1_500_000, "KRW"), "-1,500,000 KRW");
        assert!(format_minor(i64::MIN, "USD").starts_with("-92,233,720,368,547,758.08"));
    }

    #[test]
    fn large_amounts_group_thousands() {
        assert_eq!(format_minor(123_456_789, "USD"), "1,234,567.89 USD");
        assert_eq!(format_minor(1_000, "KRW"), "1,000 KRW");
        assert_eq!(format_minor(999, "KRW"), "999 KRW");
    }
}
