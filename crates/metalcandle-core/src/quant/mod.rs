//! Post-training quantization of the decoder's matrices (token embedding, every linear layer,
//! LM head) into candle's block formats, and back to float.

pub mod calibrate;
pub mod gguf;
mod gguf_layout;
pub mod qat;

pub use crate::weights::names::glob_match;

use crate::error::{Error, Result};
use crate::model::Decoder;
use crate::nn::{QuantizedMatrix, Weight};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Block formats by their llama.cpp names, fewest bits first within each family.
const FORMATS: &[(&str, GgmlDType)] = &[
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q8_0", GgmlDType::Q8_0),
    ("q2_k", GgmlDType::Q2K),
    ("q3_k", GgmlDType::Q3K),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
];

/// Every block format: (llama.cpp's name, storage bits per weight).
pub fn formats() -> impl Iterator<Item = (&'static str, f64)> {
    FORMATS.iter().map(|(n, d)| (*n, bits_per_weight(*d)))
}

pub fn parse_format(name: &str) -> Result<GgmlDType> {
    let lower = name.to_ascii_lowercase();
    FORMATS
        .iter()
        .find(|(n, _)| *n == lower)
        .map(|(_, d)| *d)
        .ok_or_else(|| {
            Error::Input(format!(
                "unknown quantization format \"{name}\" (expected one of: {})",
                FORMATS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

pub fn format_name(dtype: GgmlDType) -> &'static str {
    FORMATS
        .iter()
        .find(|(_, d)| *d == dtype)
        .map(|(n, _)| *n)
        .unwrap_or(match dtype {
            GgmlDType::F16 => "f16",
            GgmlDType::BF16 => "bf16",
            _ => "f32",
        })
}

/// Storage bits per weight, block scales included (q8_0: 34 bytes per 32 weights = 8.5).
pub fn bits_per_weight(dtype: GgmlDType) -> f64 {
    (dtype.type_size() * 8) as f64 / dtype.block_size() as f64
}

/// Why a matrix cannot take `dtype`, if it cannot: rows are quantized in blocks along the
/// input dimension.
pub fn unsupported_reason(dims: &[usize], dtype: GgmlDType) -> Option<String> {
    let k = *dims.last()?;
    let block = dtype.block_size();
    (k % block != 0).then(|| {
        format!(
            "input size {k} is not a multiple of {}'s block size {block}",
            format_name(dtype)
        )
    })
}

/// The blocks of `t` in `dtype`, rounded from its float32 values.
pub fn quantize_matrix(t: &Tensor, dtype: GgmlDType) -> Result<QTensor> {
    Ok(QTensor::quantize(
        &t.to_dtype(DType::F32)?.contiguous()?,
        dtype,
    )?)
}

/// The format `choose` gives the float matrix `name`, if its shape takes it; the choice, or why
/// the matrix stays float, goes into `report`.
fn select(
    name: &str,
    t: &Tensor,
    choose: &dyn Fn(&str) -> Option<GgmlDType>,
    report: &mut QuantReport,
) -> Option<GgmlDType> {
    let Some(dtype) = choose(name) else {
        report.kept_float.insert(name.into(), "not selected".into());
        return None;
    };
    if let Some(why) = unsupported_reason(t.dims(), dtype) {
        report.kept_float.insert(name.into(), why);
        return None;
    }
    report
        .quantized
        .insert(name.into(), format_name(dtype).into());
    Some(dtype)
}

/// What `Decoder::quantize` did to each matrix.
#[derive(Debug, Default, serde::Serialize)]
pub struct QuantReport {
    pub quantized: BTreeMap<String, String>,
    pub kept_float: BTreeMap<String, String>,
}

/// One matrix's state, for `quantization_info`.
#[derive(Debug, serde::Serialize)]
pub struct LayerInfo {
    pub format: String,
    pub bits_per_weight: f64,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

#[derive(Debug, serde::Serialize)]
pub struct QuantInfo {
    pub quantized: bool,
    pub layers: BTreeMap<String, LayerInfo>,
    pub float_layers: Vec<String>,
    pub quantized_bytes: usize,
    pub float_bytes: usize,
}

impl Decoder {
    pub fn quantized_weights(&self) -> Vec<(String, &Weight)> {
        self.matrices()
            .into_iter()
            .filter(|(_, w)| w.quant_format().is_some())
            .collect()
    }

    pub fn is_quantized(&self) -> bool {
        !self.quantized_weights().is_empty()
    }

    /// Quantizes each matrix to the format `choose` gives for its module name (None keeps it
    /// float). Matrices already quantized are left alone; shapes a format cannot take stay float
    /// and are reported, not failed. A weight that was being trained in full may be quantized
    /// when training is done (QAT's last step): a later full training step is then refused by
    /// `make_trainable`, so an optimizer never updates a variable the model no longer reads.
    pub fn quantize(&mut self, choose: &dyn Fn(&str) -> Option<GgmlDType>) -> Result<QuantReport> {
        let mut report = QuantReport::default();
        for (name, w) in self.quantizable_mut() {
            let t = match &*w {
                Weight::Quantized(q) => {
                    report.quantized.insert(name, format_name(q.dtype()).into());
                    continue;
                }
                Weight::Float(t) => t,
            };
            let Some(dtype) = select(&name, t, choose, &mut report) else {
                continue;
            };
            *w = Weight::Quantized(Arc::new(QuantizedMatrix::new(quantize_matrix(t, dtype)?)?));
        }
        // The formats QAT rounded to are now the stored ones.
        self.qat = None;
        Ok(report)
    }

    /// Every quantized matrix back to float32 (the values the quantized format holds).
    pub fn dequantize(&mut self) -> Result<()> {
        for (_, w) in self.quantizable_mut() {
            if let Weight::Quantized(_) = w {
                *w = Weight::Float(w.to_float()?);
            }
        }
        Ok(())
    }

    pub fn quantization_info(&self) -> QuantInfo {
        let mut info = QuantInfo {
            quantized: false,
            layers: BTreeMap::new(),
            float_layers: vec![],
            quantized_bytes: 0,
            float_bytes: 0,
        };
        for (name, w) in self.matrices() {
            match w {
                Weight::Quantized(q) => {
                    let bytes = q.storage_size_in_bytes();
                    info.quantized_bytes += bytes;
                    info.layers.insert(
                        name,
                        LayerInfo {
                            format: format_name(q.dtype()).into(),
                            bits_per_weight: bits_per_weight(q.dtype()),
                            shape: q.shape().dims().to_vec(),
                            bytes,
                        },
                    );
                }
                Weight::Float(t) => {
                    info.float_bytes += t.elem_count() * t.dtype().size_in_bytes();
                    info.float_layers.push(name);
                }
            }
        }
        info.quantized = !info.layers.is_empty();
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_abs_diff;
    use crate::testing::quantizable_llama;
    use candle_core::{Device, Tensor};

    #[test]
    fn bits() {
        assert_eq!(bits_per_weight(GgmlDType::Q8_0), 8.5);
        assert_eq!(bits_per_weight(GgmlDType::Q4_0), 4.5);
    }

    #[test]
    fn quantize_reports_unsupported_shapes_and_round_trips_to_float() {
        // down_proj's input is the intermediate size 96: q8_0 (block 32) takes it, q4_k
        // (block 256) takes nothing here.
        let mut m = quantizable_llama(true, 0);
        let ids = Tensor::new(&[[1u32, 5, 9, 2]], &Device::Cpu).unwrap();
        let before = m.forward(&ids, &Default::default(), None).unwrap().0;
        let r = m.quantize(&|_| Some(GgmlDType::Q4K)).unwrap();
        assert!(r.quantized.is_empty());
        assert_eq!(r.kept_float.len(), 1 + 2 * 7);
        assert!(r.kept_float["model.embed_tokens"].contains("block size 256"));

        let r = m.quantize(&|_| Some(GgmlDType::Q8_0)).unwrap();
        assert_eq!(r.quantized.len(), 1 + 2 * 7);
        assert!(m.is_quantized());
        let info = m.quantization_info();
        assert_eq!(
            info.layers["model.layers.0.mlp.down_proj"].shape,
            vec![64, 96]
        );
        assert_eq!(
            info.layers["model.layers.0.mlp.down_proj"].bytes,
            64 * 96 / 32 * 34
        );
        let q = m.forward(&ids, &Default::default(), None).unwrap().0;
        m.dequantize().unwrap();
        assert!(!m.is_quantized());
        let d = m.forward(&ids, &Default::default(), None).unwrap().0;
        let scale = max_abs_diff(&before, &before.zeros_like().unwrap());
        let diff = max_abs_diff;
        // 8-bit weights move the logits by about 1% of their range; the dequantized model
        // holds those same rounded weights, so it sits as close to the quantized one.
        assert!(
            diff(&before, &q) < 0.05 * scale,
            "{} vs {scale}",
            diff(&before, &q)
        );
        assert!(diff(&d, &q) < 0.05 * scale);
        assert!(diff(&before, &q) > 0.0);
    }

    #[test]
    fn quantized_models_refuse_full_training_merges_and_safetensors() {
        let mut m = quantizable_llama(true, 0);
        // Trained in full, then quantized: the next full step must be refused.
        m.make_trainable().unwrap();
        m.quantize(&|_| Some(GgmlDType::Q8_0)).unwrap();
        assert!(m.matrices().iter().all(|(_, w)| w.quant_format().is_some()));
        let e = m.make_trainable().unwrap_err().to_string();
        assert!(e.contains("quantized"), "{e}");
        let dir = std::env::temp_dir().join(format!("mc-q-{}", std::process::id()));
        let e = crate::weights::save_hf_folder(&m, &dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("quantized"), "{e}");
    }
}
