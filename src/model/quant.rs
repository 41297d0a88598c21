//! GGML tensor types and their dequantization to f32 (block layouts as llama.cpp defines them).

use anyhow::{bail, Result};
use half::{bf16, f16};

/// A GGML element type that lowrank can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Result<Self> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => bail!(
                "GGML type {other} ({}) is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)",
                type_name(other)
            ),
        })
    }

    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::BF16 => 30,
        }
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
        }
    }

    /// Bytes needed for `n` elements, or an error when `n` is not a whole number of blocks.
    pub fn byte_size(self, n: usize) -> Result<usize> {
        let (be, bb) = self.block();
        if !n.is_multiple_of(be) {
            bail!("{n} elements are not a whole number of {self:?} blocks of {be}");
        }
        Ok(n / be * bb)
    }
}

/// (elements per block, bytes per block) of every GGML type id llama.cpp defines, including the
/// ones lowrank cannot dequantize, so a reader can bounds-check any tensor; `None` for ids that
/// no GGML type has.
pub fn ggml_block(id: u32) -> Option<(usize, usize)> {
    if let Ok(t) = GgmlType::from_id(id) {
        return Some(t.block());
    }
    Some(match id {
        6 => (32, 22),   // Q5_0
        7 => (32, 24),   // Q5_1
        9 => (32, 36),   // Q8_1
        10 => (256, 84), // Q2_K
        11 => (256, 110),
        15 => (256, 292),
        16 => (256, 66),
        17 => (256, 74),
        18 => (256, 98),
        19 => (256, 50),
        20 => (32, 18),
        21 => (256, 110),
        22 => (256, 82),
        23 => (256, 136),
        24 => (1, 1),
        25 => (1, 2),
        26 => (1, 4),
        27 | 28 => (1, 8),
        29 => (256, 56),
        _ => return None,
    })
}

/// Names of all GGML type ids, for messages.
pub fn type_name(id: u32) -> &'static str {
    const NAMES: [&str; 31] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
        "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// K-quant 6-bit scale and min number `j` (0..8) packed in 12 bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Dequantizes `n` elements of type `t` stored in `bytes`.
pub fn dequantize(t: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = t.byte_size(n)?;
    if bytes.len() < need {
        bail!("{t:?} data of {n} elements needs {need} bytes, found {}", bytes.len());
    }
    let bytes = &bytes[..need];
    let mut out = Vec::with_capacity(n);
    let (_, bb) = t.block();
    match t {
        GgmlType::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::BF16 => out.extend(bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::Q8_0 => {
            for b in bytes.chunks_exact(bb) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        GgmlType::Q4_0 => {
            for b in bytes.chunks_exact(bb) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| ((q & 0xF) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        GgmlType::Q4_1 => {
            for b in bytes.chunks_exact(bb) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| (q & 0xF) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
        GgmlType::Q4K => {
            for b in bytes.chunks_exact(bb) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (g, q) in qs.chunks_exact(32).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * g, scales);
                    let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                    let (d1, min1, d2, min2) = (d * sc1 as f32, dmin * m1 as f32, d * sc2 as f32, dmin * m2 as f32);
                    out.extend(q.iter().map(|&x| d1 * (x & 0xF) as f32 - min1));
                    out.extend(q.iter().map(|&x| d2 * (x >> 4) as f32 - min2));
                }
            }
        }
        GgmlType::Q5K => {
            for b in bytes.chunks_exact(bb) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qh = &b[16..48];
                let ql = &b[48..176];
                for (g, q) in ql.chunks_exact(32).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * g, scales);
                    let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                    let (d1, min1, d2, min2) = (d * sc1 as f32, dmin * m1 as f32, d * sc2 as f32, dmin * m2 as f32);
                    let (u1, u2) = (1u8 << (2 * g), 2u8 << (2 * g));
                    out.extend(q.iter().zip(qh).map(|(&x, &h)| d1 * ((x & 0xF) + if h & u1 != 0 { 16 } else { 0 }) as f32 - min1));
                    out.extend(q.iter().zip(qh).map(|(&x, &h)| d2 * ((x >> 4) + if h & u2 != 0 { 16 } else { 0 }) as f32 - min2));
                }
            }
        }
        GgmlType::Q6K => {
            for b in bytes.chunks_exact(bb) {
                let d = f16_at(b, 208);
                let mut y = [0.0f32; 256];
                for half in 0..2 {
                    let ql = &b[half * 64..half * 64 + 64];
                    let qh = &b[128 + half * 32..128 + half * 32 + 32];
                    let sc = &b[192 + half * 8..192 + half * 8 + 8];
                    let y = &mut y[half * 128..half * 128 + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8 as f32) * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
                    }
                }
                out.extend_from_slice(&y);
            }
        }
    }
    Ok(out)
}
