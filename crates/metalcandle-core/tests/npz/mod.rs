//! A reader for the fixtures' `.npz` files, enough for what tests/fixtures/README.md promises:
//! an uncompressed zip archive of `.npy` arrays, each little-endian int64 or float32 in C order.
//! Anything else is refused by name rather than misread.

use std::collections::HashMap;
use std::path::Path;

pub enum Data {
    I64(Vec<i64>),
    F32(Vec<f32>),
}

pub struct Array {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Array {
    pub fn f32s(&self) -> &[f32] {
        match &self.data {
            Data::F32(v) => v,
            Data::I64(_) => panic!("expected a float32 array, got int64"),
        }
    }

    pub fn i64s(&self) -> &[i64] {
        match &self.data {
            Data::I64(v) => v,
            Data::F32(_) => panic!("expected an int64 array, got float32"),
        }
    }
}

fn u16_at(b: &[u8], i: usize) -> usize {
    u16::from_le_bytes([b[i], b[i + 1]]) as usize
}

fn u32_at(b: &[u8], i: usize) -> usize {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize
}

/// Every array of the archive at `path`, by name without the `.npy` suffix.
pub fn read(path: &Path) -> HashMap<String, Array> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut arrays = HashMap::new();
    let mut at = 0;
    // Local file headers follow one another up to the central directory.
    while bytes.len() >= at + 30 && u32_at(&bytes, at) == 0x0403_4b50 {
        let (flags, method) = (u16_at(&bytes, at + 6), u16_at(&bytes, at + 8));
        let (packed, size) = (u32_at(&bytes, at + 18), u32_at(&bytes, at + 22));
        let (name_len, extra_len) = (u16_at(&bytes, at + 26), u16_at(&bytes, at + 28));
        let name = String::from_utf8_lossy(&bytes[at + 30..at + 30 + name_len]).into_owned();
        let ctx = format!("{}: {name}", path.display());
        assert!(
            method == 0 && flags & 8 == 0 && packed == size,
            "{ctx}: only stored entries with their sizes in the local header are read"
        );
        let start = at + 30 + name_len + extra_len;
        let body = bytes
            .get(start..start + size)
            .unwrap_or_else(|| panic!("{ctx}: truncated"));
        let key = name
            .strip_suffix(".npy")
            .unwrap_or_else(|| panic!("{ctx}: not an .npy entry"));
        arrays.insert(key.to_string(), parse_npy(body, &ctx));
        at = start + size;
    }
    assert!(!arrays.is_empty(), "{}: no zip entries", path.display());
    arrays
}

/// The text between `'key': ` and the next `end` in an `.npy` header dict.
fn field<'a>(header: &'a str, key: &str, end: char, ctx: &str) -> &'a str {
    let tag = format!("'{key}': ");
    let from = header
        .find(&tag)
        .unwrap_or_else(|| panic!("{ctx}: header has no {key}: {header}"))
        + tag.len();
    let rest = &header[from..];
    &rest[..rest.find(end).unwrap_or(rest.len())]
}

fn parse_npy(b: &[u8], ctx: &str) -> Array {
    assert!(
        b.len() >= 10 && &b[..6] == b"\x93NUMPY",
        "{ctx}: not an .npy array"
    );
    let (len, from) = match b[6] {
        1 => (u16_at(b, 8), 10),
        2 | 3 => (u32_at(b, 8), 12),
        v => panic!("{ctx}: .npy version {v}"),
    };
    let header = std::str::from_utf8(&b[from..from + len]).unwrap();
    assert_eq!(
        field(header, "fortran_order", ',', ctx),
        "False",
        "{ctx}: Fortran order"
    );
    let shape: Vec<usize> = field(header, "shape", ')', ctx)
        .trim_start_matches('(')
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| {
            d.parse()
                .unwrap_or_else(|_| panic!("{ctx}: shape {header}"))
        })
        .collect();
    let raw = &b[from + len..];
    let n: usize = shape.iter().product();
    let descr = field(header, "descr", ',', ctx).trim_matches('\'');
    let width = match descr {
        "<i8" => 8,
        "<f4" => 4,
        d => panic!("{ctx}: dtype {d} (the fixtures hold only <i8 and <f4)"),
    };
    assert_eq!(raw.len(), n * width, "{ctx}: {n} values of shape {shape:?}");
    let data = match width {
        8 => Data::I64(
            raw.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        _ => Data::F32(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
    };
    Array { shape, data }
}
