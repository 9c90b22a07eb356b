//! Packing tokenized samples into fixed-budget sequences for varlen attention.
//!
//! A packed sequence holds several samples (or pieces of samples) back to back. `cu_seqlens`
//! marks where each piece starts and ends so attention never crosses a piece boundary, and
//! `position_ids` restart at 0 for every piece, as XTuner's `Packer` with `use_varlen_attn`.
//!
//! Labels are concatenated unchanged, exactly as XTuner does: the loss shifts labels by one
//! over the whole packed sequence, so the first label of piece k+1 becomes the target of the
//! last token of piece k. For chat samples that first label is IGNORE_INDEX (BOS or prompt
//! tokens are never trained), and position 0 of a sequence is never a target after the shift,
//! so a piece continued from the previous sequence loses its first target just as in XTuner.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::{Encoded, IGNORE_INDEX};

/// How samples are put into sequences of at most `max_length` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackMode {
    /// XTuner's `Packer`: concatenate all samples and cut the stream into `max_length` chunks;
    /// a sample may continue in the next chunk.
    Split,
    /// Never split a sample: first-fit decreasing bin packing.
    Whole,
}

/// One training sequence: one or more pieces of samples back to back.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PackedSeq {
    pub input_ids: Vec<u32>,
    /// Per-position targets before the next-token shift (IGNORE_INDEX = not trained).
    pub labels: Vec<i32>,
    /// Restart at 0 at every piece start.
    pub position_ids: Vec<u32>,
    /// Piece boundaries: `[0, end_1, ..., len]`; piece j covers `cu_seqlens[j]..cu_seqlens[j+1]`.
    pub cu_seqlens: Vec<u32>,
}

impl PackedSeq {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of positions with a label (before the shift).
    pub fn trained(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }

    /// Length of the longest piece (flash-attn varlen's `max_seqlen`).
    pub fn max_seqlen(&self) -> u32 {
        self.cu_seqlens
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0)
    }

    /// Appends one piece (a whole sample or a part of one) as a new attention segment.
    fn push_piece(&mut self, input_ids: &[u32], labels: &[i32]) {
        debug_assert_eq!(input_ids.len(), labels.len());
        if input_ids.is_empty() {
            return;
        }
        if self.cu_seqlens.is_empty() {
            self.cu_seqlens.push(0);
        }
        self.input_ids.extend_from_slice(input_ids);
        self.labels.extend_from_slice(labels);
        self.position_ids.extend(0..input_ids.len() as u32);
        self.cu_seqlens.push(self.input_ids.len() as u32);
    }

    fn from_piece(input_ids: &[u32], labels: &[i32]) -> Self {
        let mut seq = PackedSeq::default();
        seq.push_piece(input_ids, labels);
        seq
    }
}

/// What packing left out (only `Split` drops anything).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PackStats {
    /// Tokens of the final partial chunk that XTuner's Packer discards.
    pub tail_tokens_dropped: usize,
    /// Trained labels among them.
    pub tail_trained_dropped: usize,
}

/// Packs `samples` into sequences of at most `max_length` tokens.
///
/// Empty samples are skipped. `shuffle_before_pack` shuffles the sample order first with a
/// ChaCha20 generator seeded by `seed` (XTuner shuffles the dataset before packing by default).
/// See [`pack_with_stats`] for what `Split` drops at the end.
pub fn pack(
    samples: Vec<Encoded>,
    max_length: usize,
    mode: PackMode,
    shuffle_before_pack: bool,
    seed: u64,
) -> Vec<PackedSeq> {
    pack_with_stats(samples, max_length, mode, shuffle_before_pack, seed).0
}

/// [`pack`], also reporting the dropped tail.
///
/// `Split` follows XTuner 0.2.0's `Packer`: when the concatenated stream holds at least one
/// full chunk, the remainder shorter than `max_length` is discarded (it stays in the packer's
/// residual and is never emitted); when the whole stream is shorter than `max_length`, it
/// becomes one short sequence. `Whole` keeps every token: a sample longer than `max_length`
/// (which the tokenizing stage should already have truncated) is cut into `max_length` pieces
/// that are packed as separate items.
///
/// # Panics
/// If `max_length` is 0 or does not fit in u32 (a configuration error caught at load time).
pub fn pack_with_stats(
    mut samples: Vec<Encoded>,
    max_length: usize,
    mode: PackMode,
    shuffle_before_pack: bool,
    seed: u64,
) -> (Vec<PackedSeq>, PackStats) {
    assert!(
        max_length > 0 && u32::try_from(max_length).is_ok(),
        "pack: max_length must be in 1..=u32::MAX, got {max_length}"
    );
    samples.retain(|s| !s.input_ids.is_empty());
    if shuffle_before_pack {
        samples.shuffle(&mut ChaCha20Rng::seed_from_u64(seed));
    }
    match mode {
        PackMode::Split => pack_split(&samples, max_length),
        PackMode::Whole => (pack_whole(&samples, max_length), PackStats::default()),
    }
}

/// One sample per sequence, in the given order (`pack = false`); empty samples are skipped.
pub fn unpacked(samples: Vec<Encoded>) -> Vec<PackedSeq> {
    samples
        .iter()
        .filter(|s| !s.input_ids.is_empty())
        .map(|s| PackedSeq::from_piece(&s.input_ids, &s.labels))
        .collect()
}

/// Real tokens / (sequences * max_length); 0 when there are no sequences.
pub fn efficiency(seqs: &[PackedSeq], max_length: usize) -> f64 {
    let capacity = seqs.len() as f64 * max_length as f64;
    if capacity == 0.0 {
        return 0.0;
    }
    let tokens: usize = seqs.iter().map(PackedSeq::len).sum();
    tokens as f64 / capacity
}

fn pack_split(samples: &[Encoded], max_length: usize) -> (Vec<PackedSeq>, PackStats) {
    let total: usize = samples.iter().map(|s| s.input_ids.len()).sum();
    // XTuner emits the stream as one short chunk when it never fills a chunk, and otherwise
    // only the full chunks.
    let kept = if total < max_length {
        total
    } else {
        total / max_length * max_length
    };

    let mut seqs = Vec::with_capacity(kept.div_ceil(max_length));
    let mut current = PackedSeq::default();
    let mut emitted = 0usize; // tokens placed into sequences so far
    let mut stats = PackStats::default();
    for sample in samples {
        let mut start = 0;
        while start < sample.input_ids.len() {
            if emitted == kept {
                let rest = &sample.labels[start..];
                stats.tail_tokens_dropped += rest.len();
                stats.tail_trained_dropped += rest.iter().filter(|&&l| l != IGNORE_INDEX).count();
                break;
            }
            let room = max_length - current.len();
            let end = sample
                .input_ids
                .len()
                .min(start + room)
                .min(start + kept - emitted);
            current.push_piece(&sample.input_ids[start..end], &sample.labels[start..end]);
            emitted += end - start;
            start = end;
            if current.len() == max_length || emitted == kept {
                seqs.push(std::mem::take(&mut current));
            }
        }
    }
    (seqs, stats)
}

fn pack_whole(samples: &[Encoded], max_length: usize) -> Vec<PackedSeq> {
    // Items to pack: whole samples, or max_length pieces of an over-long one.
    let mut items: Vec<(&[u32], &[i32])> = samples
        .iter()
        .flat_map(|s| {
            s.input_ids
                .chunks(max_length)
                .zip(s.labels.chunks(max_length))
        })
        .collect();
    // Decreasing length; stable, so equal lengths keep the (possibly shuffled) order.
    items.sort_by_key(|(ids, _)| std::cmp::Reverse(ids.len()));

    let mut bins = FirstFit::new(items.len(), max_length);
    let mut seqs: Vec<PackedSeq> = Vec::new();
    for (ids, labels) in items {
        let bin = bins.place(ids.len());
        if bin == seqs.len() {
            seqs.push(PackedSeq::default());
        }
        seqs[bin].push_piece(ids, labels);
    }
    seqs
}

/// First-fit bin choice in O(log n): a max segment tree over the bins' remaining room, where
/// not-yet-opened bins have full room, so the leftmost fitting leaf is the first-fit bin.
struct FirstFit {
    leaves: usize,
    /// `room[1]` is the root; leaf i is at `leaves + i`.
    room: Vec<usize>,
}

impl FirstFit {
    fn new(max_bins: usize, capacity: usize) -> Self {
        let leaves = max_bins.max(1).next_power_of_two();
        FirstFit {
            leaves,
            room: vec![capacity; 2 * leaves],
        }
    }

    /// Index of the first bin with room for `size` (size <= capacity), taking that room.
    fn place(&mut self, size: usize) -> usize {
        debug_assert!(self.room[1] >= size, "FirstFit sized for every item");
        let mut node = 1;
        while node < self.leaves {
            node = if self.room[2 * node] >= size {
                2 * node
            } else {
                2 * node + 1
            };
        }
        self.room[node] -= size;
        let bin = node - self.leaves;
        node /= 2;
        while node >= 1 {
            self.room[node] = self.room[2 * node].max(self.room[2 * node + 1]);
            node /= 2;
        }
        bin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_picks_leftmost_bin_with_room() {
        let mut ff = FirstFit::new(5, 10);
        assert_eq!(ff.place(7), 0);
        assert_eq!(ff.place(5), 1);
        assert_eq!(ff.place(3), 0); // bin 0 has exactly 3 left
        assert_eq!(ff.place(4), 1);
        assert_eq!(ff.place(2), 2);
        assert_eq!(ff.place(1), 1);
    }
}
