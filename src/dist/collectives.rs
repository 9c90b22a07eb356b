//! The collective-communication interface the trainer codes against, and the world layout
//! (data-parallel x sequence-parallel groups).
//!
//! Every collective works on flat (1-D, or flattened) f32 tensors and fails with an error
//! naming the operation and the rank it waited on when a peer does not answer within the
//! communicator's timeout: a missing rank never stalls the job silently.

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;

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

    /// ZeRO-2's gradient reduction of one bucket `[b]` f32 (a view of the flat gradient): for
    /// every piece, the sum over the ranks of `bucket[piece.range]` is written into the
    /// piece's owner's `shard` (`[S]` f32, in place) at `piece.shard_offset`; other ranks'
    /// `shard` elements are not touched. Every rank passes the same pieces.
    ///
    /// May return before the work is done (NCCL queues it on the communication stream): until
    /// [`Collectives::join`], `bucket`'s values must not change and `shard` must not be read.
    /// The communicator keeps both tensors alive until then.
    ///
    /// The default (CPU backends) all-reduces the bucket and copies the owned pieces out:
    /// twice the traffic of a reduce, which CPU runs (tests, a few MiB) do not notice.
    fn reduce_sum_pieces(&self, bucket: &Tensor, pieces: &[Piece], shard: &Tensor) -> Result<()> {
        let sum = self.all_reduce_sum(bucket)?; // [b]
        for p in pieces.iter().filter(|p| p.owner == self.rank()) {
            shard.slice_set(
                &sum.narrow(0, p.range.start, p.range.len())?,
                0,
                p.shard_offset,
            )?;
        }
        Ok(())
    }

    /// All-gather into a given buffer: `part` `[n]` from every rank lands in `out`
    /// `[world * n]` (same dtype, f32 or a half type, contiguous) at `rank * n`, in place.
    /// NCCL moves the dtype's bytes (a bf16 replica moves half the bytes of f32); the
    /// default goes through [`Collectives::all_gather`] in f32 (exact for half types).
    fn all_gather_into(&self, part: &Tensor, out: &Tensor) -> Result<()> {
        ensure!(
            part.dtype() == out.dtype() && out.elem_count() == part.elem_count() * self.world(),
            "all_gather_into: {:?} {:?} parts of {} ranks do not fill {:?} {:?}",
            part.dims(),
            part.dtype(),
            self.world(),
            out.dims(),
            out.dtype()
        );
        let full = self.all_gather(&part.flatten_all()?.to_dtype(DType::F32)?)?; // [world * n]
        out.slice_set(&full.to_dtype(out.dtype())?.reshape(out.shape())?, 0, 0)?;
        Ok(())
    }

    /// Waits on the host until every operation issued so far has completed, failing (and
    /// marking the communicator unusable) after the communicator's timeout: the watchdog of
    /// the asynchronous backends. `what` names the caller in the error. The CPU backends
    /// complete every operation before returning.
    fn join(&self, what: &str) -> Result<()> {
        let _ = what;
        Ok(())
    }

    /// Sums small f32 vectors over the ranks and returns them on the host (the counts and
    /// scalars of a step). `device` is where the communicator takes its tensors.
    fn sum_to_host(&self, values: &[f32], device: &Device) -> Result<Vec<f32>> {
        let t = Tensor::from_slice(values, values.len(), device)?;
        let sum = self.all_reduce_sum(&t)?;
        // The watchdog before the copy to the host (which would wait without a timeout).
        self.join("sum_to_host")?;
        Ok(sum.to_vec1::<f32>()?)
    }
}

/// One rank's share of a ZeRO-2 gradient bucket (see [`Collectives::reduce_sum_pieces`]):
/// bucket elements `range` belong to rank `owner`'s shard, starting at `shard_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub owner: usize,
    pub range: Range<usize>,
    pub shard_offset: usize,
}

/// The pieces of the flat-buffer range `lo..hi` when rank r owns `r*shard_len..(r+1)*shard_len`:
/// one per shard the range intersects, in rank order, ranges relative to `lo`.
pub fn bucket_pieces(lo: usize, hi: usize, shard_len: usize) -> Vec<Piece> {
    assert!(shard_len > 0, "ZeRO shards hold at least one element");
    let mut pieces = vec![];
    let mut at = lo;
    while at < hi {
        let owner = at / shard_len;
        let end = ((owner + 1) * shard_len).min(hi);
        pieces.push(Piece {
            owner,
            range: at - lo..end - lo,
            shard_offset: at - owner * shard_len,
        });
        at = end;
    }
    pieces
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
    let sum = comm.sum_to_host(&v, device)?;
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
    let sum = comm.sum_to_host(&v, device)?;
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

    /// Buckets of any size tile `0..n` and their pieces cover every rank's shard exactly
    /// once up to `n` (the padding tail beyond `n` is never sent).
    #[test]
    fn bucket_pieces_cover_each_shard_once() {
        for (n, world, bucket) in [(13, 2, 3), (13, 3, 1), (13, 3, 100), (7, 4, 2), (29, 5, 4)] {
            let padded = padded_len(n, world);
            let s = padded / world;
            let mut hits = vec![vec![0u32; s]; world];
            let mut lo = 0;
            while lo < n {
                let hi = (lo + bucket).min(n);
                let pieces = bucket_pieces(lo, hi, s);
                // The pieces tile the bucket in order.
                let mut at = 0;
                for p in &pieces {
                    assert_eq!(p.range.start, at, "n {n} world {world} bucket {bucket}");
                    assert!(p.owner < world && p.shard_offset + p.range.len() <= s);
                    for k in 0..p.range.len() {
                        // Element lo + range.start + k is shard element shard_offset + k.
                        assert_eq!(lo + p.range.start + k, p.owner * s + p.shard_offset + k);
                        hits[p.owner][p.shard_offset + k] += 1;
                    }
                    at = p.range.end;
                }
                assert_eq!(at, hi - lo);
                lo = hi;
            }
            for (r, h) in hits.iter().enumerate() {
                for (i, &c) in h.iter().enumerate() {
                    let expected = u32::from(r * s + i < n);
                    assert_eq!(
                        c, expected,
                        "n {n} world {world} bucket {bucket} rank {r} [{i}]"
                    );
                }
            }
        }
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
