//! Calibration for mixed-precision quantization: record what each matrix sees on sample
//! batches, then pick per matrix the cheapest format whose output error on those inputs
//! stays under a bound. Errors are measured with the quantized kernel itself, so they include
//! the 8-bit rounding of the activations that the kernel applies at inference.

use super::{format_name, quantize_matrix, unsupported_reason};
use crate::error::Result;
use crate::model::{Decoder, ForwardOptions};
use crate::nn::Weight;
use crate::ops;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Rows kept per matrix for measuring errors: enough for a stable Frobenius ratio, few enough
/// that a 0.5B model's calibration stays in the low hundreds of MB.
const MAX_ROWS: usize = 128;

/// Input statistics of one linear layer over the calibration batches.
#[derive(Debug, Default)]
pub struct InputStats {
    pub rows: usize,
    pub absmax: f32,
    sum_sq: f64,
    width: usize,
    /// Up to MAX_ROWS input rows, spread over the batches seen.
    sample: Vec<f32>,
}

/// Shared by a linear layer while calibration runs.
pub type Observer = Arc<Mutex<InputStats>>;

impl InputStats {
    /// Records `x` [.., in]. Each call keeps evenly spaced rows, at most its share of what is
    /// left, so later batches still contribute.
    pub fn record(&mut self, x: &Tensor) -> Result<()> {
        let width = *x.dims().last().unwrap_or(&0);
        let rows = x.elem_count() / width.max(1);
        let flat = x
            .detach()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        self.width = width;
        self.rows += rows;
        for v in &flat {
            self.absmax = self.absmax.max(v.abs());
            self.sum_sq += (*v as f64) * (*v as f64);
        }
        let room = MAX_ROWS - self.sample.len() / width.max(1);
        let take = room.min(rows).min(MAX_ROWS / 4);
        for i in 0..take {
            let r = i * rows / take;
            self.sample
                .extend_from_slice(&flat[r * width..(r + 1) * width]);
        }
        Ok(())
    }

    pub fn rms(&self) -> f64 {
        (self.sum_sq / (self.rows * self.width).max(1) as f64).sqrt()
    }

    fn sample(&self, dev: &Device) -> Result<Option<Tensor>> {
        if self.sample.is_empty() {
            return Ok(None);
        }
        let n = self.sample.len() / self.width;
        Ok(Some(Tensor::from_vec(
            self.sample.clone(),
            (n, self.width),
            dev,
        )?))
    }
}

#[derive(Debug, serde::Serialize)]
pub struct LayerCalibration {
    pub rows: usize,
    pub input_absmax: f32,
    pub input_rms: f64,
    /// Relative output error ||XW^T - XQ(W)^T|| / ||XW^T|| per candidate format (for a
    /// lookup-only embedding, the relative error of the table itself); None where the format
    /// cannot take the shape.
    pub errors: BTreeMap<String, Option<f64>>,
    /// The chosen format, or "f32" when no candidate can take the shape.
    pub format: String,
}

fn relative_error(w: &Tensor, x: Option<&Tensor>, dtype: GgmlDType) -> Result<f64> {
    let q = Arc::new(crate::nn::QuantizedMatrix::new(quantize_matrix(w, dtype)?)?);
    match x {
        Some(x) => {
            let want = ops::linear(x, w)?;
            let got = ops::quantized_linear(x, &q)?;
            Ok(ops::frobenius(&(got - &want)?)? / ops::frobenius(&want)?.max(f64::MIN_POSITIVE))
        }
        None => {
            let got = q.dequantize(w.device())?;
            Ok(ops::frobenius(&(got - w)?)? / ops::frobenius(w)?.max(f64::MIN_POSITIVE))
        }
    }
}

impl Decoder {
    /// Runs `batches` (u32 ids [B, T]) through the model, recording each matrix's inputs, and
    /// measures every candidate format's error on them. Picks, per matrix, the candidate with
    /// the fewest bits whose error is at most `tolerance`, else the most precise candidate.
    pub fn calibrate(
        &mut self,
        batches: &[Tensor],
        candidates: &[GgmlDType],
        tolerance: f64,
    ) -> Result<BTreeMap<String, LayerCalibration>> {
        let head_name = match &self.lm_head {
            Some(h) => h.name.clone(),
            None => self.embed.name.clone(),
        };
        let head = Observer::default();
        let mut observers: BTreeMap<String, Observer> = BTreeMap::new();
        for l in self.linears_mut() {
            let o = Observer::default();
            l.observer = Some(o.clone());
            observers.insert(l.name.clone(), o);
        }
        let run = |m: &Decoder| -> Result<()> {
            let view = m.detached();
            for ids in batches {
                let out = view.forward_hidden(ids, &ForwardOptions::default(), None)?;
                head.lock().unwrap().record(&out.last_hidden)?;
            }
            Ok(())
        };
        let ran = run(self);
        for l in self.linears_mut() {
            l.observer = None;
        }
        ran?;
        observers.insert(head_name, head);

        let mut by_bits = candidates.to_vec();
        by_bits.sort_by(|a, b| super::bits_per_weight(*a).total_cmp(&super::bits_per_weight(*b)));
        let mut out = BTreeMap::new();
        for (name, w) in self.matrices() {
            let Weight::Float(w) = w else { continue };
            let w = w.detach();
            let stats = observers.get(&name).map(|o| o.lock().unwrap());
            let x = match &stats {
                Some(s) => s.sample(w.device())?,
                None => None,
            };
            let mut errors = BTreeMap::new();
            let mut chosen: Option<GgmlDType> = None;
            let mut best_fallback: Option<GgmlDType> = None;
            for &dtype in &by_bits {
                if unsupported_reason(w.dims(), dtype).is_some() {
                    errors.insert(format_name(dtype).to_string(), None);
                    continue;
                }
                let e = relative_error(&w, x.as_ref(), dtype)?;
                errors.insert(format_name(dtype).to_string(), Some(e));
                if chosen.is_none() && e <= tolerance {
                    chosen = Some(dtype);
                }
                best_fallback = Some(dtype);
            }
            let format = chosen
                .or(best_fallback)
                .map(format_name)
                .unwrap_or("f32")
                .to_string();
            let (rows, absmax, rms) = stats
                .as_ref()
                .map(|s| (s.rows, s.absmax, s.rms()))
                .unwrap_or((0, 0.0, 0.0));
            out.insert(
                name,
                LayerCalibration {
                    rows,
                    input_absmax: absmax,
                    input_rms: rms,
                    errors,
                    format,
                },
            );
        }
        Ok(out)
    }
}
