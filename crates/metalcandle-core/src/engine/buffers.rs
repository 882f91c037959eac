//! Activation and scratch buffers for one (batch, sequence) shape: allocated once, reused by
//! every step. Sizes come from the plan (the largest layer), so any layer fits any slot.

/// What one block keeps from its forward for its backward.
pub struct Acts {
    /// attn_norm(x) [N, C], with per-row mean (LayerNorm) and 1/std
    pub ln1: Vec<f32>,
    pub mean1: Vec<f32>,
    pub rstd1: Vec<f32>,
    /// q [N, Q], k and v [N, KV], after RoPE
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// attention output before o_proj [N, Q] and its row log-sum-exp [B * heads * T]
    pub att: Vec<f32>,
    pub lse: Vec<f32>,
    /// x + attn [N, C]
    pub x2: Vec<f32>,
    pub ln2: Vec<f32>,
    pub mean2: Vec<f32>,
    pub rstd2: Vec<f32>,
    /// gate and up projections, and act(gate) * up [N, F]; gate is empty for plain MLPs
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub h: Vec<f32>,
    /// Each linear's LoRA input projection x A^T [N, r], by `LoraSlot` (empty without LoRA).
    pub lora: Vec<Vec<f32>>,
}

/// Where each of a block's linears keeps its LoRA activations.
#[derive(Clone, Copy)]
pub enum LoraSlot {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    /// The last slot: `Acts::lora` holds `Down as usize + 1` buffers.
    Down,
}

/// Widths of a layer's buffers.
#[derive(Clone, Copy, Default)]
pub struct Dims {
    pub hidden: usize,
    pub q: usize,
    pub kv: usize,
    pub ff: usize,
    pub heads: usize,
    pub gated: bool,
    /// The largest LoRA rank (0 without an adapter).
    pub rank: usize,
    pub dropout: bool,
}

impl Acts {
    pub fn new(n: usize, d: &Dims) -> Self {
        let z = |len: usize| vec![0f32; len];
        Acts {
            ln1: z(n * d.hidden),
            mean1: z(n),
            rstd1: z(n),
            q: z(n * d.q),
            k: z(n * d.kv),
            v: z(n * d.kv),
            att: z(n * d.q),
            lse: z(n * d.heads),
            x2: z(n * d.hidden),
            ln2: z(n * d.hidden),
            mean2: z(n),
            rstd2: z(n),
            gate: z(if d.gated { n * d.ff } else { 0 }),
            up: z(n * d.ff),
            h: z(n * d.ff),
            lora: (0..=LoraSlot::Down as usize)
                .map(|_| z(n * d.rank))
                .collect(),
        }
    }
}

/// Gradient scratch of one block's backward, shared by all layers: a struct apart from `Acts`,
/// which it resembles, because it is one set for every layer where `Acts` is kept per layer.
pub struct Grads {
    /// the gradient of the residual stream [N, C], updated in place layer by layer
    pub dres: Vec<f32>,
    /// gradient of a norm's output [N, C]
    pub dln: Vec<f32>,
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    pub datt: Vec<f32>,
    pub dh: Vec<f32>,
    pub dgate: Vec<f32>,
    pub dup: Vec<f32>,
    /// dL/d (x A^T) of the LoRA linear being differentiated [N, r]
    pub dlora: Vec<f32>,
    /// The gradient of a dropped-out branch's output: the residual gradient through the mask
    /// [N, C] (empty without dropout)
    pub dbranch: Vec<f32>,
}

impl Grads {
    pub fn new(n: usize, d: &Dims) -> Self {
        let z = |len: usize| vec![0f32; len];
        Grads {
            dres: z(n * d.hidden),
            dln: z(n * d.hidden),
            dq: z(n * d.q),
            dk: z(n * d.kv),
            dv: z(n * d.kv),
            datt: z(n * d.q),
            dh: z(n * d.ff),
            dgate: z(n * d.ff),
            dup: z(n * d.ff),
            dlora: z(n * d.rank),
            dbranch: z(if d.dropout { n * d.hidden } else { 0 }),
        }
    }
}

/// Every buffer of a step of shape (batch, seq).
pub struct Buffers {
    /// The residual stream entering each block, and the input of the final norm: [L + 1][N, C].
    /// With checkpointing these are all a block keeps.
    pub res: Vec<Vec<f32>>,
    /// One per layer, or a single slot recomputed per layer with checkpointing.
    pub acts: Vec<Acts>,
    pub lnf: Vec<f32>,
    pub meanf: Vec<f32>,
    pub rstdf: Vec<f32>,
    pub grads: Grads,
}

impl Buffers {
    pub fn new(n: usize, layers: usize, d: &Dims, checkpointing: bool) -> Self {
        let slots = if checkpointing { 1 } else { layers };
        Buffers {
            res: (0..=layers).map(|_| vec![0f32; n * d.hidden]).collect(),
            acts: (0..slots).map(|_| Acts::new(n, d)).collect(),
            lnf: vec![0f32; n * d.hidden],
            meanf: vec![0f32; n],
            rstdf: vec![0f32; n],
            grads: Grads::new(n, d),
        }
    }
}
