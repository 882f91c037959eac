//! A GGUF file's header, read with every count and length checked against the file before
//! anything is allocated for it, and the checks its tensor table must pass before any tensor is
//! read: a tensor's offset and type are otherwise taken on trust, so an unaligned tensor, one
//! overlapping another, or one whose type was swapped for a smaller one would load and give
//! garbage.
//!
//! candle's header parser is not used: it divides by `general.alignment` unchecked (a 0 panics)
//! and keeps the last of two tensors or keys of the same name, hiding the first from the checks.

use crate::error::{Error, Result};
use crate::limits::elem_count;
use candle_core::quantized::gguf_file::{
    Content, TensorInfo, Value, VersionedMagic, DEFAULT_ALIGNMENT,
};
use candle_core::quantized::GgmlDType;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// llama.cpp's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays nest at most this deep, so a crafted chain cannot exhaust the stack.
const MAX_DEPTH: usize = 64;

fn bad(path: &Path, m: impl std::fmt::Display) -> Error {
    Error::Weights(format!("{}: not a readable GGUF file: {m}", path.display()))
}

/// ggml's type ids (ggml.h), those candle can hold.
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// The header read front to back; `at` is the offset of the next byte.
struct Header<'a, R> {
    r: R,
    path: &'a Path,
    at: u64,
    len: u64,
    /// Version 1 stores lengths and dimensions as u32, later versions as u64.
    v1: bool,
}

impl<R: Read> Header<'_, R> {
    fn left(&self) -> u64 {
        self.len.saturating_sub(self.at)
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        if buf.len() as u64 > self.left() {
            return Err(bad(
                self.path,
                format!("the file ends inside {what} (at byte {})", self.at),
            ));
        }
        self.r
            .read_exact(buf)
            .map_err(|e| Error::io(self.path, e))?;
        self.at += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.fill(&mut b, what)?;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn length(&mut self, what: &str) -> Result<u64> {
        if self.v1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.length(what)?;
        if n > self.left() {
            return Err(bad(
                self.path,
                format!("{what}: a string of {n} bytes runs past the end of the file"),
            ));
        }
        let mut v = vec![0u8; n as usize];
        self.fill(&mut v, what)?;
        // Strings are meant to be unterminated; some writers add a NUL anyway (candle drops it).
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    /// The fewest bytes a value of type `ty` takes in the file, None for an unknown type.
    fn min_size(&self, ty: u32) -> Option<u64> {
        let prefix = if self.v1 { 4 } else { 8 };
        Some(match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 => prefix,
            9 => 4 + prefix,
            10..=12 => 8,
            _ => return None,
        })
    }

    fn value(&mut self, ty: u32, depth: usize, what: &str) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(bad(self.path, format!("{what}: {b} is not a boolean"))),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(bad(
                        self.path,
                        format!("{what}: arrays nested more than {MAX_DEPTH} deep"),
                    ));
                }
                let elem = self.u32(what)?;
                let min = self.min_size(elem).ok_or_else(|| {
                    bad(
                        self.path,
                        format!("{what}: unknown array element type {elem}"),
                    )
                })?;
                let n = self.length(what)?;
                if n.saturating_mul(min) > self.left() {
                    return Err(bad(
                        self.path,
                        format!("{what}: an array of {n} elements runs past the end of the file"),
                    ));
                }
                let mut items = Vec::new();
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1, what)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            _ => return Err(bad(self.path, format!("{what}: unknown value type {ty}"))),
        })
    }
}

/// `general.alignment` (32 without it): a power of two, as llama.cpp requires.
fn alignment(md: &HashMap<String, Value>, path: &Path) -> Result<u64> {
    let Some(v) = md.get("general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let n = match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    };
    match n {
        Some(a) if a.is_power_of_two() => Ok(a),
        _ => Err(Error::config(
            path.display().to_string(),
            "general.alignment",
            format!("must be a power of two, got {v:?}"),
        )),
    }
}

/// Reads the header (metadata and tensor table) of the GGUF file `f` and checks its tensor
/// layout, reading none of the tensors.
pub fn read_content(f: &mut File, path: &Path) -> Result<Content> {
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    f.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
    let mut h = Header {
        r: BufReader::new(&mut *f),
        path,
        at: 0,
        len,
        v1: false,
    };
    match h.u32("the magic number")? {
        0x4655_4747 => {}
        0x4747_5546 => return Err(bad(path, "big-endian GGUF files are not supported")),
        m => return Err(bad(path, format!("no GGUF magic number (0x{m:08x})"))),
    }
    let magic = match h.u32("the version")? {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => return Err(bad(path, format!("unsupported GGUF version {v}"))),
    };
    h.v1 = magic == VersionedMagic::GgufV1;
    let n_tensors = h.length("the tensor count")?;
    let n_kv = h.length("the metadata count")?;
    // The least a key-value pair (empty key, type, one byte) and a tensor entry (empty name,
    // dimension count, type, offset) take: counts the file cannot hold are refused up front.
    let prefix = if h.v1 { 4 } else { 8 };
    let needed = n_kv
        .saturating_mul(prefix + 4 + 1)
        .saturating_add(n_tensors.saturating_mul(prefix + 4 + 4 + 8));
    if needed > h.left() {
        return Err(bad(
            path,
            format!(
                "{n_tensors} tensors and {n_kv} metadata entries need at least {needed} bytes, \
                 the file has {} after its counts",
                h.left()
            ),
        ));
    }
    let mut metadata = HashMap::new();
    for _ in 0..n_kv {
        let key = h.string("a metadata key")?;
        let what = format!("metadata `{key}`");
        let ty = h.u32(&what)?;
        let value = h.value(ty, 0, &what)?;
        if metadata.insert(key, value).is_some() {
            return Err(bad(path, format!("{what} appears twice")));
        }
    }
    let mut tensor_infos = HashMap::new();
    for _ in 0..n_tensors {
        let name = h.string("a tensor name")?;
        let what = format!("tensor `{name}`");
        let n_dims = h.u32(&what)?;
        if n_dims > MAX_DIMS {
            return Err(bad(
                path,
                format!("{what}: {n_dims} dimensions, more than {MAX_DIMS}"),
            ));
        }
        let mut dims = vec![];
        for _ in 0..n_dims {
            let d = h.length(&what)?;
            dims.push(usize::try_from(d).map_err(|_| bad(path, format!("{what}: dimension {d}")))?);
        }
        // GGUF lists the fastest-varying dimension first.
        dims.reverse();
        let id = h.u32(&what)?;
        let ggml_dtype =
            ggml_dtype(id).ok_or_else(|| bad(path, format!("{what}: unknown type {id}")))?;
        let offset = h.u64(&what)?;
        let info = TensorInfo {
            ggml_dtype,
            shape: candle_core::Shape::from(dims),
            offset,
        };
        if tensor_infos.insert(name, info).is_some() {
            return Err(bad(path, format!("{what} appears twice")));
        }
    }
    let align = alignment(&metadata, path)?;
    let tensor_data_offset =
        h.at.div_ceil(align)
            .checked_mul(align)
            .ok_or_else(|| bad(path, format!("alignment {align} overflows")))?;
    let c = Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset,
    };
    let padding = check_layout(&c, len, path)?;
    check_padding(f, &c, &padding, path)?;
    Ok(c)
}

/// Bytes `from..to` of the data section, after tensor `after`: alignment padding.
#[derive(Debug)]
pub struct Padding<'a> {
    from: u64,
    to: u64,
    after: &'a str,
}

/// Every tensor aligned, of a whole number of blocks, inside the file, and the tensors laid
/// out one after another, each padded to the alignment, as llama.cpp and candle write them.
/// Returns the padding between and after the tensors, for `check_padding`.
pub fn check_layout<'a>(c: &'a Content, file_len: u64, path: &Path) -> Result<Vec<Padding<'a>>> {
    let bad = |m: String| bad(path, m);
    let align = alignment(&c.metadata, path)?;
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
        let end = match end {
            Some(end) if end <= data_len => end,
            _ => {
                return Err(bad(format!(
                    "tensor `{name}` ({:?} {:?} at offset {}) does not fit in the file's {data_len} data bytes",
                    t.ggml_dtype,
                    t.shape.dims(),
                    t.offset
                )))
            }
        };
        if t.offset % align != 0 {
            return Err(bad(format!(
                "tensor `{name}`: offset {} is not a multiple of the alignment {align}",
                t.offset
            )));
        }
        spans.push((t.offset, end, name.as_str()));
    }
    spans.sort();
    // Each tensor starts where the one before it ends, rounded up to the alignment: a gap of a
    // whole alignment unit or more is a tensor shorter than its type and shape say.
    let padded = |end: u64| end.div_ceil(align).saturating_mul(align);
    let mut padding = vec![];
    let mut at = 0u64;
    let mut before = None;
    for &(start, end, name) in &spans {
        if start < at {
            return Err(bad(format!(
                "tensor `{name}` overlaps the tensor before it"
            )));
        }
        if start != padded(at) {
            return Err(bad(format!(
                "{} unused bytes before tensor `{name}`: the tensor before it is shorter than its \
                 type and shape say (a wrong type?)",
                start - at
            )));
        }
        if let Some(after) = before {
            padding.push(Padding {
                from: at,
                to: start,
                after,
            });
        }
        at = end;
        before = Some(name);
    }
    // The last tensor is padded too (llama.cpp, its Python writer and candle all pad it), or
    // ends the file: any other end is a wrong type or trailing bytes.
    if let Some(after) = before {
        if data_len != at && data_len != padded(at) {
            return Err(bad(format!(
                "{} bytes after the last tensor `{after}`, where {} or none were expected: a \
                 tensor is shorter than its type and shape say (a wrong type?), or the file has \
                 trailing bytes",
                data_len - at,
                padded(at) - at
            )));
        }
        padding.push(Padding {
            from: at,
            to: data_len,
            after,
        });
    }
    Ok(padding)
}

/// The padding is zeros, as every writer leaves it: a type swapped for one less than an
/// alignment unit smaller keeps every offset where it was, and only the real tensor's last
/// bytes, now read as padding, give it away.
fn check_padding(f: &mut File, c: &Content, padding: &[Padding], path: &Path) -> Result<()> {
    let mut buf = [0u8; 4096];
    for p in padding {
        let mut left = p.to - p.from;
        f.seek(SeekFrom::Start(c.tensor_data_offset + p.from))
            .map_err(|e| Error::io(path, e))?;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.read_exact(&mut buf[..n])
                .map_err(|e| Error::io(path, e))?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Err(bad(
                    path,
                    format!(
                        "the padding after tensor `{}` (data bytes {}..{}) is not zeros: the \
                         tensor is longer than its type and shape say (a wrong type?)",
                        p.after, p.from, p.to
                    ),
                ));
            }
            left -= n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, QTensor};
    use candle_core::{Device, Tensor};

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

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("mc-gguf-layout-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join(name)
    }

    /// The error reading `bytes` as a GGUF file gives, or None when it reads.
    fn read(name: &str, bytes: &[u8]) -> Option<String> {
        let path = tmp(name);
        std::fs::write(&path, bytes).unwrap();
        let r = read_content(&mut File::open(&path).unwrap(), &path);
        r.err().map(|e| e.to_string())
    }

    /// Two f32 [8] tensors as candle writes them: 32 bytes each, so no padding between them.
    fn two_tensors() -> Vec<u8> {
        let t = |x: f32| {
            let v: Vec<f32> = (1..=8).map(|i| x * i as f32).collect();
            QTensor::quantize(&Tensor::new(v, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap()
        };
        let (a, b) = (t(1.0), t(-1.0));
        let mut out = std::io::Cursor::new(vec![]);
        gguf_file::write(&mut out, &[], &[("tensor_a", &a), ("tensor_b", &b)]).unwrap();
        out.into_inner()
    }

    /// `bytes` with the type id of tensor `name` (one dimension, as `two_tensors` writes it)
    /// replaced.
    fn retype(bytes: &[u8], name: &str, id: u32) -> Vec<u8> {
        let at = bytes
            .windows(name.len())
            .position(|w| w == name.as_bytes())
            .unwrap();
        // name, then n_dims (u32) and the one dimension (u64), then the type.
        let ty = at + name.len() + 4 + 8;
        let mut out = bytes.to_vec();
        out[ty..ty + 4].copy_from_slice(&id.to_le_bytes());
        out
    }

    /// A type swapped for one less than an alignment unit smaller (f32 [8], 32 bytes, read as
    /// f16, 16 bytes) keeps every offset and the file's end where they were: only the padding,
    /// which is the real tensor's second half, shows it.
    #[test]
    fn a_type_swap_within_the_padding_is_refused() {
        let ok = two_tensors();
        assert_eq!(read("ok.gguf", &ok), None);
        const F16: u32 = 1;
        for name in ["tensor_a", "tensor_b"] {
            let e = read("swapped.gguf", &retype(&ok, name, F16)).expect("refused");
            assert!(
                e.contains("swapped.gguf") && e.contains(name) && e.contains("not zeros"),
                "{e}"
            );
        }
        // Bytes after the last tensor that are not its padding: accepted before, as fewer than
        // an alignment unit.
        let mut trailing = ok.clone();
        trailing.extend_from_slice(&[0u8; 16]);
        let e = read("trailing.gguf", &trailing).expect("refused");
        assert!(e.contains("after the last tensor"), "{e}");
        // A last tensor without its padding (the file ends with it) still reads.
        let v: Vec<f32> = (0..4).map(|i| i as f32).collect();
        let q = QTensor::quantize(&Tensor::new(v, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
        let mut out = std::io::Cursor::new(vec![]);
        gguf_file::write(&mut out, &[], &[("t", &q)]).unwrap();
        let padded = out.into_inner();
        assert_eq!(read("padded.gguf", &padded), None);
        assert_eq!(read("unpadded.gguf", &padded[..padded.len() - 16]), None);
    }

    /// A header: magic, version 3, counts, then `body` (the entries, written by the caller).
    fn header(n_tensors: u64, n_kv: u64, body: &[u8]) -> Vec<u8> {
        let mut v = b"GGUF".to_vec();
        v.extend_from_slice(&3u32.to_le_bytes());
        v.extend_from_slice(&n_tensors.to_le_bytes());
        v.extend_from_slice(&n_kv.to_le_bytes());
        v.extend_from_slice(body);
        v
    }

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn u32_kv(key: &str, x: u32) -> Vec<u8> {
        let mut v = string(key);
        v.extend_from_slice(&4u32.to_le_bytes());
        v.extend_from_slice(&x.to_le_bytes());
        v
    }

    #[test]
    fn corrupt_headers_are_errors_naming_the_file() {
        let pad = [0u8; 64];
        let with_pad = |mut v: Vec<u8>| {
            v.extend_from_slice(&pad);
            v
        };
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            // candle's parser divides by it.
            (
                "alignment 0",
                with_pad(header(0, 1, &u32_kv("general.alignment", 0))),
                "general.alignment",
            ),
            (
                "alignment 48",
                with_pad(header(0, 1, &u32_kv("general.alignment", 48))),
                "power of two",
            ),
            (
                "a key twice",
                with_pad(header(0, 2, &[u32_kv("k", 1), u32_kv("k", 2)].concat())),
                "appears twice",
            ),
            (
                "counts beyond the file",
                header(1 << 40, 1 << 40, &[]),
                "need at least",
            ),
            (
                "a string of 2^62 bytes",
                with_pad(header(0, 1, &(1u64 << 62).to_le_bytes())),
                "runs past the end",
            ),
            (
                "an array of 2^62 elements",
                with_pad(header(
                    0,
                    1,
                    &[
                        string("a"),
                        9u32.to_le_bytes().to_vec(),
                        4u32.to_le_bytes().to_vec(),
                        (1u64 << 62).to_le_bytes().to_vec(),
                    ]
                    .concat(),
                )),
                "runs past the end",
            ),
            ("big-endian", b"FUGG\0\0\0\x03".to_vec(), "big-endian"),
            (
                "version 9",
                header(0, 0, &[])[..4]
                    .iter()
                    .chain(&9u32.to_le_bytes())
                    .copied()
                    .collect(),
                "version 9",
            ),
        ];
        for (what, bytes, expect) in cases {
            let e = read("corrupt.gguf", &bytes).unwrap_or_else(|| panic!("{what}: accepted"));
            assert!(
                e.contains("corrupt.gguf") && e.contains(expect),
                "{what}: {e}"
            );
        }
        // A tensor named twice would hide the first one's bytes from the layout checks.
        let ok = two_tensors();
        let at = ok.windows(8).position(|w| w == b"tensor_b").unwrap();
        let mut twice = ok.clone();
        twice[at..at + 8].copy_from_slice(b"tensor_a");
        let e = read("twice.gguf", &twice).expect("refused");
        assert!(e.contains("tensor `tensor_a` appears twice"), "{e}");
    }
}
