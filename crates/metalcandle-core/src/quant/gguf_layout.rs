//! The checks a GGUF file's tensor table must pass before any tensor is read: candle's reader
//! takes each tensor's offset and type on trust, so an unaligned tensor, one overlapping
//! another, or one whose type was swapped for a smaller one would load and give garbage.

use crate::error::{Error, Result};
use crate::limits::elem_count;
use candle_core::quantized::gguf_file::{Content, Value, DEFAULT_ALIGNMENT};
use std::path::Path;

/// The alignment candle's reader used for this file (`general.alignment`, else 32).
fn alignment(c: &Content) -> u64 {
    match c.metadata.get("general.alignment") {
        Some(Value::U8(v)) => *v as u64,
        Some(Value::U16(v)) => *v as u64,
        Some(Value::U32(v)) => *v as u64,
        Some(Value::I8(v)) if *v >= 0 => *v as u64,
        Some(Value::I16(v)) if *v >= 0 => *v as u64,
        Some(Value::I32(v)) if *v >= 0 => *v as u64,
        _ => DEFAULT_ALIGNMENT,
    }
}

/// Every tensor aligned, of a whole number of blocks, inside the file, and the tensors laid out
/// one after another (gaps only as alignment padding), as llama.cpp and candle write them.
pub fn check_layout(c: &Content, file_len: u64, path: &Path) -> Result<()> {
    let bad =
        |m: String| Error::Weights(format!("{}: not a readable GGUF file: {m}", path.display()));
    let align = alignment(c);
    let data_len = file_len
        .checked_sub(c.tensor_data_offset)
        .ok_or_else(|| bad("the tensor data starts after the end of the file".into()))?;
    let mut spans = vec![];
    for (name, t) in &c.tensor_infos {
        let (bs, ts) = (t.ggml_dtype.block_size(), t.ggml_dtype.type_size());
        let elems = elem_count(t.shape.dims()).ok_or_else(|| {
            bad(format!(
                "tensor `{name}`: shape {:?} overflows",
                t.shape.dims()
            ))
        })?;
        if elems % bs != 0 {
            return Err(bad(format!(
                "tensor `{name}`: {elems} elements is not a whole number of {:?} blocks of {bs}",
                t.ggml_dtype
            )));
        }
        let bytes = ((elems / bs) as u64).checked_mul(ts as u64);
        let end = bytes.and_then(|b| t.offset.checked_add(b));
        match end {
            Some(end) if end <= data_len => {}
            _ => {
                return Err(bad(format!(
                    "tensor `{name}` ({:?} {:?} at offset {}) does not fit in the file's {data_len} data bytes",
                    t.ggml_dtype,
                    t.shape.dims(),
                    t.offset
                )))
            }
        }
        if t.offset % align != 0 {
            return Err(bad(format!(
                "tensor `{name}`: offset {} is not a multiple of the alignment {align}",
                t.offset
            )));
        }
        spans.push((t.offset, end.unwrap_or(0), name));
    }
    spans.sort();
    let mut at = 0u64;
    for (start, end, name) in &spans {
        if *start < at {
            return Err(bad(format!(
                "tensor `{name}` overlaps the tensor before it"
            )));
        }
        if *start - at >= align {
            return Err(bad(format!(
                "{} unused bytes before tensor `{name}`: the tensor before it is shorter than its \
                 type and shape say (a wrong type?)",
                start - at
            )));
        }
        at = *end;
    }
    if !spans.is_empty() && data_len - at >= align {
        return Err(bad(format!(
            "{} bytes after the last tensor: a tensor is shorter than its type and shape say (a wrong type?)",
            data_len - at
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{TensorInfo, VersionedMagic};
    use candle_core::quantized::GgmlDType;
    use std::collections::HashMap;

    fn content(tensors: &[(&str, GgmlDType, u64)]) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: HashMap::new(),
            tensor_infos: tensors
                .iter()
                .map(|&(n, t, offset)| {
                    let info = TensorInfo {
                        ggml_dtype: t,
                        shape: candle_core::Shape::from(vec![64]),
                        offset,
                    };
                    (n.to_string(), info)
                })
                .collect(),
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn unaligned_overlapping_and_shrunk_tensors_are_refused() {
        let p = Path::new("m.gguf");
        // Two f32 [64] tensors, 256 bytes each, back to back.
        let ok = content(&[("a", GgmlDType::F32, 0), ("b", GgmlDType::F32, 256)]);
        check_layout(&ok, 512, p).unwrap();
        let e = |c: Content| check_layout(&c, 512, p).unwrap_err().to_string();
        let unaligned = e(content(&[
            ("a", GgmlDType::F32, 0),
            ("b", GgmlDType::F32, 250),
        ]));
        assert!(
            unaligned.contains("m.gguf") && unaligned.contains("alignment"),
            "{unaligned}"
        );
        let overlap = e(content(&[
            ("a", GgmlDType::F32, 0),
            ("b", GgmlDType::F32, 224),
        ]));
        assert!(overlap.contains("overlaps"), "{overlap}");
        let shrunk = e(content(&[
            ("a", GgmlDType::F16, 0),
            ("b", GgmlDType::F32, 256),
        ]));
        assert!(shrunk.contains("wrong type"), "{shrunk}");
        let outside = e(content(&[
            ("a", GgmlDType::F32, 0),
            ("b", GgmlDType::F32, 512),
        ]));
        assert!(outside.contains("does not fit"), "{outside}");
    }
}
