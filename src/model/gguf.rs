//! GGUF (v2/v3) files: a bounds-checked reader over a memory map, a writer, the llama.cpp ↔
//! Hugging Face tensor-name mapping, and decoder configs and weights from GGUF metadata.

use super::config::{Arch, DecoderConfig};
use super::quant::{dequantize, type_name, GgmlType};
use super::weights::WeightSource;
use crate::kernels::rope::RopeScaling;
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";

/// Whether the file at `path` starts with GGUF's magic (false when it cannot be read).
pub fn is_gguf_file(path: &Path) -> bool {
    let Ok(mut f) = std::fs::File::open(path) else { return false };
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut f, &mut magic).is_ok() && &magic == MAGIC
}
const DEFAULT_ALIGNMENT: usize = 32;

#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) if v >= 0 => Some(v as u64),
            GgufValue::I16(v) if v >= 0 => Some(v as u64),
            GgufValue::I32(v) if v >= 0 => Some(v as u64),
            GgufValue::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    /// A short rendering for `inspect` (long arrays summarized).
    pub fn summary(&self) -> String {
        match self {
            GgufValue::String(s) if s.len() > 80 => {
                format!("{:?}… ({} chars)", &s[..s.char_indices().nth(60).map_or(s.len(), |c| c.0)], s.len())
            }
            GgufValue::String(s) => format!("{s:?}"),
            GgufValue::Array(a) if a.len() > 8 => format!("[{} items]", a.len()),
            GgufValue::Array(a) => format!("[{}]", a.iter().map(GgufValue::summary).collect::<Vec<_>>().join(", ")),
            GgufValue::Bool(b) => b.to_string(),
            other => other.as_f64().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the row length (PyTorch's last dimension).
    pub dims: Vec<usize>,
    pub type_id: u32,
    pub offset: usize,
}

impl GgufTensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// The shape in PyTorch order.
    pub fn torch_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    bytes: Bytes,
    data_start: usize,
}

/// The file's bytes: a read-only memory map, or a buffer (for bytes made in memory).
enum Bytes {
    Map(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A bounds-checked little-endian cursor.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

/// The fewest bytes one metadata value of `type_id` occupies (to bound a declared array length
/// by what is left of the file before allocating for it).
fn min_value_size(type_id: u32) -> Option<usize> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        let Some(end) = end else { bail!("truncated GGUF: needed {n} bytes at offset {}, file has {}", self.pos, self.b.len()) };
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    /// A count of items of at least `item_size` bytes each, bounded by what is left of the file.
    fn count(&mut self, item_size: usize, what: &str) -> Result<usize> {
        let at = self.pos;
        let n = self.u64()?;
        if n > (self.remaining() / item_size.max(1)) as u64 {
            bail!("corrupt GGUF: {what} {n} at offset {at} does not fit in the {} bytes left in the file", self.remaining());
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.count(1, "string length")?;
        let at = self.pos;
        String::from_utf8(self.take(n)?.to_vec()).with_context(|| format!("corrupt GGUF: string at offset {at} is not UTF-8"))
    }
    fn value(&mut self, type_id: u32, depth: usize) -> Result<GgufValue> {
        Ok(match type_id {
            0 => GgufValue::U8(self.u8()?),
            1 => GgufValue::I8(self.u8()? as i8),
            2 => GgufValue::U16(self.u16()?),
            3 => GgufValue::I16(self.u16()? as i16),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(self.u32()? as i32),
            6 => GgufValue::F32(f32::from_bits(self.u32()?)),
            7 => GgufValue::Bool(self.u8()? != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth > 4 {
                    bail!("corrupt GGUF: arrays nested too deeply at offset {}", self.pos);
                }
                let at = self.pos;
                let t = self.u32()?;
                let size = min_value_size(t).with_context(|| format!("corrupt GGUF: unknown array item type {t} at offset {at}"))?;
                let n = self.count(size, "array length")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(t, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(self.u64()? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64()?)),
            t => bail!("corrupt GGUF: unknown metadata value type {t} at offset {}", self.pos - 4),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::io::open_input(path, "GGUF file")?;
        // SAFETY: read-only map of a regular file we do not modify.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        Self::parse(Bytes::Map(map), path).with_context(|| format!("reading GGUF {}", path.display()))
    }

    /// A GGUF file held in memory; `path` only names it in messages.
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<Self> {
        Self::parse(Bytes::Owned(bytes), path).with_context(|| format!("reading GGUF {}", path.display()))
    }

    fn parse(bytes: Bytes, path: &Path) -> Result<Self> {
        let mut c = Cursor { b: &bytes, pos: 0 };
        if c.take(4)? != MAGIC {
            bail!("not a GGUF file (bad magic)");
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            bail!("GGUF version {version} is not supported (only 2 and 3)");
        }
        // A tensor description takes at least 24 bytes, a metadata entry at least 13.
        let n_tensors = c.count(24, "tensor count")?;
        let n_kv = c.count(13, "metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let at = c.pos;
            let key = c.string()?;
            let t = c.u32()?;
            let v = c.value(t, 0).with_context(|| format!("metadata key {key}"))?;
            if metadata.insert(key.clone(), v).is_some() {
                bail!("corrupt GGUF: metadata key {key} appears twice (second at offset {at})");
            }
        }
        let mut tensors: Vec<GgufTensorInfo> = Vec::with_capacity(n_tensors);
        let mut names = std::collections::HashSet::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let at = c.pos;
            let name = c.string()?;
            let nd = c.u32()? as usize;
            if nd == 0 || nd > 4 {
                bail!("tensor {name} (offset {at}): {nd} dimensions (GGUF allows 1 to 4)");
            }
            let dims = (0..nd).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let type_id = c.u32()?;
            let offset = c.u64()?;
            if !names.insert(name.clone()) {
                bail!("corrupt GGUF: tensor {name} appears twice (second at offset {at})");
            }
            if dims.contains(&0) {
                bail!("tensor {name} (offset {at}) has a zero dimension: {dims:?}");
            }
            let dims: Vec<usize> = dims.iter().map(|&d| usize::try_from(d)).collect::<Result<_, _>>()?;
            if dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).is_none() {
                bail!("tensor {name} (offset {at}): dimensions {dims:?} overflow");
            }
            if super::quant::ggml_block(type_id).is_none() {
                bail!("tensor {name} (offset {at}): unknown GGML type {type_id}");
            }
            let offset = usize::try_from(offset).with_context(|| format!("tensor {name}: data offset {offset} is out of range"))?;
            tensors.push(GgufTensorInfo { name, dims, type_id, offset });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT as u64,
            Some(v) => v.as_u64().context("general.alignment must be an unsigned integer")?,
        };
        if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 20 {
            bail!("general.alignment {alignment} is not a power of two up to 1 MiB");
        }
        let alignment = alignment as usize;
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let file = GgufFile { path: path.to_path_buf(), version, metadata, tensors, bytes, data_start };
        for t in &file.tensors {
            if t.offset % alignment != 0 {
                bail!("tensor {}: data offset {} is not a multiple of the alignment {alignment}", t.name, t.offset);
            }
            file.data_range(t)?;
        }
        Ok(file)
    }

    /// Where tensor `t`'s data lies in the file, checked against the file's end.
    fn data_range(&self, t: &GgufTensorInfo) -> Result<std::ops::Range<usize>> {
        let (per_block, block_bytes) = super::quant::ggml_block(t.type_id).context("unknown GGML type")?;
        let n = t.n_elements();
        if !n.is_multiple_of(per_block) {
            bail!("tensor {}: {n} elements are not a whole number of {} blocks of {per_block}", t.name, type_name(t.type_id));
        }
        let size = (n / per_block).checked_mul(block_bytes);
        let start = self.data_start.checked_add(t.offset);
        match (start, size) {
            (Some(s), Some(z)) if s.checked_add(z).is_some_and(|e| e <= self.bytes.len()) => Ok(s..s + z),
            _ => bail!(
                "tensor {} (data offset {}, {} bytes) extends past the end of the file ({} bytes; truncated download?)",
                t.name,
                t.offset,
                size.map_or("too many".into(), |z| z.to_string()),
                self.bytes.len()
            ),
        }
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(GgufValue::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(GgufValue::as_u64)
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(GgufValue::as_f64)
    }

    /// An unsigned integer value that must be present; a value of another type is an error.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        match self.get(key) {
            None => bail!("GGUF metadata {key} is missing"),
            Some(v) => v.as_u64().with_context(|| format!("GGUF metadata {key} must be a non-negative integer, found {}", v.summary())),
        }
    }

    /// An optional unsigned integer value; present with another type is an error.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key).map(|_| self.require_u64(key)).transpose()
    }

    /// An optional number; present with another type is an error.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).with_context(|| format!("GGUF metadata {key} must be a number, found {}", v.summary())),
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor dequantized to f32, with its PyTorch-order shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self.tensor(name).with_context(|| format!("tensor {name} not found in {}", self.path.display()))?;
        let ty = GgmlType::from_id(t.type_id).with_context(|| format!("tensor {name}"))?;
        let n = t.n_elements();
        crate::limits::ensure_memory(4 * n as u128, &format!("tensor {name} in f32"))?;
        let range = self.data_range(t)?;
        let data = dequantize(ty, &self.bytes[range], n).with_context(|| format!("tensor {name}"))?;
        Ok((data, t.torch_shape()))
    }

    /// Bytes of the data section of the file (for size reports).
    pub fn data_size(&self) -> usize {
        self.bytes.len().saturating_sub(self.data_start)
    }
}

/// Writes GGUF v3 files.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<WriterTensor>,
}

struct WriterTensor {
    name: String,
    /// GGML order (row length first).
    dims: Vec<u64>,
    type_id: u32,
    /// `None`: the next aligned offset after the previous tensor.
    offset: Option<u64>,
    bytes: Vec<u8>,
}

impl GgufWriter {
    pub fn meta(&mut self, key: &str, v: GgufValue) {
        self.metadata.push((key.to_string(), v));
    }

    /// Adds an f32 tensor given its PyTorch-order shape.
    pub fn tensor_f32(&mut self, name: &str, torch_shape: &[usize], data: &[f32]) {
        assert_eq!(torch_shape.iter().product::<usize>(), data.len());
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor_raw(name, torch_shape, GgmlType::F32, bytes);
    }

    /// Adds a tensor already encoded as `ty`.
    pub fn tensor_raw(&mut self, name: &str, torch_shape: &[usize], ty: GgmlType, bytes: Vec<u8>) {
        let dims = torch_shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push(WriterTensor { name: name.to_string(), dims, type_id: ty.id(), offset: None, bytes });
    }

    /// Adds a tensor description exactly as given — GGML-order dimensions, any type id, an
    /// explicit data offset — with `bytes` as its data: for writing the malformed files that
    /// tests and the fuzz harness feed to the reader.
    pub fn tensor_unchecked(&mut self, name: &str, ggml_dims: &[u64], type_id: u32, offset: Option<u64>, bytes: Vec<u8>) {
        self.tensors.push(WriterTensor { name: name.to_string(), dims: ggml_dims.to_vec(), type_id, offset, bytes });
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        fn value(out: &mut Vec<u8>, v: &GgufValue) {
            match v {
                GgufValue::U8(x) => out.push(*x),
                GgufValue::I8(x) => out.push(*x as u8),
                GgufValue::U16(x) => out.extend(x.to_le_bytes()),
                GgufValue::I16(x) => out.extend(x.to_le_bytes()),
                GgufValue::U32(x) => out.extend(x.to_le_bytes()),
                GgufValue::I32(x) => out.extend(x.to_le_bytes()),
                GgufValue::F32(x) => out.extend(x.to_le_bytes()),
                GgufValue::Bool(x) => out.push(*x as u8),
                GgufValue::String(s) => string(out, s),
                GgufValue::Array(a) => {
                    out.extend(a.first().map_or(4, GgufValue::type_id).to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    for x in a {
                        value(out, x);
                    }
                }
                GgufValue::U64(x) => out.extend(x.to_le_bytes()),
                GgufValue::I64(x) => out.extend(x.to_le_bytes()),
                GgufValue::F64(x) => out.extend(x.to_le_bytes()),
            }
        }
        let mut out = Vec::new();
        out.extend(MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            string(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            value(&mut out, v);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            string(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.type_id.to_le_bytes());
            out.extend(t.offset.unwrap_or(offset).to_le_bytes());
            offset += (t.bytes.len().div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT) as u64;
        }
        out.resize(out.len().div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT, 0);
        for t in &self.tensors {
            out.extend(&t.bytes);
            out.resize(out.len().div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT, 0);
        }
        out
    }
}

/// Per-layer modules: (Hugging Face path inside `model.layers.N`, llama.cpp's name in `blk.N`).
const LAYER_NAMES: [(&str, &str); 9] = [
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// Tensors outside the layers: (Hugging Face name, llama.cpp name).
const GLOBAL_NAMES: [(&str, &str); 3] =
    [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")];

/// llama.cpp's name for a Hugging Face decoder tensor (`model.layers.3.self_attn.q_proj.weight` →
/// `blk.3.attn_q.weight`), or `None` for names outside the decoder layout.
pub fn hf_to_gguf_name(hf: &str) -> Option<String> {
    if let Some((_, g)) = GLOBAL_NAMES.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = module.rsplit_once('.')?;
    let (_, g) = LAYER_NAMES.iter().find(|(h, _)| *h == module)?;
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// The Hugging Face name of a llama.cpp tensor name (the inverse of `hf_to_gguf_name`).
pub fn gguf_to_hf_name(gguf: &str) -> Option<String> {
    if let Some((h, _)) = GLOBAL_NAMES.iter().find(|(_, g)| *g == gguf) {
        return Some(h.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = module.split_once('.')?;
    let (h, _) = LAYER_NAMES.iter().find(|(_, g)| *g == module)?;
    Some(format!("model.layers.{layer}.{h}.{suffix}"))
}

/// Decoder configuration from GGUF metadata (`general.architecture` llama, mistral or qwen2).
/// Every size is checked (present where required, positive, within `limits`, consistent) before
/// anything is allocated from it.
pub fn decoder_config(g: &GgufFile) -> Result<DecoderConfig> {
    use crate::limits::{check_dim, MAX_HEADS, MAX_HEAD_DIM, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_VOCAB};
    let arch_name = g.get_str("general.architecture").context("GGUF has no general.architecture")?;
    let arch = match arch_name {
        "llama" => Arch::Llama,
        "mistral" => Arch::Mistral,
        "qwen2" => Arch::Qwen2,
        other => bail!("GGUF architecture \"{other}\" is not supported (supported: llama, mistral, qwen2)"),
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let dim = |k: &str, max: usize| -> Result<usize> { check_dim(&format!("GGUF metadata {}", key(k)), g.require_u64(&key(k))?, max) };
    let opt_dim = |k: &str, max: usize| -> Result<Option<usize>> {
        g.opt_u64(&key(k))?.map(|v| check_dim(&format!("GGUF metadata {}", key(k)), v, max)).transpose()
    };
    let hidden_size = dim("embedding_length", MAX_HIDDEN)?;
    let num_heads = dim("attention.head_count", MAX_HEADS)?;
    let num_kv_heads = opt_dim("attention.head_count_kv", MAX_HEADS)?.unwrap_or(num_heads);
    let head_dim = match opt_dim("attention.key_length", MAX_HEAD_DIM)? {
        Some(h) => h,
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => bail!("embedding_length {hidden_size} is not a multiple of head_count {num_heads} (and no attention.key_length is given)"),
    };
    if let Some(v) = opt_dim("attention.value_length", MAX_HEAD_DIM)? {
        if v != head_dim {
            bail!("attention.value_length {v} differs from attention.key_length {head_dim}, which lowrank does not support");
        }
    }
    let vocab_size = match opt_dim("vocab_size", MAX_VOCAB)? {
        Some(v) => v,
        None => {
            let t = g.tensor("token_embd.weight").context("GGUF has no token_embd.weight")?;
            let rows =
                *t.dims.get(1).with_context(|| format!("token_embd.weight has shape {:?}; expected 2 dimensions", t.torch_shape()))?;
            check_dim("the vocabulary (rows of token_embd.weight)", rows as u64, MAX_VOCAB)?
        }
    };
    if g.tensor("rope_freqs.weight").is_some() {
        bail!("GGUF models with rope_freqs (Llama 3.1 rope scaling) are not supported yet");
    }
    let rope_scaling = match (g.get_str(&key("rope.scaling.type")), g.opt_f64(&key("rope.scaling.factor"))?) {
        (None | Some("none"), _) => RopeScaling::Default,
        (Some("linear"), Some(f)) => RopeScaling::Linear { factor: f as f32 },
        (Some(t), _) => bail!("GGUF rope scaling \"{t}\" is not supported"),
    };
    let token = |k: &str| -> Result<Option<u32>> { Ok(g.opt_u64(k)?.and_then(|v| u32::try_from(v).ok())) };
    let config = DecoderConfig {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size: dim("feed_forward_length", MAX_INTERMEDIATE)?,
        num_layers: dim("block_count", MAX_LAYERS)?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: g.opt_f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5) as f32,
        rope_theta: g.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32,
        rope_scaling,
        max_position_embeddings: opt_dim("context_length", usize::MAX)?.unwrap_or(4096),
        tie_word_embeddings: g.tensor("output.weight").is_none(),
        qkv_bias: arch == Arch::Qwen2 || g.tensor("blk.0.attn_q.bias").is_some(),
        o_bias: g.tensor("blk.0.attn_output.bias").is_some(),
        mlp_bias: g.tensor("blk.0.ffn_up.bias").is_some(),
        sliding_window: None,
        bos_token_id: token("tokenizer.ggml.bos_token_id")?,
        eos_token_ids: token("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
    };
    config.validate()?;
    Ok(config)
}

/// Weights of a GGUF decoder seen under Hugging Face names and layout: tensors are dequantized,
/// and q/k rows are put back in the order transformers uses (llama.cpp's converter interleaves
/// the two rotary halves of each head for llama-architecture files).
pub struct GgufWeights<'a> {
    pub file: &'a GgufFile,
    pub config: &'a DecoderConfig,
}

impl WeightSource for GgufWeights<'_> {
    fn f32(&self, hf_name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let name = hf_to_gguf_name(hf_name).with_context(|| format!("no GGUF name for tensor {hf_name}"))?;
        let (data, got) = self.file.tensor_f32(&name).with_context(|| format!("(Hugging Face name {hf_name})"))?;
        if got != shape {
            bail!("tensor {name} ({hf_name}) in {} has shape {got:?}, expected {shape:?}", self.file.path.display());
        }
        let heads = if hf_name.ends_with("self_attn.q_proj.weight") || hf_name.ends_with("self_attn.q_proj.bias") {
            self.config.num_heads
        } else if hf_name.ends_with("self_attn.k_proj.weight") || hf_name.ends_with("self_attn.k_proj.bias") {
            self.config.num_kv_heads
        } else {
            return Ok(data);
        };
        if self.config.arch == Arch::Qwen2 {
            return Ok(data); // qwen2 GGUFs keep the Hugging Face row order
        }
        Ok(unpermute_rows(&data, heads, shape[0], data.len() / shape[0]))
    }
}

/// llama.cpp's converter interleaves the two rotary halves of each q/k head: GGUF row 2i+j of a
/// head is Hugging Face row j·(hd/2)+i. `permute_rows` goes HF → GGUF, `unpermute_rows` back.
pub fn permute_rows(data: &[f32], heads: usize, rows: usize, cols: usize) -> Vec<f32> {
    reorder_rows(data, heads, rows, cols, true)
}

pub fn unpermute_rows(data: &[f32], heads: usize, rows: usize, cols: usize) -> Vec<f32> {
    reorder_rows(data, heads, rows, cols, false)
}

fn reorder_rows(data: &[f32], heads: usize, rows: usize, cols: usize, to_gguf: bool) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0.0; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let (hf, gg) = (h * hd + j * half + i, h * hd + 2 * i + j);
                let (src, dst) = if to_gguf { (hf, gg) } else { (gg, hf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_and_reader_roundtrip() {
        let mut w = GgufWriter::default();
        w.meta("general.architecture", GgufValue::String("llama".into()));
        w.meta("x.list", GgufValue::Array(vec![GgufValue::String("a".into()), GgufValue::String("b".into())]));
        w.meta("x.f", GgufValue::F32(0.5));
        w.tensor_f32("t", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        w.tensor_f32("u", &[5], &[9.0; 5]);
        let p = std::env::temp_dir().join(format!("lowrank-gguf-{}.gguf", std::process::id()));
        std::fs::write(&p, w.to_bytes()).unwrap();
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.get_str("general.architecture"), Some("llama"));
        assert_eq!(g.get("x.list").unwrap().as_array().unwrap().len(), 2);
        assert_eq!(g.get_f64("x.f"), Some(0.5));
        assert_eq!(g.tensor_f32("t").unwrap(), (vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![2, 3]));
        assert_eq!(g.tensor_f32("u").unwrap().0, vec![9.0; 5]);
        // A truncated file is an error, not a panic.
        let bytes = std::fs::read(&p).unwrap();
        for cut in [3, 20, 60, bytes.len() - 16] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            assert!(GgufFile::open(&p).is_err(), "cut at {cut}");
        }
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn name_mapping_and_unpermute() {
        assert_eq!(hf_to_gguf_name("model.layers.12.mlp.down_proj.weight").unwrap(), "blk.12.ffn_down.weight");
        assert_eq!(hf_to_gguf_name("model.layers.0.self_attn.q_proj.bias").unwrap(), "blk.0.attn_q.bias");
        assert_eq!(hf_to_gguf_name("model.embed_tokens.weight").unwrap(), "token_embd.weight");
        assert!(hf_to_gguf_name("model.layers.x.foo").is_none());
        // one head of 4 rows, 1 column: GGUF order [r0, r2, r1, r3] → HF order [r0, r1, r2, r3]
        assert_eq!(unpermute_rows(&[0.0, 2.0, 1.0, 3.0], 1, 4, 1), vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(permute_rows(&[0.0, 1.0, 2.0, 3.0], 1, 4, 1), vec![0.0, 2.0, 1.0, 3.0]);
    }
}
