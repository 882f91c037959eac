//! q4_0 and q8_0 weights [n, k] in the layout the integer kernels read (quantized_gemm.rs):
//! the same blocks as ggml's, regrouped so that eight weight rows sit in the eight 32-bit lanes
//! of one 256-bit register.
//!
//! Rows go in groups of eight (the last group padded with zero rows). For each group and each
//! block index b, the eight rows' block b is stored as `QB / 4` 32-byte chunks: chunk i holds
//! bytes 4i..4i+4 of row 0's quantized values, then of row 1's, ..., row 7's. One load gives
//! each lane four bytes of its own row, which one `vpdpbusd` against four broadcast activation
//! bytes turns into that row's partial dot product; after the block, lane j holds row j's whole
//! block product, and one conversion and one FMA with the eight rows' scales (stored apart,
//! contiguous per group and block, still f16) apply them all. In ggml's layout, with one row's
//! blocks back to back, each block needed its own horizontal sum and scale: 18 instructions
//! per 32 weights against about 4 here, which is what held decoding below the memory read
//! rate.
//!
//! The bytes and scales are ggml's own, moved: unpacking gives back the original blocks
//! exactly, so writing a GGUF file or dequantizing loses nothing.

use candle_core::quantized::GgmlDType;
use candle_core::Result;

/// Values per block.
pub(crate) const QK: usize = 32;
/// Weight rows per group: one per 32-bit lane of a 256-bit register.
pub(crate) const LANES: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Format {
    /// f16 scale, then 16 bytes of two 4-bit values each: byte p holds element p in its low
    /// nibble and element p + 16 in its high one, both stored as q + 8.
    Q4_0,
    /// f16 scale, then 32 signed bytes.
    Q8_0,
}

impl Format {
    pub(crate) fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Format::Q4_0),
            GgmlDType::Q8_0 => Some(Format::Q8_0),
            _ => None,
        }
    }

    pub(crate) fn dtype(self) -> GgmlDType {
        match self {
            Format::Q4_0 => GgmlDType::Q4_0,
            Format::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// Bytes of quantized values per block (after the 2-byte scale in ggml's block).
    pub(crate) fn value_bytes(self) -> usize {
        match self {
            Format::Q4_0 => QK / 2,
            Format::Q8_0 => QK,
        }
    }

    fn block_bytes(self) -> usize {
        2 + self.value_bytes()
    }
}

pub(crate) struct Interleaved {
    pub(crate) format: Format,
    pub(crate) n: usize,
    pub(crate) k: usize,
    /// Per group and block, `LANES * value_bytes` bytes in 4-byte chunks by lane.
    pub(crate) qs: Vec<u8>,
    /// Per group and block, the `LANES` rows' f16 scales.
    pub(crate) d: Vec<u16>,
}

impl Interleaved {
    pub(crate) fn blocks(&self) -> usize {
        self.k / QK
    }

    pub(crate) fn groups(&self) -> usize {
        self.n.div_ceil(LANES)
    }

    /// Bytes of one group's block b (all eight rows' values).
    pub(crate) fn chunk_bytes(&self) -> usize {
        LANES * self.format.value_bytes()
    }

    pub(crate) fn storage_bytes(&self) -> usize {
        self.qs.len() + 2 * self.d.len()
    }

    /// From ggml's blocks of an [n, k] matrix.
    pub(crate) fn pack(format: Format, n: usize, k: usize, data: &[u8]) -> Result<Self> {
        let bb = format.block_bytes();
        if !k.is_multiple_of(QK) || data.len() != n * (k / QK) * bb {
            candle_core::bail!(
                "{:?} weight of shape [{n}, {k}] holds {} bytes, expected {} in blocks of {QK}",
                format.dtype(),
                data.len(),
                n * (k / QK) * bb
            );
        }
        let mut il = Interleaved {
            format,
            n,
            k,
            qs: vec![],
            d: vec![],
        };
        let blocks = il.blocks();
        il.qs = vec![0u8; il.groups() * blocks * il.chunk_bytes()];
        il.d = vec![0u16; il.groups() * blocks * LANES];
        for (r, row) in data.chunks_exact(blocks * bb).enumerate() {
            for (b, block) in row.chunks_exact(bb).enumerate() {
                let (scale, at) = il.place(r, b);
                il.d[scale] = u16::from_le_bytes([block[0], block[1]]);
                for (i, four) in block[2..].chunks_exact(4).enumerate() {
                    il.qs[at + i * 4 * LANES..][..4].copy_from_slice(four);
                }
            }
        }
        Ok(il)
    }

    /// ggml's blocks again, row after row.
    pub(crate) fn unpack(&self) -> Vec<u8> {
        let bb = self.format.block_bytes();
        let mut data = vec![0u8; self.n * self.blocks() * bb];
        for (r, row) in data.chunks_exact_mut(self.blocks() * bb).enumerate() {
            for (b, block) in row.chunks_exact_mut(bb).enumerate() {
                let (scale, at) = self.place(r, b);
                block[..2].copy_from_slice(&self.d[scale].to_le_bytes());
                for (i, four) in block[2..].chunks_exact_mut(4).enumerate() {
                    four.copy_from_slice(&self.qs[at + i * 4 * LANES..][..4]);
                }
            }
        }
        data
    }

    /// Row r in float32 into `out` (k values): exactly ggml's dequantization.
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (b, out) in out.chunks_exact_mut(QK).enumerate() {
            let (scale, at) = self.place(r, b);
            let d = half::f16::from_bits(self.d[scale]).to_f32();
            let byte = |p: usize| self.qs[at + (p / 4) * 4 * LANES + p % 4];
            match self.format {
                Format::Q4_0 => {
                    for p in 0..QK / 2 {
                        out[p] = ((byte(p) & 0x0F) as i32 - 8) as f32 * d;
                        out[p + QK / 2] = ((byte(p) >> 4) as i32 - 8) as f32 * d;
                    }
                }
                Format::Q8_0 => {
                    for (p, o) in out.iter_mut().enumerate() {
                        *o = byte(p) as i8 as f32 * d;
                    }
                }
            }
        }
    }

    /// Where row r's block b lives: the index of its scale in `d`, and of its first 4-byte
    /// chunk in `qs`.
    fn place(&self, r: usize, b: usize) -> (usize, usize) {
        let (g, j) = (r / LANES, r % LANES);
        let at = (g * self.blocks() + b) * self.chunk_bytes();
        ((g * self.blocks() + b) * LANES + j, at + 4 * j)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::rand_tensor;
    use candle_core::quantized::QTensor;
    use candle_core::{DType, Device};

    /// 37 rows: four whole groups and one padded with three rows.
    #[test]
    fn unpacks_to_the_same_blocks_and_dequantizes_as_ggml_does() {
        for format in [Format::Q4_0, Format::Q8_0] {
            let w = rand_tensor(&[37, 96], 1).to_dtype(DType::F32).unwrap();
            let q = QTensor::quantize(&w, format.dtype()).unwrap();
            let data = q.data().unwrap();
            let il = Interleaved::pack(format, 37, 96, &data).unwrap();
            assert_eq!(il.unpack(), &*data, "{format:?}");
            let want = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let mut row = vec![0f32; 96];
            for (r, want) in want.iter().enumerate() {
                il.dequantize_row(r, &mut row);
                assert_eq!(&row, want, "{format:?} row {r}");
            }
        }
    }

    #[test]
    fn a_wrong_byte_count_is_an_error() {
        let err = Interleaved::pack(Format::Q4_0, 2, 64, &[0u8; 71])
            .err()
            .expect("rejected")
            .to_string();
        assert!(err.contains("expected 72"), "{err}");
    }
}
