//! Memory-mapped safetensors weights: one file, or shards listed in `model.safetensors.index.json`.
//! Tensors are converted to f32 on request; a missing tensor or a wrong shape names the tensor.

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Byte offset of the data section (8-byte length + JSON header).
    data_start: usize,
    meta: Metadata,
}

/// Anything that hands out named f32 tensors in Hugging Face names and layout.
pub trait WeightSource {
    /// The tensor as f32, checked against `shape`; errors name the tensor and both shapes.
    fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
}

impl WeightSource for TensorStore {
    fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        TensorStore::f32(self, name, shape)
    }
}

pub struct TensorStore {
    shards: Vec<Shard>,
    /// Tensor name → shard index.
    index: HashMap<String, usize>,
}

/// Shape and element type of one stored tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorMeta {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorStore {
    /// Opens `model.safetensors`, or the shards named by `model.safetensors.index.json`, in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            Self::open_files(&[single])
        } else if index.exists() {
            let text = crate::io::read_input_text(&index, "shard index")?;
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).with_context(|| format!("{}: no \"weight_map\"", index.display()))?;
            let mut files = std::collections::BTreeSet::new();
            for (tensor, f) in map {
                let f = f.as_str().with_context(|| format!("{}: weight_map[{tensor:?}] must be a file name", index.display()))?;
                let plain = Path::new(f).components().count() == 1
                    && matches!(Path::new(f).components().next(), Some(std::path::Component::Normal(_)));
                if !plain {
                    bail!("{}: weight_map[{tensor:?}] names {f:?}, which is not a file inside the model directory", index.display());
                }
                files.insert(f);
            }
            let paths: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
            Self::open_files(&paths)
        } else {
            bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display())
        }
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let file = crate::io::open_input(path, "safetensors file")?;
            // SAFETY: the file is a regular file opened read-only; like every mmap-based loader we
            // assume it is not truncated while we run.
            let map = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
            let (header_len, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {}", path.display(), diagnose(&map, e)))?;
            for name in meta.tensors().keys() {
                if index.insert(name.clone(), shards.len()).is_some() {
                    bail!("tensor {name} appears in more than one shard (second: {})", path.display());
                }
            }
            shards.push(Shard { path: path.clone(), map, data_start: 8 + header_len, meta });
        }
        Ok(TensorStore { shards, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensors, sorted by name.
    pub fn list(&self) -> BTreeMap<String, TensorMeta> {
        self.index.keys().map(|n| (n.clone(), self.meta(n).unwrap())).collect()
    }

    pub fn meta(&self, name: &str) -> Option<TensorMeta> {
        let shard = &self.shards[*self.index.get(name)?];
        let info = shard.meta.info(name)?;
        Some(TensorMeta { dtype: info.dtype, shape: info.shape.clone() })
    }

    fn bytes(&self, name: &str) -> Result<(&[u8], TensorMeta, &Path)> {
        let Some(&s) = self.index.get(name) else { bail!("tensor {name} not found in the weights") };
        let shard = &self.shards[s];
        let info = shard.meta.info(name).expect("indexed tensor has metadata");
        let (a, b) = info.data_offsets;
        let bytes = shard
            .map
            .get(shard.data_start + a..shard.data_start + b)
            .with_context(|| format!("{}: tensor {name} lies outside the file", shard.path.display()))?;
        Ok((bytes, TensorMeta { dtype: info.dtype, shape: info.shape.clone() }, &shard.path))
    }

    /// The tensor as f32, checked against `shape`.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (bytes, meta, path) = self.bytes(name)?;
        if meta.shape != shape {
            bail!("tensor {name} in {} has shape {:?}, expected {:?}", path.display(), meta.shape, shape);
        }
        crate::limits::ensure_memory(4 * shape.iter().map(|&d| d as u128).product::<u128>(), &format!("tensor {name} in f32"))?;
        to_f32(bytes, meta.dtype).with_context(|| format!("tensor {name} in {}", path.display()))
    }

    /// The tensor as f32 with whatever shape it has.
    pub fn f32_any(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (bytes, meta, path) = self.bytes(name)?;
        let v = to_f32(bytes, meta.dtype).with_context(|| format!("tensor {name} in {}", path.display()))?;
        Ok((v, meta.shape))
    }

    /// An integer tensor as i64 (for fixtures: token ids, masks, labels).
    pub fn i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let (bytes, meta, _) = self.bytes(name)?;
        let v = match meta.dtype {
            Dtype::I64 => bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::I32 => bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            d => bail!("tensor {name} has dtype {d:?}, expected an integer type"),
        };
        Ok((v, meta.shape))
    }
}

/// Why `bytes` is not a valid safetensors file, naming the tensor where one is at fault (the
/// library's own message for a truncated file is "incomplete metadata, file not fully covered").
fn diagnose(bytes: &[u8], err: safetensors::SafeTensorError) -> String {
    let len = bytes.len();
    let Some(n) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap())) else {
        return format!("the file is {len} bytes long, too short for a safetensors header (truncated?)");
    };
    if n > (len - 8) as u64 {
        return format!("its header claims {n} bytes but only {} follow the length field: the file is truncated", len - 8);
    }
    let n = n as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        match std::str::from_utf8(&bytes[8..8 + n]).ok().and_then(|t| serde_json::from_str(t).ok()) {
            Some(h) => h,
            None => return format!("{err}"),
        };
    let data_len = len - 8 - n;
    let mut last_end = 0u64;
    for (name, info) in &header {
        let end = info.get("data_offsets").and_then(|o| o.get(1)).and_then(serde_json::Value::as_u64);
        if let Some(end) = end {
            if end > data_len as u64 {
                return format!(
                    "tensor {name} ends at byte {end} of the data section, which holds only {data_len} bytes: the file is truncated"
                );
            }
            last_end = last_end.max(end);
        }
    }
    if last_end < data_len as u64 {
        return format!("{} bytes follow the last tensor's data ({err})", data_len as u64 - last_end);
    }
    format!("{err}")
}

fn to_f32(bytes: &[u8], dtype: Dtype) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F64 => bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        d => bail!("dtype {d:?} is not a floating-point type lowrank loads (F32, F16, BF16, F64)"),
    })
}

/// Little-endian f32 bytes, for writing safetensors.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Serializes named f32 tensors (sorted by name, as safetensors requires) to safetensors bytes.
pub fn serialize_f32(tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors.iter().map(|(n, (s, v))| (n.clone(), f32_bytes(v), s.clone())).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, b, s)| Ok((n.clone(), safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    Ok(safetensors::serialize(views, metadata)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_f16_bf16_f32_and_names_bad_tensors() {
        let dir = std::env::temp_dir().join(format!("lowrank-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vals = [1.5f32, -2.25, 0.125, 3.0];
        let f16b: Vec<u8> = vals.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect();
        let bf16b: Vec<u8> = vals.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect();
        let f32b = f32_bytes(&vals);
        let views = vec![
            ("a16", safetensors::tensor::TensorView::new(Dtype::F16, vec![2, 2], &f16b).unwrap()),
            ("b16", safetensors::tensor::TensorView::new(Dtype::BF16, vec![4], &bf16b).unwrap()),
            ("c32", safetensors::tensor::TensorView::new(Dtype::F32, vec![1, 4], &f32b).unwrap()),
        ];
        std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
        let st = TensorStore::open_dir(&dir).unwrap();
        assert_eq!(st.f32("a16", &[2, 2]).unwrap(), vals);
        assert_eq!(st.f32("b16", &[4]).unwrap(), vals);
        assert_eq!(st.f32("c32", &[1, 4]).unwrap(), vals);
        let e = st.f32("a16", &[4, 1]).unwrap_err().to_string();
        assert!(e.contains("a16") && e.contains("[2, 2]") && e.contains("[4, 1]"), "{e}");
        assert!(st.f32("nope", &[1]).unwrap_err().to_string().contains("nope"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
