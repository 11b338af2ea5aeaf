//! Incremental detokenization with stop strings.
//!
//! Tokens are turned into their raw bytes and only complete UTF-8 is
//! released, so a Chinese or Korean character split over two tokens is never
//! cut in half. Text that could be the beginning of a stop string is held
//! back until it is clear either way; a matched stop string is not emitted.

#[derive(Debug, Default)]
pub struct TextStream {
    bytes: Vec<u8>,
    /// Decoded text not yet released (may hold a partial stop string).
    pending: String,
    stops: Vec<String>,
    stopped: bool,
}

#[derive(Debug, PartialEq)]
pub struct Step {
    pub text: String,
    /// A stop string was found; generation should end.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Default::default()
        }
    }

    pub fn push(&mut self, token_bytes: &[u8]) -> Step {
        if self.stopped {
            return Step { text: String::new(), stopped: true };
        }
        self.bytes.extend_from_slice(token_bytes);
        loop {
            match std::str::from_utf8(&self.bytes) {
                Ok(s) => {
                    self.pending.push_str(s);
                    self.bytes.clear();
                    break;
                }
                Err(e) => {
                    let upto = e.valid_up_to();
                    let valid = std::str::from_utf8(&self.bytes[..upto]).expect("checked prefix");
                    self.pending.push_str(valid);
                    match e.error_len() {
                        // Invalid bytes (not merely incomplete): replace and go on.
                        Some(bad) => {
                            self.pending.push(char::REPLACEMENT_CHARACTER);
                            self.bytes.drain(..upto + bad);
                        }
                        // An incomplete character: wait for the next token.
                        None => {
                            self.bytes.drain(..upto);
                            break;
                        }
                    }
                }
            }
        }
        self.release()
    }

    fn release(&mut self) -> Step {
        if let Some((at, _)) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|i| (i, s)))
            .min_by_key(|(i, _)| *i)
        {
            let text = self.pending[..at].to_owned();
            self.pending.clear();
            self.stopped = true;
            return Step { text, stopped: true };
        }
        let hold = self
            .stops
            .iter()
            .map(|s| longest_prefix_suffix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let text: String = self.pending.drain(..cut).collect();
        Step { text, stopped: false }
    }

    /// End of generation: releases whatever is held (incomplete UTF-8 becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let mut out = std::mem::take(&mut self.pending);
        if !self.bytes.is_empty() {
            out.push_str(&String::from_utf8_lossy(&std::mem::take(&mut self.bytes)));
        }
        if self.stopped {
            String::new()
        } else {
            out
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    let max = (stop.len() - 1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibyte_characters_split_across_tokens_are_never_cut() {
        let text = "你好，세계! 🚕";
        let bytes = text.as_bytes();
        for split in 1..bytes.len() {
            let mut ts = TextStream::new(vec![]);
            let mut out = String::new();
            let a = ts.push(&bytes[..split]);
            assert!(!a.text.contains('\u{FFFD}'), "split {split}");
            out.push_str(&a.text);
            out.push_str(&ts.push(&bytes[split..]).text);
            out.push_str(&ts.finish());
            assert_eq!(out, text);
        }
        // Byte by byte too.
        let mut ts = TextStream::new(vec![]);
        let out: String = bytes.iter().map(|b| ts.push(&[*b]).text).collect();
        assert_eq!(out, text);
    }

    #[test]
    fn stop_strings_end_the_stream_and_are_not_emitted() {
        let mut ts = TextStream::new(vec!["\nUser:".into()]);
        let mut out = String::new();
        for piece in ["Hello", " there", "\nUs", "er:", " more"] {
            let s = ts.push(piece.as_bytes());
            out.push_str(&s.text);
            if s.stopped {
                break;
            }
        }
        assert_eq!(out, "Hello there");
    }

    #[test]
    fn held_back_prefix_is_released_when_it_does_not_match() {
        let mut ts = TextStream::new(vec!["STOP".into()]);
        assert_eq!(ts.push(b"ab ST").text, "ab ");
        assert_eq!(ts.push(b"ART").text, "START");
        assert_eq!(ts.push(b" ST").text, " ");
        assert_eq!(ts.finish(), "ST");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut ts = TextStream::new(vec![]);
        let s = ts.push(&[b'a', 0xff, b'b']);
        assert_eq!(s.text, "a\u{FFFD}b");
    }
}
