//! Shuffled micro-batches over training sequences with a resumable cursor.

use super::examples::Sequence;
use crate::model::Batch;
use crate::rng::Rng;
use serde::{Deserialize, Serialize};

/// Where the loader stands: the epoch and the position in that epoch's shuffled order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub index: usize,
}

pub struct Loader {
    sequences: Vec<Sequence>,
    batch_size: usize,
    seed: u64,
    shuffle: bool,
    order: Vec<usize>,
    order_epoch: Option<u64>,
}

impl Loader {
    pub fn new(sequences: Vec<Sequence>, batch_size: usize, seed: u64, shuffle: bool) -> Self {
        assert!(batch_size > 0 && !sequences.is_empty());
        Loader { sequences, batch_size, seed, shuffle, order: Vec::new(), order_epoch: None }
    }

    pub fn len(&self) -> usize {
        self.sequences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    pub fn sequences(&self) -> &[Sequence] {
        &self.sequences
    }

    /// Micro-batches per epoch (the last one may be smaller).
    pub fn batches_per_epoch(&self) -> usize {
        self.sequences.len().div_ceil(self.batch_size)
    }

    fn order_for(&mut self, epoch: u64) -> &[usize] {
        if self.order_epoch != Some(epoch) {
            self.order = (0..self.sequences.len()).collect();
            if self.shuffle {
                // Each epoch's order depends only on (seed, epoch), so a resumed run sees the same one.
                Rng::new(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)).shuffle(&mut self.order);
            }
            self.order_epoch = Some(epoch);
        }
        &self.order
    }

    /// Trained tokens (targets) of the next `batches` micro-batches from `cursor`, without
    /// building them.
    pub fn trained_tokens_ahead(&mut self, mut cursor: Cursor, batches: usize) -> usize {
        let mut total = 0;
        for _ in 0..batches {
            if cursor.index >= self.sequences.len() {
                cursor = Cursor { epoch: cursor.epoch + 1, index: 0 };
            }
            let end = (cursor.index + self.batch_size).min(self.sequences.len());
            let order = self.order_for(cursor.epoch);
            let idx: Vec<usize> = order[cursor.index..end].to_vec();
            total += idx.iter().map(|&i| self.sequences[i].train.iter().skip(1).filter(|&&t| t).count()).sum::<usize>();
            cursor.index = end;
        }
        total
    }

    /// The next micro-batch, advancing `cursor` (into the next epoch at the end of one).
    pub fn next_batch(&mut self, cursor: &mut Cursor) -> Vec<Sequence> {
        if cursor.index >= self.sequences.len() {
            *cursor = Cursor { epoch: cursor.epoch + 1, index: 0 };
        }
        let bs = self.batch_size;
        let start = cursor.index;
        let end = (start + bs).min(self.sequences.len());
        let idx: Vec<usize> = self.order_for(cursor.epoch)[start..end].to_vec();
        cursor.index += idx.len();
        idx.into_iter().map(|i| self.sequences[i].clone()).collect()
    }
}

/// A right-padded batch and its shifted targets (`targets[t]` = the token at t+1 when it trains).
pub fn to_batch(seqs: &[Sequence], pad: u32) -> (Batch, Vec<Option<u32>>) {
    let rows: Vec<Vec<u32>> = seqs.iter().map(|s| s.ids.clone()).collect();
    let batch = Batch::right_padded(&rows, pad).expect("rows form a batch");
    let t = batch.seq_len;
    let mut targets = vec![None; batch.tokens.len()];
    for (b, s) in seqs.iter().enumerate() {
        for i in 0..s.ids.len().saturating_sub(1) {
            if s.train[i + 1] {
                targets[b * t + i] = Some(s.ids[i + 1]);
            }
        }
    }
    (batch, targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(n: usize) -> Vec<Sequence> {
        (0..n).map(|i| Sequence { ids: vec![i as u32; 1 + i % 3], train: vec![true; 1 + i % 3] }).collect()
    }

    #[test]
    fn epochs_cover_everything_and_resume_from_a_cursor() {
        let mut l = Loader::new(seqs(7), 3, 1, true);
        let mut c = Cursor::default();
        let mut seen: Vec<u32> = (0..3).flat_map(|_| l.next_batch(&mut c)).map(|s| s.ids[0]).collect();
        seen.sort();
        assert_eq!(seen, (0..7).collect::<Vec<_>>());
        assert_eq!(l.batches_per_epoch(), 3);
        let saved = c;
        let a: Vec<_> = (0..4).map(|_| l.next_batch(&mut c)).collect();
        let mut l2 = Loader::new(seqs(7), 3, 1, true);
        let mut c2 = saved;
        let b: Vec<_> = (0..4).map(|_| l2.next_batch(&mut c2)).collect();
        assert_eq!(a, b);
        assert_eq!(c.epoch, 2);
    }

    #[test]
    fn targets_are_shifted_train_flags() {
        let s = Sequence { ids: vec![5, 6, 7, 8], train: vec![false, false, true, true] };
        let short = Sequence { ids: vec![9, 10], train: vec![true, true] };
        let (b, t) = to_batch(&[s, short], 0);
        assert_eq!(b.seq_len, 4);
        assert_eq!(t, vec![None, Some(7), Some(8), None, Some(10), None, None, None]);
        assert_eq!(b.mask, vec![true, true, true, true, true, true, false, false]);
    }
}
