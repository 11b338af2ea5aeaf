//! Decoder-only transformers loaded from GGUF, with the KV cache owned by the
//! caller.
//!
//! candle-transformers' quantized models keep one KV cache inside the model,
//! which allows one conversation at a time. Errand keeps a cache per session
//! (see `engine::kv_pool`), so the model here is immutable during a forward
//! pass and takes `&mut KvCache` instead: the same weights serve every
//! session, a cache can be cut back to a common prefix, and a later batching
//! scheduler can interleave sessions.
//!
//! Architectures are described by [`ArchSpec`]: `qwen2` (biased q/k/v,
//! NeoX-style rotary) and `llama` (no biases, interleaved rotary) are
//! implemented. `qwen3` (per-head q/k RMS norm) and `gemma3` (extra norms,
//! GELU, sliding windows) are recognised and refused with a clear message;
//! adding them means adding their fields to `ArchSpec` and `Layer`.

mod cache;
pub use errand_qkernel as qkernel;

pub use cache::KvCache;

use crate::gguf::{GgufError, GgufFile};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(
        "architecture `{0}` is not supported yet (supported: qwen2, llama){1}"
    )]
    UnsupportedArch(String, &'static str),
    #[error("the model file lacks tensor `{0}`; is it a complete {1} GGUF?")]
    MissingTensor(String, String),
    #[error("unsupported model shape: {0}")]
    Shape(String),
    #[error("the prompt needs {needed} positions but the model's context holds {limit}")]
    ContextOverflow { needed: usize, limit: usize },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// What differs between the supported architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchSpec {
    /// Rotary embedding on interleaved pairs (llama) or on halves (NeoX, qwen2).
    pub rope_interleaved: bool,
}

impl ArchSpec {
    pub fn for_name(name: &str) -> Result<Self, ModelError> {
        match name {
            "qwen2" => Ok(Self {
                rope_interleaved: false,
            }),
            "llama" => Ok(Self {
                rope_interleaved: true,
            }),
            "qwen3" => Err(ModelError::UnsupportedArch(
                name.into(),
                "; qwen3 needs per-head q/k RMS norms (add them to ArchSpec and Layer)",
            )),
            "gemma3" | "gemma2" | "gemma" => Err(ModelError::UnsupportedArch(
                name.into(),
                "; gemma needs GELU, extra norms and sliding-window attention",
            )),
            other => Err(ModelError::UnsupportedArch(other.into(), "")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: String,
    pub spec: ArchSpec,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub context_length: usize,
    pub rms_eps: f64,
    pub rope_theta: f32,
    pub vocab_size: usize,
}

impl ModelConfig {
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let arch = g.architecture()?.to_owned();
        let spec = ArchSpec::for_name(&arch)?;
        let k = |s: &str| format!("{arch}.{s}");
        let n_head = g.u32(&k("attention.head_count"))? as usize;
        let hidden = g.u32(&k("embedding_length"))? as usize;
        let head_dim = g
            .u32(&k("attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(hidden / n_head.max(1));
        if let Ok(rope_dim) = g.u32(&k("rope.dimension_count")) {
            if rope_dim as usize != head_dim {
                return Err(ModelError::Shape(format!(
                    "partial rotary embeddings ({rope_dim} of {head_dim} dims) are not supported"
                )));
            }
        }
        let n_kv_head = g
            .u32(&k("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(n_head);
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 || head_dim % 2 != 0 {
            return Err(ModelError::Shape(format!(
                "{n_head} query heads, {n_kv_head} KV heads and head size {head_dim} do not fit together"
            )));
        }
        if g.get(&k("rope.scaling.type")).is_some() || g.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(ModelError::Shape(
                "scaled rotary embeddings (rope scaling / rope_freqs, e.g. Llama 3.1) are not supported yet".into(),
            ));
        }
        let vocab_size = g
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.len())
            .unwrap_or(0);
        Ok(Self {
            spec,
            n_layer: g.u32(&k("block_count"))? as usize,
            n_head,
            n_kv_head,
            head_dim,
            hidden,
            context_length: g.u32(&k("context_length"))? as usize,
            rms_eps: g.f32(&k("attention.layer_norm_rms_epsilon"))? as f64,
            rope_theta: g.f32(&k("rope.freq_base")).unwrap_or(10_000.0),
            vocab_size,
            arch,
        })
    }
}

/// How weights are prepared at load time.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Multiply Q5_0 and Q8_0 matrices with Errand's own kernels
    /// ([`qkernel`]), on the file's blocks repacked 16 rows at a time at
    /// load ([`qkernel::packed`]; the file's layout where rows do not fill
    /// groups of 16), and run
    /// attention fused on the CPU ([`qkernel::attention`]). Off, every
    /// product goes through candle's own kernels and tensor ops (the
    /// reference path).
    pub native_kernels: bool,
    /// Re-quantize Q5_1/Q4_1 matrices (and Q5_0 when the native kernels are
    /// off) to Q8_0, which has fast SIMD kernels (Errand's and candle's);
    /// costs memory, keeps more precision than the source. With the native
    /// kernels, Q4_K and Q6_K (Qwen's `ffn_down`) too: candle multiplies
    /// them half as fast per weight as the packed kernels do Q8_0 (a
    /// 16-sequence decode step 108-113 -> 84-86 ms, one sequence 21.2-21.9
    /// -> 20.5-20.7 ms, for 39 MB more), and a lone Q6_K row no longer
    /// needs candle's two-row detour. The drift is measured in
    /// `tests/integration/reference_model.rs` and the README.
    pub requantize_to_q8_0: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            native_kernels: true,
            requantize_to_q8_0: true,
        }
    }
}

/// A weight matrix used as `x @ Wᵀ`.
///
/// Every row count goes through quantized products, the activations
/// quantized to 8 bits per block: Errand's own kernels for Q5_0 and Q8_0
/// (repacked 16 rows to a block, `Packed`; Q4_K and Q6_K `ffn_down` are
/// re-quantized to Q8_0 for them by default), candle's for the rest. Prefill used to dequantize each matrix to f32 for a blocked
/// GEMM from 96 rows (32 for candle's); with the 512-bit pair tiles the
/// 8-bit products are faster at every size (kbench, 4864x896, 2 threads,
/// 512 rows: 27 ms against 39 dequantized; `errand bench` pp512 161 -> 206
/// tok/s, pp48 130 -> 196-229), and nothing is dequantized, so prefill no
/// longer writes a 17 MB f32 copy of a matrix per chunk.
enum Linear {
    Native {
        w: Arc<QTensor>,
        kind: qkernel::Kind,
        n: usize,
        k: usize,
    },
    /// Q5_0/Q8_0 repacked 16 rows to a block (`qkernel::packed`): every
    /// matrix whose rows are a multiple of 16; the file's bytes are dropped.
    Packed(qkernel::packed::Packed),
    Candle(QMatMul),
}

impl Linear {
    fn new(w: Arc<QTensor>, opts: LoadOptions) -> Result<Self, ModelError> {
        let dims = w.shape().dims().to_vec();
        let w = if opts.requantize_to_q8_0
            && (matches!(w.dtype(), GgmlDType::Q5_1 | GgmlDType::Q4_1)
                || (opts.native_kernels && matches!(w.dtype(), GgmlDType::Q4K | GgmlDType::Q6K)))
            || (opts.requantize_to_q8_0 && !opts.native_kernels && w.dtype() == GgmlDType::Q5_0)
        {
            if dims.last().is_some_and(|k| k % 32 == 0) {
                let f = w.dequantize(&w.device())?;
                Arc::new(QTensor::quantize(&f, GgmlDType::Q8_0)?)
            } else {
                w
            }
        } else {
            w
        };
        let native = qkernel::Kind::of(w.dtype()).filter(|_| {
            opts.native_kernels && dims.len() == 2 && dims[1] % qkernel::QK == 0 && w.device().is_cpu()
        });
        if let Some(kind) = native {
            if let Some(p) = qkernel::packed::Packed::new(kind, &w.data()?, dims[0], dims[1]) {
                return Ok(Linear::Packed(p));
            }
            return Ok(Linear::Native { w, kind, n: dims[0], k: dims[1] });
        }
        Ok(Linear::Candle(QMatMul::from_arc(w)?))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Native { w, kind, n, k } => {
                let bytes = w.data()?;
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                rows_like(x, *n, qkernel::matmul(*kind, &bytes, *n, *k, &xs, qkernel::Path::Auto))
            }
            Linear::Packed(p) => {
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                rows_like(x, p.n(), qkernel::packed::matmul(p, &xs, qkernel::Path::Auto))
            }
            // candle multiplies one row of a Q6_K matrix with another kernel
            // than two or more, which sum in another order (Q2_K to Q5_K do
            // not); a lone row goes through the many-row kernel (as the
            // first of two), so a sequence decodes to the same bits alone
            // and in a batch (`candles_k_quant_rows_do_not_depend_on_the_batch`).
            Linear::Candle(QMatMul::QTensor(t))
                if t.dtype() == GgmlDType::Q6K
                    && x.elem_count() == x.dims().last().copied().unwrap_or(0)
                    && x.device().is_cpu() =>
            {
                let dims = x.dims().to_vec();
                let row = x.reshape((1, dims[dims.len() - 1]))?;
                let two = Tensor::cat(&[&row, &row], 0)?;
                let y = QMatMul::QTensor(t.clone()).forward(&two)?.narrow(0, 0, 1)?;
                let mut out = dims;
                if let Some(last) = out.last_mut() {
                    *last = y.dim(1)?;
                }
                y.reshape(out)
            }
            Linear::Candle(q) => q.forward(x),
        }
    }
}

/// `y`, rows of `n`, shaped like `x` with its last dimension `n`.
fn rows_like(x: &Tensor, n: usize, y: Vec<f32>) -> candle_core::Result<Tensor> {
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(y, dims, x.device())
}

struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
    wo: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Transformer {
    pub cfg: ModelConfig,
    embed: QMatMul,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// Attention through [`qkernel::attention`] (CPU, f32) instead of
    /// candle tensor ops; on with the native kernels.
    fused_attention: bool,
}

/// Largest number of prompt tokens pushed through the model at once; bounds
/// the attention scratch memory of a long prefill.
pub const PREFILL_CHUNK: usize = 512;

impl Transformer {
    pub fn load(g: &GgufFile, device: &Device, opts: LoadOptions) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_gguf(g)?;
        let mut reader = g.reader()?;
        let mut get = |name: &str| -> Result<Option<QTensor>, ModelError> {
            if !g.content.tensor_infos.contains_key(name) {
                return Ok(None);
            }
            Ok(Some(g.content.tensor(&mut reader, name, device)?))
        };
        let mut tensors = HashMap::new();
        let mut names: Vec<String> = vec![
            "token_embd.weight".into(),
            "output_norm.weight".into(),
            "output.weight".into(),
        ];
        for i in 0..cfg.n_layer {
            for t in [
                "attn_norm.weight",
                "attn_q.weight",
                "attn_k.weight",
                "attn_v.weight",
                "attn_q.bias",
                "attn_k.bias",
                "attn_v.bias",
                "attn_output.weight",
                "ffn_norm.weight",
                "ffn_gate.weight",
                "ffn_up.weight",
                "ffn_down.weight",
            ] {
                names.push(format!("blk.{i}.{t}"));
            }
        }
        for name in names {
            if let Some(t) = get(&name)? {
                tensors.insert(name, t);
            }
        }
        Self::from_tensors(cfg, tensors, device, opts)
    }

    /// Builds the model from named GGUF-style tensors (`blk.N.attn_q.weight` …).
    /// Used by [`Transformer::load`] and by tests that make small random models.
    pub fn from_tensors(
        cfg: ModelConfig,
        mut tensors: HashMap<String, QTensor>,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Self, ModelError> {
        let mut take = |name: &str| -> Result<QTensor, ModelError> {
            tensors
                .remove(name)
                .ok_or_else(|| ModelError::MissingTensor(name.into(), cfg.arch.clone()))
        };
        let matmul = |t: QTensor| Linear::new(Arc::new(t), opts);
        let vec = |t: QTensor| -> Result<Tensor, ModelError> { Ok(t.dequantize(device)?) };
        // The embedding is only used for row lookups, so it stays as stored;
        // with tied embeddings the output projection shares its weights
        // (converted like any other matrix when the kernels need it).
        let embed_q = Arc::new(take("token_embd.weight")?);
        let embed = QMatMul::from_arc(embed_q.clone())?;
        let output = match take("output.weight") {
            Ok(out) => matmul(out)?,
            Err(_) => Linear::new(embed_q, opts)?,
        };
        let norm = vec(take("output_norm.weight")?)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}");
            let bias = |t: Option<QTensor>| -> Result<Option<Tensor>, ModelError> {
                t.map(|t| vec(t)).transpose()
            };
            layers.push(Layer {
                attn_norm: vec(take(&p("attn_norm.weight"))?)?,
                wq: matmul(take(&p("attn_q.weight"))?)?,
                wk: matmul(take(&p("attn_k.weight"))?)?,
                wv: matmul(take(&p("attn_v.weight"))?)?,
                bq: bias(take(&p("attn_q.bias")).ok())?,
                bk: bias(take(&p("attn_k.bias")).ok())?,
                bv: bias(take(&p("attn_v.bias")).ok())?,
                wo: matmul(take(&p("attn_output.weight"))?)?,
                ffn_norm: vec(take(&p("ffn_norm.weight"))?)?,
                gate: matmul(take(&p("ffn_gate.weight"))?)?,
                up: matmul(take(&p("ffn_up.weight"))?)?,
                down: matmul(take(&p("ffn_down.weight"))?)?,
            });
        }
        let (cos, sin) = rope_tables(&cfg, device)?;
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            output,
            cos,
            sin,
            device: device.clone(),
            fused_attention: opts.native_kernels,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::with_limit(self.cfg.n_layer, self.cfg.context_length)
    }

    /// Runs `tokens` after what `cache` already holds and returns the logits
    /// (f32, vocabulary-sized) for the position after the last token.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Shape("forward needs at least one token".into()));
        }
        let needed = cache.len() + tokens.len();
        if needed > self.cfg.context_length {
            return Err(ModelError::ContextOverflow {
                needed,
                limit: self.cfg.context_length,
            });
        }
        let mut last = None;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            last = Some(self.forward_chunk(chunk, cache)?);
        }
        let hidden = last.expect("at least one chunk");
        let logits = self.output.forward(&hidden)?;
        Ok(logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
    }

    /// One decode step for several sequences at once: `tokens[i]` follows
    /// what `caches[i]` holds. The weight matrices are streamed once for the
    /// whole batch (each is multiplied with `tokens.len()` rows, which costs
    /// little more than one while decode is bound by memory bandwidth);
    /// rotary positions and attention are per sequence, over its own cache.
    /// Each row is computed exactly as [`forward`](Self::forward) computes
    /// it alone (same kernels, same order of summation), so batching does not
    /// change greedy outputs. Returns each sequence's logits.
    pub fn forward_batch(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Vec<Vec<f32>>, ModelError> {
        let b = tokens.len();
        if b != caches.len() {
            return Err(ModelError::Shape(format!("{b} tokens for {} caches", caches.len())));
        }
        if b == 0 {
            return Ok(Vec::new());
        }
        for cache in caches.iter() {
            let needed = cache.len() + 1;
            if needed > self.cfg.context_length {
                return Err(ModelError::ContextOverflow {
                    needed,
                    limit: self.cfg.context_length,
                });
            }
        }
        let c = &self.cfg;
        let n_rep = c.n_head / c.n_kv_head;
        let eps = c.rms_eps as f32;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let pos: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mut x = self.embed.embedding(&ids)?.to_dtype(DType::F32)?; // (1, b, hidden)
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let q = add_bias(layer.wq.forward(&h)?, &layer.bq)?;
            let k = add_bias(layer.wk.forward(&h)?, &layer.bk)?;
            let v = add_bias(layer.wv.forward(&h)?, &layer.bv)?;
            let mut ys = Vec::with_capacity(b);
            for (i, cache) in caches.iter_mut().enumerate() {
                let p = pos[i];
                let q = q.narrow(1, i, 1)?.reshape((1, c.n_head, 1, c.head_dim))?;
                let k = k.narrow(1, i, 1)?.reshape((1, c.n_kv_head, 1, c.head_dim))?;
                let v = v.narrow(1, i, 1)?.reshape((1, c.n_kv_head, 1, c.head_dim))?.contiguous()?;
                let cos = self.cos.narrow(0, p, 1)?;
                let sin = self.sin.narrow(0, p, 1)?;
                let (q, k) = if c.spec.rope_interleaved {
                    (
                        candle_nn::rotary_emb::rope_i(&q.contiguous()?, &cos, &sin)?,
                        candle_nn::rotary_emb::rope_i(&k.contiguous()?, &cos, &sin)?,
                    )
                } else {
                    (
                        candle_nn::rotary_emb::rope(&q.contiguous()?, &cos, &sin)?,
                        candle_nn::rotary_emb::rope(&k.contiguous()?, &cos, &sin)?,
                    )
                };
                let (k_all, v_all) = cache.append(li, &k, &v, p)?;
                if let Some(y) = self.fused(&q, &k_all, &v_all, p, 1)? {
                    ys.push(y);
                    continue;
                }
                let q = q.reshape((1, c.n_kv_head, n_rep, c.head_dim))?;
                let att = (q.matmul(&k_all.t()?)? * scale)?;
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                ys.push(att.matmul(&v_all)?.reshape((1, 1, c.n_head * c.head_dim))?);
            }
            let y = Tensor::cat(&ys, 1)?;
            x = (x + layer.wo.forward(&y)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let g = candle_nn::ops::silu(&layer.gate.forward(&h)?)?;
            let u = layer.up.forward(&h)?;
            x = (x + layer.down.forward(&(g * u)?)?)?;
        }
        for (cache, p) in caches.iter_mut().zip(&pos) {
            cache.set_len(p + 1);
        }
        let h = candle_nn::ops::rms_norm(&x.reshape((b, c.hidden))?, &self.norm, eps)?;
        let logits = self.output.forward(&h)?.to_dtype(DType::F32)?;
        let n = logits.dim(1)?;
        let flat = logits.flatten_all()?.to_vec1::<f32>()?;
        Ok(flat.chunks_exact(n).map(<[f32]>::to_vec).collect())
    }

    /// Causal attention of `s` new queries `q` `(1, n_head, s, hd)` over the
    /// cached `k_all`, `v_all` `(1, n_kv, pos + s, hd)` with the fused CPU
    /// kernel, as `(1, s, n_head * hd)`; `None` when it does not apply (off,
    /// not on the CPU, not f32, or a layout it does not read), so the
    /// caller takes the tensor path.
    fn fused(&self, q: &Tensor, k_all: &Tensor, v_all: &Tensor, pos: usize, s: usize) -> Result<Option<Tensor>, ModelError> {
        use candle_core::Storage;
        let c = &self.cfg;
        let hd = c.head_dim;
        if !self.fused_attention || !self.device.is_cpu() || [q, k_all, v_all].iter().any(|t| t.dtype() != DType::F32) {
            return Ok(None);
        }
        let q = q.contiguous()?;
        let (kl, vl) = (k_all.layout(), v_all.layout());
        let kv_ok = |l: &candle_core::Layout| {
            let st = l.stride();
            l.dims() == [1, c.n_kv_head, pos + s, hd] && st[3] == 1 && st[2] == hd
        };
        if !kv_ok(kl) || !kv_ok(vl) || kl.stride()[1] != vl.stride()[1] {
            return Ok(None);
        }
        let (qs, ql) = q.storage_and_layout();
        let (ks, _) = k_all.storage_and_layout();
        let (vs, _) = v_all.storage_and_layout();
        let (Storage::Cpu(qc), Storage::Cpu(kc), Storage::Cpu(vc)) = (&*qs, &*ks, &*vs) else {
            return Ok(None);
        };
        let n = c.n_head * s * hd;
        let qv = &qc.as_slice::<f32>()?[ql.start_offset()..][..n];
        let kv = &kc.as_slice::<f32>()?[kl.start_offset()..];
        let vv = &vc.as_slice::<f32>()?[vl.start_offset()..];
        let shape = qkernel::attention::AttnShape {
            n_head: c.n_head,
            n_kv: c.n_kv_head,
            head_dim: hd,
            s,
            pos,
            kv_head_stride: kl.stride()[1],
        };
        let y = qkernel::attention::attention(qv, kv, vv, shape, 1.0 / (hd as f32).sqrt());
        Ok(Some(Tensor::from_vec(y, (1, s, c.n_head * hd), &self.device)?))
    }

    /// One chunk through every layer; returns the normalised hidden state of
    /// the chunk's last position, shape (1, hidden).
    fn forward_chunk(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor, ModelError> {
        let c = &self.cfg;
        let s = tokens.len();
        let pos = cache.len();
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mut x = self.embed.embedding(&ids)?.to_dtype(DType::F32)?;
        let cos = self.cos.narrow(0, pos, s)?;
        let sin = self.sin.narrow(0, pos, s)?;
        let n_rep = c.n_head / c.n_kv_head;
        // Built on first use: the fused kernel masks by itself, and any layer
        // it declines (another device, dtype or layout) falls back to the
        // tensor path, which needs the mask.
        let mut mask: Option<Tensor> = None;
        let eps = c.rms_eps as f32;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let q = add_bias(layer.wq.forward(&h)?, &layer.bq)?;
            let k = add_bias(layer.wk.forward(&h)?, &layer.bk)?;
            let v = add_bias(layer.wv.forward(&h)?, &layer.bv)?;
            let q = q.reshape((1, s, c.n_head, c.head_dim))?.transpose(1, 2)?.contiguous()?;
            let k = k.reshape((1, s, c.n_kv_head, c.head_dim))?.transpose(1, 2)?.contiguous()?;
            let v = v.reshape((1, s, c.n_kv_head, c.head_dim))?.transpose(1, 2)?.contiguous()?;
            let (q, k) = if c.spec.rope_interleaved {
                (
                    candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?,
                )
            } else {
                (
                    candle_nn::rotary_emb::rope(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope(&k, &cos, &sin)?,
                )
            };
            let (k_all, v_all) = cache.append(li, &k, &v, pos)?;
            let y = match self.fused(&q, &k_all, &v_all, pos, s)? {
                Some(y) => y,
                None => {
                    // Grouped-query attention without copying K/V: the n_rep
                    // query heads that share a KV head become extra rows of
                    // one matmul.
                    let q = q.reshape((1, c.n_kv_head, n_rep * s, c.head_dim))?;
                    let scale = 1.0 / (c.head_dim as f64).sqrt();
                    let att = (q.matmul(&k_all.t()?)? * scale)?;
                    if s > 1 && mask.is_none() {
                        mask = Some(causal_mask(s, pos, &self.device)?);
                    }
                    let att = match &mask {
                        // (1, n_kv, n_rep, s, kv) + (s, kv): one mask for every head.
                        Some(m) => att
                            .reshape((1, c.n_kv_head, n_rep, s, pos + s))?
                            .broadcast_add(m)?
                            .reshape((1, c.n_kv_head, n_rep * s, pos + s))?,
                        None => att,
                    };
                    let att = candle_nn::ops::softmax_last_dim(&att)?;
                    let y = att.matmul(&v_all)?; // (1, n_kv, n_rep*s, hd)
                    y.reshape((1, c.n_head, s, c.head_dim))?
                        .transpose(1, 2)?
                        .reshape((1, s, c.n_head * c.head_dim))?
                }
            };
            x = (x + layer.wo.forward(&y)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let g = candle_nn::ops::silu(&layer.gate.forward(&h)?)?;
            let u = layer.up.forward(&h)?;
            x = (x + layer.down.forward(&(g * u)?)?)?;
        }
        cache.set_len(pos + s);
        let last = x.narrow(1, s - 1, 1)?.reshape((1, c.hidden))?;
        Ok(candle_nn::ops::rms_norm(&last, &self.norm, eps)?)
    }
}

fn add_bias(x: Tensor, b: &Option<Tensor>) -> candle_core::Result<Tensor> {
    match b {
        Some(b) => x.broadcast_add(b),
        None => Ok(x),
    }
}

fn rope_tables(cfg: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor), ModelError> {
    let half = cfg.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
        .collect();
    let n = cfg.context_length;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), device)?,
        Tensor::from_vec(sin, (n, half), device)?,
    ))
}

/// Additive causal mask `(s, pos + s)` for `s` new queries after `pos`
/// cached positions.
fn causal_mask(s: usize, pos: usize, device: &Device) -> candle_core::Result<Tensor> {
    let kv = pos + s;
    let mut m = Vec::with_capacity(s * kv);
    for i in 0..s {
        for j in 0..kv {
            m.push(if j <= pos + i { 0f32 } else { f32::NEG_INFINITY });
        }
    }
    Tensor::from_vec(m, (s, kv), device)
}

/// Index of the largest logit (greedy decoding).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod qkernel_tests;
