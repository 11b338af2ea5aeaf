//! A growable per-session KV cache.
//!
//! Keys and values live in preallocated tensors of shape
//! `(1, n_kv_head, capacity, head_dim)`; appending writes in place
//! (`slice_set`) instead of concatenating, and cutting the cache back to a
//! shared prefix is just lowering `len`.

use candle_core::{Result, Tensor};

/// Capacity grows in steps of this many positions (and doubles past it).
const GROW_STEP: usize = 256;

struct LayerKv {
    k: Tensor,
    v: Tensor,
}

pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    capacity: usize,
    /// Never grow past this many positions (the model's context).
    limit: usize,
}

impl KvCache {
    pub fn new(n_layer: usize) -> Self {
        Self::with_limit(n_layer, usize::MAX)
    }

    pub fn with_limit(n_layer: usize, limit: usize) -> Self {
        Self {
            layers: (0..n_layer).map(|_| None).collect(),
            len: 0,
            capacity: 0,
            limit,
        }
    }

    /// Number of positions whose keys and values are valid.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }

    /// Forget everything after the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes held by the cache's buffers (what the memory budget counts).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| 2 * l.k.elem_count() * l.k.dtype().size_in_bytes())
            .sum()
    }

    /// A new cache holding a copy of the first `n` positions (for another
    /// session that starts with the same tokens).
    pub fn copy_prefix(&self, n: usize) -> Result<KvCache> {
        let n = n.min(self.len);
        let mut out = KvCache::with_limit(self.layers.len(), self.limit);
        for (dst, src) in out.layers.iter_mut().zip(&self.layers) {
            if let (Some(l), true) = (src, n > 0) {
                let (_, n_kv, _, hd) = l.k.dims4()?;
                let cap = n.next_multiple_of(GROW_STEP).min(self.limit.max(n));
                let k = Tensor::zeros((1, n_kv, cap, hd), l.k.dtype(), l.k.device())?;
                let v = Tensor::zeros((1, n_kv, cap, hd), l.v.dtype(), l.v.device())?;
                k.slice_set(&l.k.narrow(2, 0, n)?.contiguous()?, 2, 0)?;
                v.slice_set(&l.v.narrow(2, 0, n)?.contiguous()?, 2, 0)?;
                out.capacity = out.capacity.max(cap);
                *dst = Some(LayerKv { k, v });
            }
        }
        out.len = n;
        Ok(out)
    }

    /// Writes `k`, `v` (shape `(1, n_kv, s, hd)`) at position `pos` of layer
    /// `layer` and returns views of all `pos + s` cached keys and values.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        pos: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (_, n_kv, s, hd) = k.dims4()?;
        let need = pos + s;
        let slot = &mut self.layers[layer];
        let cap = slot.as_ref().map(|l| l.k.dims()[2]).unwrap_or(0);
        if need > cap {
            let new_cap = need
                .max(cap * 2)
                .max(GROW_STEP)
                .next_multiple_of(GROW_STEP)
                .min(self.limit.max(need));
            let nk = Tensor::zeros((1, n_kv, new_cap, hd), k.dtype(), k.device())?;
            let nv = Tensor::zeros((1, n_kv, new_cap, hd), v.dtype(), v.device())?;
            if let Some(old) = slot.take() {
                if pos > 0 {
                    nk.slice_set(&old.k.narrow(2, 0, pos)?.contiguous()?, 2, 0)?;
                    nv.slice_set(&old.v.narrow(2, 0, pos)?.contiguous()?, 2, 0)?;
                }
            }
            *slot = Some(LayerKv { k: nk, v: nv });
            self.capacity = self.capacity.max(new_cap);
        }
        let l = slot.as_ref().expect("allocated above");
        l.k.slice_set(k, 2, pos)?;
        l.v.slice_set(v, 2, pos)?;
        Ok((l.k.narrow(2, 0, need)?, l.v.narrow(2, 0, need)?))
    }
}
