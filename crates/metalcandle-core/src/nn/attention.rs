//! Grouped-query attention (MHA and MQA as special cases) with rotary embeddings, an additive
//! mask and a KV cache. Query heads `j*g .. j*g+g-1` share kv head `j`; instead of repeating
//! k and v, the g query heads of a group are stacked along the time axis of one matmul.

use super::Linear;
use crate::ops;
use crate::ops::dropout::Dropout;
use crate::spec::AttentionSpec;
use candle_core::{Result, Tensor, D};

// One per layer, built once: the size of the smaller variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum QkvProj {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// GPT-2's `c_attn`: q | k | v along the output dimension.
    Fused(Linear),
}

/// Runs the hooks of an attention-internal point (`attn_scores`, `attn_probs`) of this layer.
pub type PointHook<'a> = dyn Fn(&str, Tensor) -> Result<Tensor> + 'a;

#[derive(Debug, Clone)]
pub struct Attention {
    pub spec: AttentionSpec,
    pub qkv: QkvProj,
    pub o: Linear,
}

/// What the queries may see: a dense additive mask [B, 1, T, K], or (no cache, no hook) causal
/// attention over the block itself with the layer's window and this key mask [B*T], which
/// never builds [T, T] anything.
#[derive(Clone, Copy)]
pub enum AttnMask<'a> {
    Dense(&'a Tensor),
    Causal(Option<&'a [i64]>),
}

/// Keys and values of the tokens seen so far, each [B, kv_heads, T, head_dim].
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    pub kv: Option<(Tensor, Tensor)>,
}

impl Attention {
    /// `x` [B, T, hidden]; `rope` the cos/sin tables [B or 1, T, head_dim/2]; `mask` [B, 1, T, K].
    pub fn forward(
        &self,
        x: &Tensor,
        rope: Option<&(Tensor, Tensor)>,
        mask: AttnMask,
        cache: Option<&mut LayerCache>,
        hook: Option<&PointHook>,
        dropout: Option<Dropout>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let AttentionSpec {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            ..
        } = self.spec;
        let (q, k, v) = match &self.qkv {
            QkvProj::Separate { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
            QkvProj::Fused(qkv) => {
                let y = qkv.forward(x)?;
                (
                    y.narrow(D::Minus1, 0, nh * hd)?,
                    y.narrow(D::Minus1, nh * hd, nkv * hd)?,
                    y.narrow(D::Minus1, (nh + nkv) * hd, nkv * hd)?,
                )
            }
        };
        let mut q = q.reshape((b, t, nh, hd))?;
        let mut k = k.reshape((b, t, nkv, hd))?;
        let v = v.reshape((b, t, nkv, hd))?;
        if let Some((cos, sin)) = rope {
            q = ops::rope(&q, cos, sin)?;
            k = ops::rope(&k, cos, sin)?;
        }
        let scale = 1.0 / (hd as f64).sqrt();
        let mask = match mask {
            AttnMask::Causal(key_mask)
                if cache.is_none() && hook.is_none() && dropout.is_none() =>
            {
                let window = self.spec.sliding_window;
                let out = ops::flash_attention(&q, &k, &v, window, key_mask, scale)?;
                return self.o.forward(&out.reshape((b, t, nh * hd))?);
            }
            AttnMask::Causal(_) => {
                candle_core::bail!("attention with a cache, hooks or dropout needs a dense mask")
            }
            AttnMask::Dense(m) => m,
        };
        let q = q.transpose(1, 2)?.contiguous()?;
        let mut k = k.transpose(1, 2)?.contiguous()?;
        let mut v = v.transpose(1, 2)?.contiguous()?;
        if let Some(cache) = cache {
            if let Some((pk, pv)) = &cache.kv {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            cache.kv = Some((k.clone(), v.clone()));
        }
        let kt = k.dim(2)?;
        let g = nh / nkv;
        let q = q.reshape((b, nkv, g * t, hd))?;
        let probs = match hook {
            Some(h) => {
                let raw = q.matmul(&k.t()?)?.reshape((b, nh, t, kt))?;
                let scores = h("attn_scores", (raw * scale)?.broadcast_add(mask)?)?;
                h("attn_probs", ops::softmax_last_dim(&scores)?)?.reshape((b, nkv, g * t, kt))?
            }
            None => ops::attention_probs(&q, &k, g, scale, mask)?,
        };
        // The mask's element order is [B, heads, T, K], the fused kernel's.
        let probs = match dropout {
            Some(d) => d
                .forward(&probs.reshape((b, nh, t, kt))?)?
                .reshape((b, nkv, g * t, kt))?,
            None => probs,
        };
        let out = probs
            .matmul(&v)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        self.o.forward(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::mask::attention_mask;
    use crate::ops::gradcheck::max_abs_diff;
    use crate::testing::rand_tensor;
    use candle_core::{DType, Device};

    fn lin(name: &str, out: usize, inp: usize, seed: u64) -> Linear {
        let w = crate::nn::Weight::Float(rand_tensor(&[out, inp], seed));
        Linear::new(name.into(), w, None)
    }

    /// Naive reference: repeat kv heads, softmax per query, one head at a time.
    fn reference(attn: &Attention, x: &Tensor) -> Tensor {
        let QkvProj::Separate { q, k, v } = &attn.qkv else {
            unreachable!()
        };
        let (b, t, _) = x.dims3().unwrap();
        let (nh, nkv, hd) = (
            attn.spec.num_heads,
            attn.spec.num_kv_heads,
            attn.spec.head_dim,
        );
        let (q, k, v) = (
            q.forward(x).unwrap(),
            k.forward(x).unwrap(),
            v.forward(x).unwrap(),
        );
        let mut heads = vec![];
        for h in 0..nh {
            let kvh = h / (nh / nkv);
            let qh = q.narrow(2, h * hd, hd).unwrap();
            let kh = k.narrow(2, kvh * hd, hd).unwrap();
            let vh = v.narrow(2, kvh * hd, hd).unwrap();
            let s = (qh.matmul(&kh.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
            let causal: Vec<f64> = (0..t * t)
                .map(|i| {
                    if i % t <= i / t {
                        0.0
                    } else {
                        f64::NEG_INFINITY
                    }
                })
                .collect();
            let s = s
                .broadcast_add(&Tensor::from_vec(causal, (t, t), &Device::Cpu).unwrap())
                .unwrap();
            let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
            heads.push(p.matmul(&vh).unwrap());
        }
        let _ = b;
        attn.o.forward(&Tensor::cat(&heads, 2).unwrap()).unwrap()
    }

    #[test]
    fn gqa_matches_repeated_kv_reference_and_cache_matches_full_pass() {
        let (nh, nkv, hd, hidden, t) = (4, 2, 3, 8, 5);
        let spec = AttentionSpec {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            qkv_bias: false,
            o_bias: false,
            sliding_window: None,
            fused_qkv: false,
        };
        let attn = Attention {
            spec,
            qkv: QkvProj::Separate {
                q: lin("q", nh * hd, hidden, 1),
                k: lin("k", nkv * hd, hidden, 2),
                v: lin("v", nkv * hd, hidden, 3),
            },
            o: lin("o", hidden, nh * hd, 4),
        };
        let x = rand_tensor(&[2, t, hidden], 5);
        let mask = attention_mask(2, t, 0, None, None, DType::F64, &Device::Cpu).unwrap();
        let full = attn
            .forward(&x, None, AttnMask::Dense(&mask), None, None, None)
            .unwrap();
        assert!(max_abs_diff(&full, &reference(&attn, &x)) < 1e-12);
        let tiled = attn
            .forward(&x, None, AttnMask::Causal(None), None, None, None)
            .unwrap();
        assert!(max_abs_diff(&tiled, &full) < 1e-12);
        // Incremental: 3 tokens, then one at a time through the cache.
        let mut cache = LayerCache::default();
        let mut outs = vec![];
        for (start, len) in [(0, 3), (3, 1), (4, 1)] {
            let m = attention_mask(2, len, start, None, None, DType::F64, &Device::Cpu).unwrap();
            outs.push(
                attn.forward(
                    &x.narrow(1, start, len).unwrap(),
                    None,
                    AttnMask::Dense(&m),
                    Some(&mut cache),
                    None,
                    None,
                )
                .unwrap(),
            );
        }
        assert!(max_abs_diff(&Tensor::cat(&outs, 1).unwrap(), &full) < 1e-12);
    }
}
