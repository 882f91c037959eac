//! Reads safetensors files one tensor at a time with plain file reads. A memory map would be
//! simpler, but every page it touches stays resident until it is unmapped, so loading a model
//! through one briefly holds the whole checkpoint twice (the mapped file and the f32 copy).

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, WithDType};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Mutex;

/// The JSON header safetensors allows (100 MB).
const MAX_HEADER: u64 = 100_000_000;

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute offset of the first byte in the file.
    start: u64,
}

pub struct TensorFiles {
    paths: Vec<PathBuf>,
    files: Vec<Mutex<File>>,
    entries: BTreeMap<String, Entry>,
}

fn dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

impl TensorFiles {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = vec![];
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let bad = |m: String| {
                Error::Weights(format!(
                    "{}: not a readable safetensors file: {m}",
                    path.display()
                ))
            };
            let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
            let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
            let mut n = [0u8; 8];
            f.read_exact(&mut n).map_err(|e| bad(e.to_string()))?;
            let n = u64::from_le_bytes(n);
            if n > MAX_HEADER || 8 + n > len {
                return Err(bad(format!(
                    "header length {n} does not fit the file ({len} bytes)"
                )));
            }
            let mut header = vec![0u8; n as usize];
            f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
            let Entries(header) =
                serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
            let mut seen = std::collections::BTreeSet::new();
            // (begin, end, name) of every tensor: together they must tile the data exactly, as
            // the reference reader requires, so a shifted header or overlapping tensors are refused.
            let mut spans = vec![];
            for (name, info) in header {
                if !seen.insert(name.clone()) {
                    return Err(bad(format!("tensor `{name}` appears twice in the header")));
                }
                if name == "__metadata__" {
                    continue;
                }
                let field = |k: &str| {
                    info.get(k)
                        .ok_or_else(|| bad(format!("tensor `{name}`: no `{k}`")))
                };
                let dt = field("dtype")?.as_str().and_then(dtype).ok_or_else(|| {
                    bad(format!(
                        "tensor `{name}`: unsupported dtype {}",
                        info["dtype"]
                    ))
                })?;
                let shape: Vec<usize> = serde_json::from_value(field("shape")?.clone())
                    .map_err(|e| bad(format!("tensor `{name}`: shape: {e}")))?;
                let (a, b): (u64, u64) = serde_json::from_value(field("data_offsets")?.clone())
                    .map_err(|e| bad(format!("tensor `{name}`: data_offsets: {e}")))?;
                let want = crate::limits::elem_count(&shape)
                    .and_then(|c| (c as u64).checked_mul(dt.size_in_bytes() as u64));
                let (start, end) = (8 + n + a.min(len), 8 + n + b.min(len));
                if b < a || Some(b - a) != want || b > len || end > len {
                    return Err(bad(format!(
                        "tensor `{name}`: bytes {a}..{b} do not hold {shape:?} {dt:?} within the file"
                    )));
                }
                if entries.contains_key(&name) {
                    return Err(bad(format!(
                        "tensor `{name}` is also in {}",
                        paths[entries[&name].file].display()
                    )));
                }
                spans.push((a, b, name.clone()));
                entries.insert(
                    name,
                    Entry {
                        file: i,
                        dtype: dt,
                        shape,
                        start,
                    },
                );
            }
            spans.sort();
            let mut at = 0;
            for (a, b, name) in &spans {
                if *a != at {
                    return Err(bad(format!(
                        "tensor `{name}` starts at byte {a} of the data, expected {at} (tensors must follow each other without gaps or overlaps)"
                    )));
                }
                at = *b;
            }
            if 8 + n + at != len {
                return Err(bad(format!(
                    "the tensors end at byte {} but the file has {len} (header length or offsets are wrong)",
                    8 + n + at
                )));
            }
            files.push(Mutex::new(f));
        }
        Ok(Self {
            paths: paths.to_vec(),
            files,
            entries,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    pub fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let Some(e) = self.entries.get(name) else {
            candle_core::bail!("no tensor `{name}`")
        };
        let mut f = self.files[e.file].lock().unwrap();
        f.seek(SeekFrom::Start(e.start))?;
        let read = |f: &mut File| -> candle_core::Result<Tensor> {
            match e.dtype {
                DType::F32 => read_tensor::<f32>(f, &e.shape, device),
                DType::F16 => read_tensor::<half::f16>(f, &e.shape, device),
                DType::BF16 => read_tensor::<half::bf16>(f, &e.shape, device),
                DType::F64 => read_tensor::<f64>(f, &e.shape, device),
                DType::I64 => read_tensor::<i64>(f, &e.shape, device),
                DType::U32 => read_tensor::<u32>(f, &e.shape, device),
                DType::U8 => read_tensor::<u8>(f, &e.shape, device),
                other => candle_core::bail!("unsupported dtype {other:?}"),
            }
        };
        read(&mut f).map_err(|err| {
            candle_core::Error::Msg(format!(
                "{}: tensor `{name}`: {err}",
                self.paths[e.file].display()
            ))
        })
    }
}

/// Reads the tensor's bytes straight into its element buffer (no byte buffer to copy from).
fn read_tensor<T: WithDType>(
    f: &mut File,
    shape: &[usize],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let n = shape.iter().product::<usize>();
    let mut v = vec![T::from_f64(0.0); n];
    // SAFETY: the element types here are plain numbers, valid for any bit pattern; safetensors
    // stores them little-endian, as candle's own loader assumes of the machine too.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>())
    };
    f.read_exact(bytes)?;
    Tensor::from_vec(v, shape, device)
}

/// A JSON object's entries in file order, duplicates kept (a map would silently keep the last).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut out = vec![];
                while let Some(kv) = m.next_entry()? {
                    out.push(kv);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_candle_writes_and_names_truncation() {
        let dir = std::env::temp_dir().join(format!("mc-reader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.safetensors");
        let a = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[7f64, 8.], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let map: std::collections::HashMap<String, Tensor> =
            [("a".to_string(), a.clone()), ("b".to_string(), b.clone())].into();
        candle_core::safetensors::save(&map, &path).unwrap();
        let r = TensorFiles::open(std::slice::from_ref(&path)).unwrap();
        assert_eq!(r.names().cloned().collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!(
            r.load("a", &Device::Cpu).unwrap().to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        let got = r.load("b", &Device::Cpu).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert_eq!(
            got.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap(),
            vec![7., 8.]
        );
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let e = TensorFiles::open(std::slice::from_ref(&path))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("m.safetensors") && e.contains("tensor `"), "{e}");

        // A header length one byte short (its padding space then read as data) shifts every
        // tensor by a byte; the reference reader refuses it, since the last offset no longer
        // meets the end of the file.
        let header = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} "#;
        let file = |n: usize| {
            let mut v = (n as u64).to_le_bytes().to_vec();
            v.extend_from_slice(header);
            v.extend_from_slice(&1f32.to_le_bytes());
            v
        };
        std::fs::write(&path, file(header.len())).unwrap();
        assert!(TensorFiles::open(std::slice::from_ref(&path)).is_ok());
        std::fs::write(&path, file(header.len() - 1)).unwrap();
        let e = TensorFiles::open(std::slice::from_ref(&path))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("m.safetensors") && e.contains("the file has"),
            "{e}"
        );

        // A tensor named twice: the reference reader refuses it, so do we.
        let header = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        let mut dup = (header.len() as u64).to_le_bytes().to_vec();
        dup.extend_from_slice(header);
        dup.extend_from_slice(&[0u8; 8]);
        std::fs::write(&path, &dup).unwrap();
        let e = TensorFiles::open(std::slice::from_ref(&path))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("appears twice"), "{e}");
        std::fs::remove_dir_all(dir).ok();
    }
}
