//! Recycled activation buffers for the layer passes.
//!
//! Every layer of every step asks for the same large `[tokens × features]` buffers. Fresh from
//! the allocator each one costs a zero-fill on one core (glibc's `calloc` on memory it reuses) or a
//! page fault per 4 KiB on first write (memory it had returned to the system): measured here, a
//! tenth of the samples of a training step went to `memset` and page faults. A `Buf` goes back to
//! a process-wide pool when dropped and is handed out again, already in memory, for the next
//! buffer it can hold. Its contents are whatever its last user left: `take` is only for buffers
//! that the next kernel overwrites entirely (a product's, a norm's or a copy's output).
//!
//! What the forward pass keeps for the backward pass is a `Saved`: an f32 `Buf`, or, when the
//! model computes in bf16, a bf16 one from a second pool.

use crate::kernels::bf16;
use std::sync::{Mutex, PoisonError};

/// Buffers below this many values go through the allocator, whose own free lists serve them.
const MIN_LEN: usize = 16 * 1024;
/// At most this many idle buffers are kept; beyond, a dropped buffer is freed.
const MAX_IDLE: usize = 256;

/// Idle buffers, each at its full initialized length.
struct Pool<T>(Mutex<Vec<Vec<T>>>);

/// The pools of every layer pass: f32 values, and bf16 bit patterns (`Saved`).
static POOL: Pool<f32> = Pool(Mutex::new(Vec::new()));
static POOL_BF16: Pool<u16> = Pool(Mutex::new(Vec::new()));

/// `len` values (f32 unless said) in a recycled allocation (see the module comment).
pub struct Buf<T: 'static = f32> {
    values: Vec<T>,
    len: usize,
    pool: &'static Pool<T>,
}

/// A buffer of `len` values whose contents are unspecified: the caller overwrites all of them.
pub fn take(len: usize) -> Buf {
    POOL.take(len)
}

/// A buffer of `len` bf16 values whose contents are unspecified (see `take`).
pub fn take_bf16(len: usize) -> Buf<u16> {
    POOL_BF16.take(len)
}

/// A buffer holding a copy of `values`.
pub fn copy_of(values: &[f32]) -> Buf {
    let mut b = take(values.len());
    b.copy_from_slice(values);
    b
}

/// An activation kept from the forward pass for the backward pass: as computed, or rounded to
/// bf16 when the model runs in bf16 precision. The kept activations are most of a training step's
/// peak memory, and bf16 halves them; PyTorch keeps a bf16 model's activations in bf16 too, and
/// the products that read them round their inputs to bf16 anyway (to fp16, a little finer, on
/// AVX512-FP16 without AMX).
pub enum Saved {
    F32(Buf),
    Bf16(Buf<u16>),
}

impl Saved {
    /// Keeps `values`, rounded to bf16 if `bf16` (the f32 buffer then goes back to the pool).
    pub fn keep(values: Buf, bf16: bool) -> Saved {
        if !bf16 {
            return Saved::F32(values);
        }
        Saved::copy_of(&values, true)
    }

    /// Keeps a copy of `values`, in bf16 if `bf16` (rounded straight from them).
    pub fn copy_of(values: &[f32], bf16: bool) -> Saved {
        if !bf16 {
            return Saved::F32(copy_of(values));
        }
        let mut bits = take_bf16(values.len());
        bf16::round_into(values, &mut bits);
        Saved::Bf16(bits)
    }

    /// The values as f32: the kept buffer itself, or a pooled f32 copy of the bf16 values.
    pub fn values(&self) -> SavedValues<'_> {
        match self {
            Saved::F32(v) => SavedValues::Kept(v),
            Saved::Bf16(bits) => {
                let mut v = take(bits.len());
                bf16::expand_into(bits, &mut v);
                SavedValues::Expanded(v)
            }
        }
    }
}

/// Evaluates `$body` with `$v` bound to a `Saved` activation's values as stored (`&[f32]` or
/// `&[u16]` bf16), for kernels generic over `kernels::bf16::AsF32`, which read them in place.
macro_rules! with_saved {
    ($saved:expr, |$v:ident| $body:expr) => {
        match $saved {
            $crate::model::buffers::Saved::F32(b) => {
                let $v: &[f32] = b;
                $body
            }
            $crate::model::buffers::Saved::Bf16(b) => {
                let $v: &[u16] = b;
                $body
            }
        }
    };
}
pub(crate) use with_saved;

/// f32 values of a `Saved` activation, borrowed or expanded.
pub enum SavedValues<'a> {
    Kept(&'a [f32]),
    Expanded(Buf),
}

impl std::ops::Deref for SavedValues<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            SavedValues::Kept(v) => v,
            SavedValues::Expanded(v) => v,
        }
    }
}

impl<T: Copy + Default> Pool<T> {
    fn take(&'static self, len: usize) -> Buf<T> {
        if len >= MIN_LEN {
            let mut idle = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            // The smallest idle buffer that holds `len` values, if it is not much larger: a large
            // buffer spent on a small request would make the next large request allocate anew,
            // and the pool would grow past the step's peak. (Shapes repeat from step to step.)
            let fits = |v: &Vec<T>| v.len() >= len && v.len() - len <= len / 4;
            let best = idle.iter().enumerate().filter(|(_, v)| fits(v)).min_by_key(|(_, v)| v.len()).map(|(i, _)| i);
            if let Some(i) = best {
                return Buf { values: idle.swap_remove(i), len, pool: self };
            }
        }
        Buf { values: vec![T::default(); len], len, pool: self }
    }
}

impl From<Vec<f32>> for Buf {
    fn from(values: Vec<f32>) -> Self {
        let len = values.len();
        Buf { values, len, pool: &POOL }
    }
}

impl<T> Drop for Buf<T> {
    fn drop(&mut self) {
        if self.values.len() >= MIN_LEN {
            let mut idle = self.pool.0.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < MAX_IDLE {
                idle.push(std::mem::take(&mut self.values));
            }
        }
    }
}

impl<T> std::ops::Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.values[..self.len]
    }
}

impl<T> std::ops::DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.values[..self.len]
    }
}

impl<'a> IntoIterator for &'a Buf {
    type Item = &'a f32;
    type IntoIter = std::slice::Iter<'a, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_buffers_are_handed_out_again_for_sizes_they_fit() {
        let pool: &'static Pool<f32> = Box::leak(Box::new(Pool(Mutex::new(Vec::new()))));
        let len = 3 * MIN_LEN;
        let mut a = pool.take(len);
        assert_eq!(a.len(), len);
        a.fill(7.0);
        let at = a.as_ptr();
        drop(a);
        let half = pool.take(len / 2);
        assert!(half.as_ptr() != at && half.iter().all(|&x| x == 0.0), "a buffer twice the size is not spent on it");
        let b = pool.take(len - 100);
        assert_eq!((b.len(), b.as_ptr()), (len - 100, at), "the idle buffer serves a slightly smaller request");
        assert!(b.iter().all(|&x| x == 7.0), "contents are left as they were");
        let c = pool.take(len + 1);
        assert!(c.as_ptr() != at && c.iter().all(|&x| x == 0.0), "a buffer too small is not used; a new one is zeroed");
        drop((half, b, c));
        assert_eq!(pool.0.lock().unwrap().len(), 3, "all went back");
        drop(pool.take(10));
        assert_eq!(pool.0.lock().unwrap().len(), 3, "small buffers are not kept");
        assert_eq!(&copy_of(&[1.0, 2.0])[..], &[1.0, 2.0]);
    }

    #[test]
    fn saved_activations_give_back_their_values_or_their_bf16_rounding() {
        let values: Vec<f32> = (0..3 * MIN_LEN).map(|i| (i as f32 * 0.013).cos() * 7.0).collect();
        let exact = Saved::keep(copy_of(&values), false);
        assert!(matches!(exact, Saved::F32(_)) && *exact.values() == values[..]);
        let rounded = Saved::keep(copy_of(&values), true);
        assert!(matches!(&rounded, Saved::Bf16(b) if b.len() == values.len()));
        let want: Vec<f32> = values.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        assert_eq!(*rounded.values(), want[..]);
        let copied = Saved::copy_of(&values, true);
        assert!(matches!(copied, Saved::Bf16(_)) && *copied.values() == want[..]);
        assert!(matches!(Saved::copy_of(&values, false), Saved::F32(b) if b[..] == values[..]));
    }
}
