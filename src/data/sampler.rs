//! Which sequence each rank trains on, epoch by epoch, with exact mid-epoch resume.
//!
//! Like PyTorch's `DistributedSampler`, but over data-parallel ranks: the `sp` ranks of a
//! sequence-parallel group (a contiguous block of ranks) split one sequence between them, so
//! they all get the same indices. Each epoch's order is a ChaCha20 shuffle seeded with
//! `seed + epoch`; the order is padded by wrapping around (or truncated with `drop_last`) to a
//! multiple of the data-parallel world, and dp rank r takes positions r, r + dp_world, ...

use anyhow::{ensure, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

/// Where a rank is in the data: saved in checkpoints for resume.
///
/// `position` counts samples consumed in `epoch` by all data-parallel ranks together (an
/// offset into the epoch's padded order), so a run resumed with a different number of GPUs
/// still skips exactly what was trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    pub position: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistributedSampler {
    len: usize,
    rank: usize,
    world: usize,
    sp: usize,
    seed: u64,
    shuffle: bool,
    drop_last: bool,
}

impl DistributedSampler {
    /// `len` samples shared by `world` ranks in sequence-parallel groups of `sp`.
    pub fn new(
        len: usize,
        rank: usize,
        world: usize,
        sp: usize,
        seed: u64,
        shuffle: bool,
        drop_last: bool,
    ) -> Result<Self> {
        ensure!(world >= 1, "world size must be at least 1, got {world}");
        ensure!(
            rank < world,
            "rank {rank} must be below the world size {world}"
        );
        ensure!(
            sp >= 1 && world % sp == 0,
            "sequence_parallel {sp} must be at least 1 and divide the world size {world}"
        );
        Ok(DistributedSampler {
            len,
            rank,
            world,
            sp,
            seed,
            shuffle,
            drop_last,
        })
    }

    /// Index of this rank's sequence-parallel group among the data-parallel ranks.
    pub fn dp_rank(&self) -> usize {
        self.rank / self.sp
    }

    /// Number of data-parallel ranks (sequence-parallel groups).
    pub fn dp_world(&self) -> usize {
        self.world / self.sp
    }

    /// Number of samples in the dataset.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Indices each rank gets per epoch (the same on every rank).
    pub fn per_rank(&self) -> usize {
        self.epoch_size() / self.dp_world()
    }

    /// Length of an epoch's padded (or truncated) order, a multiple of `dp_world`.
    fn epoch_size(&self) -> usize {
        rounded(self.len, self.dp_world(), self.drop_last)
    }

    /// The epoch's order of all samples before padding.
    fn permutation(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            order.shuffle(&mut ChaCha20Rng::seed_from_u64(
                self.seed.wrapping_add(epoch),
            ));
        }
        order
    }

    /// The global order of `epoch` from offset `start` on, padded or truncated so that every
    /// dp rank gets the same count.
    fn global_order_from(&self, epoch: u64, start: usize) -> Vec<usize> {
        let full = wrap_to(&self.permutation(epoch), self.epoch_size());
        let rest = &full[start.min(full.len())..];
        // Equal already unless `start` came from a run with another dp world size.
        wrap_to(rest, rounded(rest.len(), self.dp_world(), self.drop_last))
    }

    /// This rank's indices for `epoch`, in order.
    pub fn indices(&self, epoch: u64) -> Vec<usize> {
        self.indices_from(SamplerState { epoch, position: 0 })
    }

    fn indices_from(&self, state: SamplerState) -> Vec<usize> {
        self.global_order_from(state.epoch, state.position)
            .into_iter()
            .skip(self.dp_rank())
            .step_by(self.dp_world())
            .collect()
    }

    /// This rank's indices from `state` on, through this and all following epochs, each with
    /// the state after it: save that state and `iter_from` it to continue exactly there. After
    /// an epoch's last index the state is `(epoch + 1, 0)`. Empty when an epoch holds no
    /// index for any rank (`drop_last` with fewer samples than dp ranks).
    pub fn iter_from(&self, state: SamplerState) -> SamplerIter<'_> {
        SamplerIter {
            sampler: self,
            current: self.indices_from(state).into_iter(),
            state,
        }
    }
}

/// Iterator of [`DistributedSampler::iter_from`].
pub struct SamplerIter<'a> {
    sampler: &'a DistributedSampler,
    current: std::vec::IntoIter<usize>,
    state: SamplerState,
}

impl Iterator for SamplerIter<'_> {
    type Item = (SamplerState, usize);

    fn next(&mut self) -> Option<Self::Item> {
        if self.current.as_slice().is_empty() {
            if self.sampler.per_rank() == 0 {
                return None;
            }
            self.state = SamplerState {
                epoch: self.state.epoch + 1,
                position: 0,
            };
            self.current = self.sampler.indices_from(self.state).into_iter();
        }
        let index = self.current.next()?;
        self.state.position += self.sampler.dp_world();
        if self.current.as_slice().is_empty() {
            self.state = SamplerState {
                epoch: self.state.epoch + 1,
                position: 0,
            };
            self.current = self.sampler.indices_from(self.state).into_iter();
        }
        Some((self.state, index))
    }
}

/// `n` rounded to a multiple of `m`: down with `drop_last` (PyTorch drops the tail), else up.
fn rounded(n: usize, m: usize, drop_last: bool) -> usize {
    if drop_last {
        n / m * m
    } else {
        n.div_ceil(m) * m
    }
}

/// The first `n` items of `items` repeated (PyTorch pads by wrapping around).
fn wrap_to(items: &[usize], n: usize) -> Vec<usize> {
    if items.is_empty() {
        return Vec::new();
    }
    items.iter().copied().cycle().take(n).collect()
}
