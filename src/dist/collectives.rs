//! The collective-communication interface the trainer codes against, and the world layout
//! (data-parallel x sequence-parallel groups).
//!
//! Every collective works on flat (1-D, or flattened) f32 tensors and fails with an error
//! naming the operation and the rank it waited on when a peer does not answer within the
//! communicator's timeout: a missing rank never stalls the job silently.

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor};

/// Collective operations over the ranks of one communicator (the world or a sub-group).
///
/// All ranks of the communicator must call the same collectives in the same order with
/// equally sized inputs. A communicator is used from one thread (NCCL's is not `Send`).
pub trait Collectives {
    /// This process's rank inside the communicator, `0..world()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the communicator.
    fn world(&self) -> usize;
    /// Element-wise sum over all ranks; every rank gets the same (bit-identical) result.
    /// Input and output: `[n]` f32.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Input `[world * n]`; returns this rank's shard `[n]` of the element-wise sum
    /// (shard r = elements `r*n..(r+1)*n`).
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Input `[n]` from every rank; returns `[world * n]`, rank r's input at `r*n..(r+1)*n`.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
    /// Returns `root`'s tensor on every rank (other ranks' inputs give only the shape).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    /// Input `[world * n]`: chunk j goes to rank j. Output `[world * n]`: chunk i came from
    /// rank i. The exchange Ulysses sequence parallelism needs.
    fn all_to_all(&self, t: &Tensor) -> Result<Tensor>;
    /// Returns once every rank entered the barrier.
    fn barrier(&self) -> Result<()>;
    /// A collective call of every rank: ranks passing the same `color` form a new
    /// communicator, ranked in the order of their rank here.
    fn split(&self, color: u64) -> Result<Box<dyn Collectives>>;
}

/// Out-of-band exchange of communicator ids (NCCL's 128-byte unique id): the leader makes
/// the id and publishes it under `key`, the other members fetch it. The coordinator's
/// [`crate::dist::worker::Worker`] implements it.
pub trait IdExchange {
    fn share(
        &self,
        key: &str,
        leader: bool,
        make: &mut dyn FnMut() -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>>;
}

/// How `world` ranks split into sequence-parallel (SP) and data-parallel (DP) groups.
///
/// SP groups are contiguous blocks of `sp` ranks (`[0..sp)`, `[sp..2sp)`, ...) so that a
/// sequence's shards stay on one node where possible; DP group k holds the ranks whose
/// position inside their SP block is k.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorldLayout {
    pub world: usize,
    pub sp: usize,
}

impl WorldLayout {
    pub fn new(world: usize, sp: usize) -> Result<Self> {
        ensure!(world >= 1, "world size must be at least 1, got {world}");
        ensure!(
            sp >= 1,
            "sequence-parallel size must be at least 1, got {sp}"
        );
        if world % sp != 0 {
            bail!("sequence-parallel size {sp} does not divide the world size {world}");
        }
        Ok(Self { world, sp })
    }

    /// Number of data-parallel replicas (= SP groups).
    pub fn dp(&self) -> usize {
        self.world / self.sp
    }

    /// The color (for [`Collectives::split`]) of `rank`'s SP group: its block index.
    pub fn sp_color(&self, rank: usize) -> u64 {
        (rank / self.sp) as u64
    }

    /// The color of `rank`'s DP group: its position inside its SP block.
    pub fn dp_color(&self, rank: usize) -> u64 {
        (rank % self.sp) as u64
    }

    /// The world ranks of SP group `color`, in group-rank order.
    pub fn sp_group(&self, color: u64) -> Vec<usize> {
        let start = color as usize * self.sp;
        (start..start + self.sp).collect()
    }

    /// The world ranks of DP group `color`, in group-rank order.
    pub fn dp_group(&self, color: u64) -> Vec<usize> {
        (0..self.dp())
            .map(|k| k * self.sp + color as usize)
            .collect()
    }

    /// Splits `world` into this rank's (dp, sp) communicators; every rank must call it.
    pub fn split(&self, world: &dyn Collectives) -> Result<Groups> {
        ensure!(
            world.world() == self.world,
            "layout is for {} ranks but the communicator has {}",
            self.world,
            world.world()
        );
        // Both splits are collective: every rank makes them in the same order.
        let sp = world.split(self.sp_color(world.rank()))?;
        let dp = world.split(self.dp_color(world.rank()))?;
        Ok(Groups { dp, sp })
    }
}

/// This rank's data-parallel and sequence-parallel communicators.
pub struct Groups {
    pub dp: Box<dyn Collectives>,
    pub sp: Box<dyn Collectives>,
}

/// The communicator of a single-process run: rank 0 of 1, every collective returns its input.
#[derive(Debug, Clone, Copy, Default)]
pub struct SoloComm;

impl Collectives for SoloComm {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_to_all(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn split(&self, _color: u64) -> Result<Box<dyn Collectives>> {
        Ok(Box::new(SoloComm))
    }
}

/// Sums f64 scalars over the ranks (through one f32 all-reduce: about 7 significant digits;
/// exact on one rank). Every rank gets the same values. `device` is where the communicator
/// takes its tensors (NCCL: the rank's GPU).
pub fn sum_f64s(
    comm: &dyn Collectives,
    values: &[f64],
    device: &candle_core::Device,
) -> Result<Vec<f64>> {
    if comm.world() == 1 {
        return Ok(values.to_vec());
    }
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    let t = Tensor::from_vec(v, values.len(), device)?;
    let sum = comm.all_reduce_sum(&t)?.to_vec1::<f32>()?;
    Ok(sum.into_iter().map(f64::from).collect())
}

/// Sums counts over the ranks exactly: each count is split into 12-bit digits so that the
/// f32 sums stay integers below 2^24 for up to 4096 ranks.
pub fn sum_counts(
    comm: &dyn Collectives,
    counts: &[u64],
    device: &candle_core::Device,
) -> Result<Vec<u64>> {
    if comm.world() == 1 {
        return Ok(counts.to_vec());
    }
    const DIGITS: usize = 6; // 72 bits >= any u64
    let mut v = Vec::with_capacity(counts.len() * DIGITS);
    for &c in counts {
        for d in 0..DIGITS {
            v.push(((c >> (12 * d)) & 0xfff) as f32);
        }
    }
    let n = v.len();
    let t = Tensor::from_vec(v, n, device)?;
    let sum = comm.all_reduce_sum(&t)?.to_vec1::<f32>()?;
    Ok(sum
        .chunks(DIGITS)
        .map(|digits| {
            digits
                .iter()
                .enumerate()
                .map(|(d, &x)| (x as u64) << (12 * d))
                .sum()
        })
        .collect())
}

/// The length a flat buffer of `len` elements is padded to so that it splits into `world`
/// equal shards (ZeRO-2 pads the flat gradient buffer this way before reduce-scatter).
pub fn padded_len(len: usize, world: usize) -> usize {
    len.div_ceil(world) * world
}

/// Checks that `t` is f32 and returns its elements as a flat vector; `op` names the caller.
pub(crate) fn flat_f32(t: &Tensor, op: &str) -> Result<Vec<f32>> {
    ensure!(
        t.dtype() == DType::F32,
        "{op}: collectives take f32 tensors, got {:?}",
        t.dtype()
    );
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Checks that a `[world * n]` input splits into equal chunks and returns n.
pub(crate) fn chunk_len(len: usize, world: usize, op: &str) -> Result<usize> {
    if len % world != 0 {
        bail!(
            "{op}: input has {len} elements, not a multiple of the world size {world} \
             (pad it to {} with collectives::padded_len)",
            padded_len(len, world)
        );
    }
    Ok(len / world)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_groups_are_contiguous_sp_blocks_and_strided_dp() {
        let l = WorldLayout::new(8, 2).unwrap();
        assert_eq!(l.dp(), 4);
        assert_eq!(l.sp_group(l.sp_color(5)), vec![4, 5]);
        assert_eq!(l.dp_group(l.dp_color(5)), vec![1, 3, 5, 7]);
        assert_eq!(l.dp_group(l.dp_color(4)), vec![0, 2, 4, 6]);
        let err = WorldLayout::new(6, 4).unwrap_err().to_string();
        assert!(err.contains("4 does not divide the world size 6"), "{err}");
    }

    #[test]
    fn padding_and_chunking() {
        assert_eq!(padded_len(10, 4), 12);
        assert_eq!(padded_len(12, 4), 12);
        assert_eq!(chunk_len(12, 4, "x").unwrap(), 3);
        let err = chunk_len(10, 4, "reduce_scatter").unwrap_err().to_string();
        assert!(
            err.contains("10 elements") && err.contains("pad it to 12"),
            "{err}"
        );
    }
}
