//! Recycled activation buffers for the layer passes.
//!
//! Every layer of every step asks for the same large `[tokens × features]` buffers. Fresh from
//! the allocator each one costs a zero-fill on one core (glibc's `calloc` on memory it reuses) or a
//! page fault per 4 KiB on first write (memory it had returned to the system): measured here, a
//! tenth of the samples of a training step went to `memset` and page faults. A `Buf` goes back to
//! a process-wide pool when dropped and is handed out again, already in memory, for the next
//! buffer it can hold. Its contents are whatever its last user left: `take` is only for buffers
//! that the next kernel overwrites entirely (a product's, a norm's or a copy's output).

use std::sync::{Mutex, PoisonError};

/// Buffers below this many values go through the allocator, whose own free lists serve them.
const MIN_LEN: usize = 16 * 1024;
/// At most this many idle buffers are kept; beyond, a dropped buffer is freed.
const MAX_IDLE: usize = 256;

/// Idle buffers, each at its full initialized length.
struct Pool(Mutex<Vec<Vec<f32>>>);

/// The pool of every layer pass.
static POOL: Pool = Pool(Mutex::new(Vec::new()));

/// `len` f32 values in a recycled allocation (see the module comment).
pub struct Buf {
    values: Vec<f32>,
    len: usize,
    pool: &'static Pool,
}

/// A buffer of `len` values whose contents are unspecified: the caller overwrites all of them.
pub fn take(len: usize) -> Buf {
    POOL.take(len)
}

/// A buffer holding a copy of `values`.
pub fn copy_of(values: &[f32]) -> Buf {
    let mut b = take(values.len());
    b.copy_from_slice(values);
    b
}

impl Pool {
    fn take(&'static self, len: usize) -> Buf {
        if len >= MIN_LEN {
            let mut idle = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            // The smallest idle buffer that holds `len` values, if it is not much larger: a large
            // buffer spent on a small request would make the next large request allocate anew,
            // and the pool would grow past the step's peak. (Shapes repeat from step to step.)
            let fits = |v: &Vec<f32>| v.len() >= len && v.len() - len <= len / 4;
            let best = idle.iter().enumerate().filter(|(_, v)| fits(v)).min_by_key(|(_, v)| v.len()).map(|(i, _)| i);
            if let Some(i) = best {
                return Buf { values: idle.swap_remove(i), len, pool: self };
            }
        }
        Buf { values: vec![0.0; len], len, pool: self }
    }
}

impl From<Vec<f32>> for Buf {
    fn from(values: Vec<f32>) -> Self {
        let len = values.len();
        Buf { values, len, pool: &POOL }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if self.values.len() >= MIN_LEN {
            let mut idle = self.pool.0.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < MAX_IDLE {
                idle.push(std::mem::take(&mut self.values));
            }
        }
    }
}

impl std::ops::Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.values[..self.len]
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
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
        let pool: &'static Pool = Box::leak(Box::new(Pool(Mutex::new(Vec::new()))));
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
}
