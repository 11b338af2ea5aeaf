//! Arithmetic questions ("17 곱하기 23은 얼마야?", "128加256等于多少？",
//! "what's 12 times 7?") answered by code: exact where a small model's
//! chat reply guesses, and never sent to a mini-program.
//!
//! Only a message that is a sum and nothing else counts: two or more plain
//! numbers joined by operators, and besides them only question words
//! ("what is", "calculate", "等于多少", "얼마야"). "Two tickets plus one
//! for my son" has other words, so it is not a sum.

use crate::prompt::Lang;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

/// Operator words, longest first within a language (乘以 before 乘).
const OPS: &[(&str, Op)] = &[
    ("divided by", Op::Div),
    ("multiplied by", Op::Mul),
    ("times", Op::Mul),
    ("plus", Op::Add),
    ("minus", Op::Sub),
    ("乘以", Op::Mul),
    ("除以", Op::Div),
    ("加上", Op::Add),
    ("减去", Op::Sub),
    ("乘", Op::Mul),
    ("除", Op::Div),
    ("加", Op::Add),
    ("减", Op::Sub),
    ("곱하기", Op::Mul),
    ("나누기", Op::Div),
    ("더하기", Op::Add),
    ("빼기", Op::Sub),
    ("×", Op::Mul),
    ("÷", Op::Div),
    ("*", Op::Mul),
    ("/", Op::Div),
    ("+", Op::Add),
    ("-", Op::Sub),
    ("x", Op::Mul),
];

/// Words that may surround a sum (lowercase), longest first.
const FILLER: &[&str] = &[
    "can you calculate", "please calculate", "calculate", "how much is", "what is", "what's", "whats", "how much", "equals", "equal", "is",
    "please", "hey", "帮我算一下", "帮我算算", "帮我算", "算一下", "请问", "等于多少", "等于几", "等于", "是多少", "多少", "是几", "几",
    "계산해 줘", "계산해줘", "계산해", "얼마야", "얼마예요", "얼마", "은", "는", "이", "가", "뭐야", "몇이야", "몇",
];

/// The answer to a message that is only a sum, in the person's language.
pub fn answer(text: &str, lang: Lang) -> Option<String> {
    let mut rest = text.trim().to_lowercase();
    for c in ['?', '？', '!', '！', '。', ':', '：', ',', '，', '=', '~'] {
        rest = rest.replace(c, " ");
    }
    // A full stop, but not a decimal point.
    let chars: Vec<char> = rest.chars().collect();
    let rest: String = chars
        .iter()
        .enumerate()
        .map(|(i, &c)| if c == '.' && !(i > 0 && chars[i - 1].is_ascii_digit() && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) { ' ' } else { c })
        .collect();
    // Numbers and operators, in order; everything else must be filler.
    let mut nums: Vec<f64> = Vec::new();
    let mut ops: Vec<Op> = Vec::new();
    let mut shown = String::new();
    let mut s = rest.trim_start();
    while !s.is_empty() {
        if let Some(n) = number_prefix(s) {
            if nums.len() != ops.len() {
                return None;
            }
            nums.push(s[..n].parse().ok()?);
            shown.push_str(&s[..n]);
            s = s[n..].trim_start();
            continue;
        }
        if let Some((w, op)) = OPS.iter().find(|(w, _)| s.starts_with(w)) {
            // "x" is an operator only between numbers ("12 x 7").
            if nums.len() == ops.len() + 1 && !(w == &"x" && s[1..].starts_with(|c: char| c.is_alphabetic())) {
                ops.push(*op);
                shown.push_str(match op {
                    Op::Add => " + ",
                    Op::Sub => " − ",
                    Op::Mul => " × ",
                    Op::Div => " ÷ ",
                });
                s = s[w.len()..].trim_start();
                continue;
            }
        }
        let f = FILLER.iter().find(|f| s.starts_with(*f))?;
        s = s[f.len()..].trim_start();
    }
    if nums.len() < 2 || nums.len() != ops.len() + 1 {
        return None;
    }
    let v = eval(&nums, &ops)?;
    let v = if (v - v.round()).abs() < 1e-9 { format!("{}", v.round() as i64) } else { format!("{:.4}", v).trim_end_matches('0').to_owned() };
    Some(match lang {
        Lang::En => format!("{shown} = {v}"),
        Lang::Zh => format!("{shown} = {v}。"),
        Lang::Ko => format!("{shown} = {v}입니다."),
    })
}

/// Byte length of a plain number at the start of `s` (digits, one point).
fn number_prefix(s: &str) -> Option<usize> {
    let digits = s.bytes().take_while(|b| b.is_ascii_digit() || *b == b'.').count();
    let n = &s[..digits];
    (digits > 0 && n.bytes().filter(|b| *b == b'.').count() <= 1 && !n.starts_with('.') && !n.ends_with('.')).then_some(digits)
}

/// Multiplication and division first, then left to right.
fn eval(nums: &[f64], ops: &[Op]) -> Option<f64> {
    let mut terms: Vec<f64> = vec![nums[0]];
    let mut signs: Vec<Op> = Vec::new();
    for (op, &n) in ops.iter().zip(&nums[1..]) {
        match op {
            Op::Mul => *terms.last_mut()? *= n,
            Op::Div => {
                if n == 0.0 {
                    return None;
                }
                *terms.last_mut()? /= n
            }
            _ => {
                signs.push(*op);
                terms.push(n);
            }
        }
    }
    let mut v = terms[0];
    for (op, t) in signs.iter().zip(&terms[1..]) {
        v = if *op == Op::Add { v + t } else { v - t };
    }
    v.is_finite().then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_in_three_languages_are_answered_exactly() {
        assert_eq!(answer("17 곱하기 23은 얼마야?", Lang::Ko).as_deref(), Some("17 × 23 = 391입니다."));
        assert_eq!(answer("帮我算一下：128加256等于多少？", Lang::Zh).as_deref(), Some("128 + 256 = 384。"));
        assert_eq!(answer("What's 12 times 7?", Lang::En).as_deref(), Some("12 × 7 = 84"));
        assert_eq!(answer("Calculate 12 times 7.", Lang::En).as_deref(), Some("12 × 7 = 84"));
        assert_eq!(answer("2 + 3 * 4", Lang::En).as_deref(), Some("2 + 3 × 4 = 14"));
        assert_eq!(answer("10 / 4", Lang::En).as_deref(), Some("10 ÷ 4 = 2.5"));
        assert_eq!(answer("how much is 3.5 x 2", Lang::En).as_deref(), Some("3.5 × 2 = 7"));
        assert_eq!(answer("100 빼기 42는?", Lang::Ko).as_deref(), Some("100 − 42 = 58입니다."));
    }

    #[test]
    fn anything_besides_a_sum_is_left_to_the_conversation() {
        for t in [
            "two tickets plus one for my son",
            "book 2 tickets plus 1",
            "order 3 x large pizza",
            "what is the weather",
            "12",
            "1 / 0",
            "帮我点两份加一份米饭",
            "7시 30분 기차",
            "2 + ",
            "call 555-1234",
        ] {
            assert_eq!(answer(t, Lang::En), None, "{t}");
        }
    }
}
