//! The compact weight formats as every kernel reads them: a matrix (or one row of it) in f32,
//! bf16, or one of GGML's two 32-value block formats (Q8_0, Q4_1), row-major, whole blocks per row.

/// Values per quantization block.
pub const BLOCK: usize = 32;

/// A weight matrix, or one row of it, in one of the compact formats (row-major, whole blocks per row).
#[derive(Clone, Copy)]
pub enum Row<'a> {
    F32(&'a [f32]),
    /// bf16 bit patterns (the upper half of an f32).
    Bf16(&'a [u16]),
    /// Per block: f32 scale and 32 signed values.
    Q8_0 {
        scale: &'a [f32],
        q: &'a [i8],
    },
    /// Per block: value = scale·q + min, q in 0..16, two per byte: the low nibble of byte j is
    /// position j of the block, the high nibble position j+16.
    Q4_1 {
        scale: &'a [f32],
        min: &'a [f32],
        q: &'a [u8],
    },
}

impl<'a> Row<'a> {
    /// Row `j` of a matrix with `cols` columns.
    #[inline(always)]
    pub fn row(self, j: usize, cols: usize) -> Row<'a> {
        let nb = cols / BLOCK;
        match self {
            Row::F32(w) => Row::F32(&w[j * cols..(j + 1) * cols]),
            Row::Bf16(w) => Row::Bf16(&w[j * cols..(j + 1) * cols]),
            Row::Q8_0 { scale, q } => Row::Q8_0 { scale: &scale[j * nb..(j + 1) * nb], q: &q[j * cols..(j + 1) * cols] },
            Row::Q4_1 { scale, min, q } => {
                Row::Q4_1 { scale: &scale[j * nb..(j + 1) * nb], min: &min[j * nb..(j + 1) * nb], q: &q[j * cols / 2..(j + 1) * cols / 2] }
            }
        }
    }
}
