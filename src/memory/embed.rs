//! Sentence embeddings: all-MiniLM-L6-v2 on candle's BERT.
//!
//! The pipeline matches sentence-transformers' configuration for this model
//! (`modules.json`: Transformer → mean Pooling → Normalize, max_seq_length
//! 256), so vectors are comparable with ones computed in Python.
//!
//! Texts are tokenized all at once, sorted by length and run in batches of
//! [`BATCH`], each padded only to its own longest text: similar lengths share
//! a batch, so little compute is spent on padding. Padding is masked out of
//! attention and of the mean, so a text's vector does not depend on what it
//! was batched with.

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use std::path::Path;
use tokenizers::{Encoding, Tokenizer, TruncationParams};

/// The catalog name, also returned by [`Embedder::id`] so stored vectors can
/// record which model made them.
pub const MINILM_ID: &str = "all-minilm-l6-v2";
/// Texts per forward pass: large enough to keep matmuls efficient, small
/// enough that a full batch of 256-token texts peaks at a few hundred MB
/// (one layer's attention scores are 32×12×256×256 floats, 100 MB).
pub const BATCH: usize = 32;
/// Tokens per text, special tokens included (sentence-transformers'
/// max_seq_length for this model; it was trained on at most 256).
pub const MAX_TOKENS: usize = 256;

/// Turns texts into L2-normalised vectors. Blocking and CPU-heavy: async callers use spawn_blocking.
pub trait Embedder: Send + Sync {
    /// Vector length (384 for MiniLM).
    fn dim(&self) -> usize;
    /// A stable name of the model, e.g. "all-minilm-l6-v2".
    fn id(&self) -> &str;
    /// One unit-length vector per text, in order, computed in batches. An empty slice gives an empty Vec.
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>>;
}

/// all-MiniLM-L6-v2: a 6-layer, 384-wide BERT with mean pooling.
pub struct MiniLm {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dim: usize,
    pad_id: u32,
    batch: usize,
}

impl MiniLm {
    /// Loads `model.safetensors`, `config.json`, `tokenizer.json` from `dir`, on CPU. Clear errors naming the missing/corrupt file.
    pub fn load(dir: &Path) -> Result<Self> {
        let [weights, config_path, tokenizer_path] =
            ["model.safetensors", "config.json", "tokenizer.json"].map(|f| dir.join(f));
        // Report every missing file at once rather than the first one only.
        let missing: Vec<String> = [&weights, &config_path, &tokenizer_path]
            .iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            anyhow::bail!("embedding model files missing: {}", missing.join(", "));
        }

        let config: Config = std::fs::read_to_string(&config_path)
            .map_err(anyhow::Error::from)
            .and_then(|s| Ok(serde_json::from_str(&s)?))
            .with_context(|| format!("invalid BERT config {}", config_path.display()))?;

        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| anyhow!("invalid tokenizer {}: {e}", tokenizer_path.display()))?;
        // tokenizer.json ships with fixed padding to 128 and truncation at
        // 128; set both here so behaviour does not hinge on that file.
        // Padding is done per batch in `embed_batch`.
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| anyhow!("setting truncation: {e}"))?;
        tokenizer.with_padding(None);
        let pad_id = tokenizer
            .token_to_id("[PAD]")
            .unwrap_or(config.pad_token_id as u32);

        let device = Device::Cpu;
        // SAFETY: the file is memory-mapped; it must not be modified while
        // the model is alive. Model files in the cache are written once by
        // models/fetch.py and never rewritten in place.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device) }
            .with_context(|| format!("invalid safetensors file {}", weights.display()))?;
        // The checkpoint's tensors have no `bert.` prefix; BertModel::load
        // also accepts `bert.`-prefixed names (via config.model_type).
        let model = BertModel::load(vb, &config)
            .with_context(|| format!("loading BERT weights from {}", weights.display()))?;

        Ok(Self {
            model,
            tokenizer,
            device,
            dim: config.hidden_size,
            pad_id,
            batch: BATCH,
        })
    }

    /// Resolves the catalog model "all-minilm-l6-v2" (errand::catalog::resolve) and loads it; the error says how to fetch it (`python3 models/fetch.py all-minilm-l6-v2`).
    pub fn from_catalog() -> Result<Self> {
        // The catalog error already carries the fetch command.
        let resolved = crate::catalog::resolve(MINILM_ID)?;
        Self::load(&resolved.dir)
            .with_context(|| format!("re-fetch it with: python3 models/fetch.py {MINILM_ID}"))
    }

    /// One forward pass over encodings of (ideally) similar length.
    fn embed_batch(&self, encodings: &[&Encoding]) -> Result<Vec<Vec<f32>>> {
        let rows = encodings.len();
        let len = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut ids = vec![self.pad_id; rows * len];
        let mut mask = vec![0u32; rows * len];
        for (row, enc) in encodings.iter().enumerate() {
            let at = row * len;
            ids[at..at + enc.len()].copy_from_slice(enc.get_ids());
            mask[at..at + enc.len()].copy_from_slice(enc.get_attention_mask());
        }
        let ids = Tensor::from_vec(ids, (rows, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (rows, len), &self.device)?;
        // Single-segment input: every token is segment 0.
        let type_ids = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &type_ids, Some(&mask))?; // (rows, len, dim)

        // Mean over real tokens only: zero the padding, divide by the count.
        let weights = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (rows, len, 1)
        let summed = hidden.broadcast_mul(&weights)?.sum(1)?; // (rows, dim)
        let counts = weights.sum(1)?; // (rows, 1); >= 2 thanks to [CLS] and [SEP]
        let mean = summed.broadcast_div(&counts)?;

        let mut vectors = mean.to_vec2::<f32>()?;
        vectors.iter_mut().for_each(|v| normalize(v));
        Ok(vectors)
    }
}

impl Embedder for MiniLm {
    fn dim(&self) -> usize {
        self.dim
    }

    fn id(&self) -> &str {
        MINILM_ID
    }

    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;

        // Batch texts of similar length together, then put results back in
        // the caller's order.
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| encodings[i].len());
        let mut out = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(self.batch) {
            let batch: Vec<&Encoding> = chunk.iter().map(|&i| &encodings[i]).collect();
            for (&i, v) in chunk.iter().zip(self.embed_batch(&batch)?) {
                out[i] = v;
            }
        }
        Ok(out)
    }
}

/// Scales `v` to unit length; a zero vector stays zero instead of NaN.
fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > f32::EPSILON {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Cosine of two unit vectors (a dot product).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len(), "vectors of different lengths");
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;
    use std::time::Instant;

    /// Loaded once for all tests. A missing model fails (with the fetch
    /// command from the catalog error) rather than skipping.
    fn model() -> &'static MiniLm {
        static MODEL: OnceLock<MiniLm> = OnceLock::new();
        MODEL.get_or_init(|| {
            MiniLm::from_catalog()
                .unwrap_or_else(|e| panic!("all-minilm-l6-v2 is needed for these tests: {e:#}"))
        })
    }

    fn embed(texts: &[&str]) -> Vec<Vec<f32>> {
        let texts: Vec<String> = texts.iter().map(|s| s.to_string()).collect();
        model().embed(&texts).unwrap()
    }

    fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(worst <= tol, "{what}: max abs difference {worst} > {tol}");
    }

    #[test]
    fn related_pairs_score_higher_than_unrelated() {
        // (anchor, related, unrelated)
        let triples = [
            (
                "I am vegetarian",
                "I don't eat meat",
                "The train leaves at 8",
            ),
            (
                "spicy Sichuan food",
                "mapo tofu and chili",
                "a ticket to Swan Lake ballet",
            ),
            (
                "order a taxi to the airport",
                "ride to Pudong airport",
                "sushi for dinner",
            ),
            (
                "book a haircut for Saturday",
                "salon appointment this weekend",
                "buy a bicycle lock",
            ),
            (
                "my daughter is allergic to peanuts",
                "nut allergy in the family",
                "the concert starts at nine",
            ),
            (
                "I prefer window seats",
                "seat by the window please",
                "pay the electricity bill",
            ),
        ];
        let mut texts = Vec::new();
        for (a, r, u) in triples {
            texts.extend([a, r, u]);
        }
        let v = embed(&texts);
        for (k, (a, r, u)) in triples.iter().enumerate() {
            let related = cosine(&v[3 * k], &v[3 * k + 1]);
            let unrelated = cosine(&v[3 * k], &v[3 * k + 2]);
            assert!(
                related > unrelated,
                "sim({a:?}, {r:?}) = {related:.3} should exceed sim({a:?}, {u:?}) = {unrelated:.3}"
            );
        }
    }

    /// Pins the whole pipeline (lowercasing, special tokens, segment ids,
    /// mean pooling, normalisation). The reference values came from a
    /// separate plain-Python BERT forward pass over the same safetensors
    /// file, written independently of candle; the two agreed to 2e-7.
    #[test]
    fn matches_an_independent_reference() {
        let m = model();
        let enc = m.tokenizer.encode("I am vegetarian", true).unwrap();
        assert_eq!(enc.get_ids(), [101, 1045, 2572, 23566, 102]);
        let v = embed(&["I am vegetarian"]).remove(0);
        let reference = [
            0.0258508, -0.0438815, -0.0508285, 0.0884612, -0.0404897, -0.0280285,
        ];
        assert_close(&v[..reference.len()], &reference, 1e-4, "first dimensions");
    }

    #[test]
    fn vectors_are_unit_length_with_model_dim() {
        let m = model();
        assert_eq!(m.dim(), 384);
        assert_eq!(m.id(), "all-minilm-l6-v2");
        let v = embed(&[
            "hello",
            "a somewhat longer sentence about trains and tickets",
            "",
        ]);
        assert_eq!(v.len(), 3);
        for x in &v {
            assert_eq!(x.len(), 384);
            let norm = cosine(x, x).sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
        }
        // A text is maximally similar to itself.
        assert!((cosine(&v[1], &v[1]) - 1.0).abs() < 1e-4);
    }

    #[test]
    fn batching_does_not_change_vectors() {
        let short = "I am vegetarian";
        let alone = embed(&[short]).remove(0);
        let long = "We are planning a long family trip next spring, with flights, hotels, \
                    a rental car and dinners every evening at restaurants that serve \
                    vegetarian food, and we would like to see a ballet on the last night.";
        // The short text padded to the long ones, at the start, middle and end.
        let batch = embed(&[short, long, long, short, "x", long, short]);
        for i in [0, 3, 6] {
            assert_close(&alone, &batch[i], 1e-4, "short text alone vs in a batch");
        }
        // More than one batch (sorted by length across batch boundaries).
        let many: Vec<String> = (0..(BATCH * 2 + 5))
            .map(|i| {
                if i % 7 == 0 {
                    short.to_string()
                } else {
                    format!("{long} {i}")
                }
            })
            .collect();
        let v = model().embed(&many).unwrap();
        assert_eq!(v.len(), many.len());
        for i in (0..many.len()).step_by(7) {
            assert_close(&alone, &v[i], 1e-4, "short text across several batches");
        }
        // Order is the caller's order, not the sorted one.
        let single = embed(&[&many[1]]).remove(0);
        assert_close(&single, &v[1], 1e-4, "long text across several batches");
    }

    #[test]
    fn empty_and_very_long_texts_embed() {
        assert!(model().embed(&[]).unwrap().is_empty());
        let long: String = (0..2000).map(|i| format!("word{} ", i % 50)).collect();
        let v = embed(&["", &long, "   "]);
        assert_eq!(v.len(), 3);
        for x in &v {
            assert_eq!(x.len(), 384);
            assert!(x.iter().all(|f| f.is_finite()));
        }
        // Truncation at MAX_TOKENS: text past the limit does not matter.
        let longer = format!("{long} completely different ending about ballet tickets");
        assert_close(
            &v[1],
            &embed(&[&longer])[0],
            1e-4,
            "text beyond the token limit",
        );
    }

    #[test]
    fn load_names_missing_and_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!(
            "{:#}",
            MiniLm::load(dir.path()).err().expect("empty dir must fail")
        );
        for f in ["model.safetensors", "config.json", "tokenizer.json"] {
            assert!(e.contains(f), "{e}");
        }

        // Real config and tokenizer, truncated weights.
        let real = crate::catalog::resolve(MINILM_ID).unwrap().dir;
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(real.join(f), dir.path().join(f)).unwrap();
        }
        std::fs::write(dir.path().join("model.safetensors"), b"not safetensors").unwrap();
        let e = format!(
            "{:#}",
            MiniLm::load(dir.path())
                .err()
                .expect("corrupt weights must fail")
        );
        assert!(e.contains("model.safetensors"), "{e}");

        std::fs::write(dir.path().join("config.json"), b"{").unwrap();
        let e = format!(
            "{:#}",
            MiniLm::load(dir.path())
                .err()
                .expect("corrupt config must fail")
        );
        assert!(e.contains("config.json"), "{e}");
    }

    #[test]
    fn cosine_is_a_dot_product() {
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 1.0]), 0.0);
        assert!((cosine(&[0.6, 0.8], &[0.6, 0.8]) - 1.0).abs() < 1e-6);
        let mut z = vec![0.0; 4];
        normalize(&mut z);
        assert!(z.iter().all(|x| *x == 0.0));
    }

    /// Timings for the report; informational only, never asserted.
    #[test]
    fn timing_report() {
        let t = Instant::now();
        let m = MiniLm::from_catalog().unwrap_or_else(|e| panic!("{e:#}"));
        let load = t.elapsed();
        let texts: Vec<String> = (0..64)
            .map(|i| format!("Sentence number {i} about dinner, trains and tickets."))
            .collect();
        m.embed(&texts[..4]).unwrap(); // warm up
        let t = Instant::now();
        m.embed(&texts).unwrap();
        let per_text = t.elapsed() / texts.len() as u32;
        eprintln!("minilm: load {load:?}, {per_text:?} per text (batch of 64 short sentences)");
    }
}
