//! A tokenizer built from GGUF metadata that reproduces llama.cpp's token ids.
//!
//! The GGUF carries the BPE vocabulary (`tokenizer.ggml.tokens`), the merges,
//! each token's type, and the name of the pre-tokenizer
//! (`tokenizer.ggml.pre`). llama.cpp maps that name to a list of split
//! regexes, applied one after another; we do the same with a `Sequence` of
//! `Split` pre-tokenizers followed by byte-level mapping, so both sides cut
//! text identically. The fixture test (`tests/tokenizer_fixture.rs`) checks
//! this against ids produced by llama.cpp's own `llama-tokenize`.
//!
//! Control tokens (`<|im_start|>` …) are only recognised in text when the
//! caller asks for it ([`Tokenizer::encode`] with `parse_special = true`):
//! text typed by a user or returned by a tool is encoded with special parsing
//! off, so it can never forge a turn boundary. User-defined tokens
//! (`<tool_call>`) are always recognised, as in llama.cpp.

use crate::gguf::{GgufError, GgufFile};
use std::collections::HashMap;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported tokenizer model `{0}`: only byte-level BPE (`gpt2`) GGUFs are supported")]
    UnsupportedModel(String),
    #[error(
        "unsupported pre-tokenizer `{0}` (tokenizer.ggml.pre); supported: qwen2, llama-bpe, \
         smollm, starcoder, gpt2 and the other names listed in src/tokenizer.rs"
    )]
    UnsupportedPre(String),
    #[error("building the tokenizer failed: {0}")]
    Build(String),
    #[error("tokenizing failed: {0}")]
    Encode(String),
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_i64(v: i64) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// Token texts llama.cpp treats as end-of-generation whatever their GGUF
/// type, forcing them to control tokens (src/llama-vocab.cpp). This matters
/// for tokenization too: Qwen's vocabulary has an ordinary `</s>` token that
/// llama.cpp therefore matches as a special token in text.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>", "[e~[",
];

/// The split regexes llama.cpp uses for a given `tokenizer.ggml.pre`.
/// These are facts about llama.cpp's behaviour (src/llama-vocab.cpp), written
/// out here so the two tokenizers split text identically.
pub fn pre_tokenizer_regexes(pre: &str) -> Option<&'static [&'static str]> {
    const QWEN2: &[&str] = &[
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ];
    const LLAMA3: &[&str] = &[
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ];
    const SMOLLM: &[&str] = &[
        r"\p{N}",
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    ];
    const GPT2: &[&str] =
        &[r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"];
    Some(match pre {
        "qwen2" | "hunyuan" => QWEN2,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => LLAMA3,
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            SMOLLM
        }
        "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "trillion" => GPT2,
        _ => return None,
    })
}

/// GPT-2's byte-to-unicode table: every byte maps to a printable char, and
/// BPE vocabularies are written in those chars.
fn byte_level_table() -> HashMap<char, u8> {
    let mut bytes: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = bytes.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    bytes
        .into_iter()
        .zip(chars)
        .map(|(b, c)| (char::from_u32(c).unwrap(), b as u8))
        .collect()
}

pub struct Tokenizer {
    /// Parses control tokens in text (for prompts built by the template).
    with_special: tokenizers::Tokenizer,
    /// Treats control tokens as plain text (for user and tool content).
    plain: tokenizers::Tokenizer,
    token_bytes: Vec<Vec<u8>>,
    token_types: Vec<TokenType>,
    tokens: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub add_bos: bool,
    /// Tokens that end a generation (EOS, `<|im_end|>`, `<|endoftext|>` …),
    /// EOS first.
    pub eog_ids: Vec<u32>,
    controls: Vec<String>,
}

impl Tokenizer {
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TokenizerError> {
        let model = g.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_owned()));
        }
        let pre = g.str("tokenizer.ggml.pre").unwrap_or("default");
        let regexes =
            pre_tokenizer_regexes(pre).ok_or_else(|| TokenizerError::UnsupportedPre(pre.into()))?;
        let tokens: Vec<String> = g
            .strings("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let mut types: Vec<TokenType> = match g.ints("tokenizer.ggml.token_type") {
            Ok(v) => v.into_iter().map(TokenType::from_i64).collect(),
            Err(_) => vec![TokenType::Normal; tokens.len()],
        };
        types.resize(tokens.len(), TokenType::Normal);
        let mut eog_ids: Vec<u32> = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            if EOG_TEXTS.contains(&t.as_str()) {
                eog_ids.push(i as u32);
                if types[i] != TokenType::Control {
                    types[i] = TokenType::Control;
                }
            }
        }
        let merges: Vec<(String, String)> = g
            .strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| TokenizerError::Build(format!("bad merge `{m}`")))
            })
            .collect::<Result<_, _>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        let mut pretok: Vec<PreTokenizerWrapper> = Vec::new();
        for rx in regexes {
            let split = Split::new(
                SplitPattern::Regex((*rx).to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
            pretok.push(split.into());
        }
        pretok.push(ByteLevel::new(false, false, false).into());
        let mut tk = tokenizers::Tokenizer::new(bpe);
        tk.with_pre_tokenizer(Some(Sequence::new(pretok)));
        tk.with_decoder(Some(ByteLevelDecoder::default()));
        // Control and user-defined tokens are matched before BPE, like
        // llama.cpp's special-token partition.
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter_map(|(t, ty)| match ty {
                TokenType::Control => Some(AddedToken::from(t.clone(), true).normalized(false)),
                TokenType::UserDefined => {
                    Some(AddedToken::from(t.clone(), false).normalized(false))
                }
                _ => None,
            })
            .collect();
        tk.add_special_tokens(added)
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        let mut plain = tk.clone();
        plain.set_encode_special_tokens(true);

        let table = byte_level_table();
        let token_bytes = tokens
            .iter()
            .zip(&types)
            .map(|(t, ty)| match ty {
                TokenType::Control | TokenType::UserDefined | TokenType::Unknown => {
                    t.as_bytes().to_vec()
                }
                _ => t
                    .chars()
                    .map(|c| table.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| t.as_bytes().to_vec()),
            })
            .collect();

        let bos_id = g.u32("tokenizer.ggml.bos_token_id").ok();
        let eos_id = g.u32("tokenizer.ggml.eos_token_id").ok();
        let add_bos = g.bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
        // EOS first: it is the one llguidance is told about.
        for id in [g.u32("tokenizer.ggml.eot_token_id").ok(), eos_id].into_iter().flatten() {
            eog_ids.retain(|&e| e != id);
            eog_ids.insert(0, id);
        }
        let controls = tokens
            .iter()
            .zip(&types)
            .filter(|(_, ty)| **ty == TokenType::Control)
            .map(|(t, _)| t.clone())
            .collect();
        Ok(Self {
            with_special: tk,
            plain,
            token_bytes,
            token_types: types,
            tokens,
            bos_id,
            eos_id,
            add_bos,
            controls,
            eog_ids,
        })
    }

    /// Token ids for `text`, without BOS. With `parse_special`, control tokens
    /// written in the text become control tokens; without it they are plain text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let tk = if parse_special {
            &self.with_special
        } else {
            &self.plain
        };
        tk.encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// The exact bytes a token stands for (control tokens: their text).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| self.token_bytes(i).to_vec()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.with_special.token_to_id(s)
    }

    pub fn is_control(&self, id: u32) -> bool {
        matches!(
            self.token_types.get(id as usize),
            Some(TokenType::Control)
        )
    }

    /// The text of every control token (`<|im_start|>` …).
    pub fn control_token_strings(&self) -> &[String] {
        &self.controls
    }

    /// Unused or unknown tokens (padding entries): never text.
    pub fn is_unused(&self, id: u32) -> bool {
        matches!(
            self.token_types.get(id as usize),
            Some(TokenType::Unused | TokenType::Unknown)
        )
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog_ids.contains(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let t = byte_level_table();
        assert_eq!(t.len(), 256);
        let mut seen = [false; 256];
        for b in t.values() {
            seen[*b as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(t[&'Ġ'], b' ');
        assert_eq!(t[&'Ċ'], b'\n');
    }

    #[test]
    fn unknown_pre_tokenizer_is_reported() {
        assert!(pre_tokenizer_regexes("qwen2").is_some());
        assert!(pre_tokenizer_regexes("smollm").is_some());
        assert!(pre_tokenizer_regexes("no-such-pre").is_none());
    }
}
