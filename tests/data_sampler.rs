//! DistributedSampler: PyTorch-style sharding over data-parallel ranks, SP groups, resume.

use std::collections::BTreeSet;

use ftrun::data::sampler::{DistributedSampler, SamplerState};

fn sampler(
    len: usize,
    rank: usize,
    world: usize,
    sp: usize,
    drop_last: bool,
) -> DistributedSampler {
    DistributedSampler::new(len, rank, world, sp, 7, true, drop_last).unwrap()
}

#[test]
fn same_config_same_indices() {
    let a = sampler(103, 2, 4, 1, false);
    let b = sampler(103, 2, 4, 1, false);
    assert_eq!(a.indices(3), b.indices(3));
    let other_seed = DistributedSampler::new(103, 2, 4, 1, 8, true, false).unwrap();
    assert_ne!(a.indices(3), other_seed.indices(3));
}

#[test]
fn dp_ranks_cover_everything_disjointly_with_equal_counts() {
    for (len, world) in [(100, 4), (103, 4), (5, 8), (1, 3), (64, 1)] {
        let per_rank: Vec<Vec<usize>> = (0..world)
            .map(|r| sampler(len, r, world, 1, false).indices(0))
            .collect();
        let count = len.div_ceil(world);
        assert!(
            per_rank.iter().all(|ix| ix.len() == count),
            "len {len} world {world}"
        );
        let all: Vec<usize> = per_rank.concat();
        let distinct: BTreeSet<usize> = all.iter().copied().collect();
        assert_eq!(distinct, (0..len).collect(), "every sample is used");
        // Only the wrap-around padding repeats samples.
        assert_eq!(all.len() - len, count * world - len);
        if len % world == 0 {
            assert_eq!(all.len(), distinct.len(), "disjoint when nothing is padded");
        }
    }
}

#[test]
fn padding_wraps_the_shuffled_order_like_pytorch() {
    // 10 samples, 4 ranks: order o0..o9 padded with o0, o1; rank r takes o[r], o[r+4], o[r+8].
    let order: Vec<usize> = (0..4)
        .flat_map(|r| {
            sampler(10, r, 4, 1, false)
                .indices(0)
                .into_iter()
                .enumerate()
                .map(move |(k, i)| (k * 4 + r, i))
        })
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_values()
        .collect();
    assert_eq!(order.len(), 12);
    assert_eq!(order[10], order[0]);
    assert_eq!(order[11], order[1]);
    let first_ten: BTreeSet<usize> = order[..10].iter().copied().collect();
    assert_eq!(first_ten.len(), 10);
}

#[test]
fn drop_last_truncates_to_equal_counts() {
    let per_rank: Vec<Vec<usize>> = (0..4)
        .map(|r| sampler(103, r, 4, 1, true).indices(1))
        .collect();
    assert!(per_rank.iter().all(|ix| ix.len() == 25));
    let distinct: BTreeSet<usize> = per_rank.concat().into_iter().collect();
    assert_eq!(distinct.len(), 100, "disjoint, 3 samples dropped");
    // Fewer samples than ranks: nothing at all, and iteration ends instead of spinning.
    let tiny = sampler(3, 0, 4, 1, true);
    assert!(tiny.indices(0).is_empty());
    assert_eq!(tiny.iter_from(SamplerState::default()).next(), None);
}

#[test]
fn sequence_parallel_groups_share_indices() {
    let (world, sp, len) = (8, 4, 50);
    let by_rank: Vec<Vec<usize>> = (0..world)
        .map(|r| sampler(len, r, world, sp, false).indices(2))
        .collect();
    // Ranks 0..4 are SP group 0, ranks 4..8 group 1.
    for r in 1..4 {
        assert_eq!(by_rank[r], by_rank[0]);
        assert_eq!(by_rank[4 + r], by_rank[4]);
    }
    assert_ne!(by_rank[0], by_rank[4]);
    // The two groups shard like a 2-rank data-parallel run.
    assert_eq!(by_rank[0], sampler(len, 0, 2, 1, false).indices(2));
    assert_eq!(by_rank[4], sampler(len, 1, 2, 1, false).indices(2));
    let s = sampler(len, 5, world, sp, false);
    assert_eq!((s.dp_rank(), s.dp_world(), s.per_rank()), (1, 2, 25));
}

#[test]
fn epochs_differ_and_unshuffled_is_in_order() {
    let s = sampler(200, 0, 2, 1, false);
    assert_ne!(s.indices(0), s.indices(1));
    let set0: BTreeSet<usize> = s.indices(0).into_iter().collect();
    let set1: BTreeSet<usize> = s.indices(1).into_iter().collect();
    assert_ne!(set0, set1, "shards are reshuffled, not just reordered");
    let plain = DistributedSampler::new(10, 1, 2, 1, 7, false, false).unwrap();
    assert_eq!(plain.indices(0), vec![1, 3, 5, 7, 9]);
    assert_eq!(plain.indices(5), vec![1, 3, 5, 7, 9]);
}

#[test]
fn resume_mid_epoch_equals_uninterrupted() {
    for rank in 0..3 {
        let s = sampler(31, rank, 3, 1, false);
        let uninterrupted: Vec<(SamplerState, usize)> =
            s.iter_from(SamplerState::default()).take(40).collect();
        // Epoch after epoch: 11 indices each, exactly indices(0), indices(1), ...
        let plain: Vec<usize> = (0..4).flat_map(|e| s.indices(e)).take(40).collect();
        assert_eq!(
            uninterrupted.iter().map(|&(_, i)| i).collect::<Vec<_>>(),
            plain
        );
        for cut in [1, 5, 10, 11, 12, 23] {
            let (state, _) = uninterrupted[cut - 1];
            // Serialize like a checkpoint would.
            let saved = serde_json::to_string(&state).unwrap();
            let restored: SamplerState = serde_json::from_str(&saved).unwrap();
            let resumed: Vec<(SamplerState, usize)> = sampler(31, rank, 3, 1, false)
                .iter_from(restored)
                .take(40 - cut)
                .collect();
            assert_eq!(resumed, uninterrupted[cut..], "rank {rank} cut {cut}");
        }
    }
    // An epoch's last index moves the state to the next epoch's start.
    let s = sampler(31, 0, 3, 1, false);
    let states: Vec<SamplerState> = s
        .iter_from(SamplerState::default())
        .take(11)
        .map(|(st, _)| st)
        .collect();
    assert_eq!(
        states[0],
        SamplerState {
            epoch: 0,
            position: 3
        }
    );
    assert_eq!(
        states[10],
        SamplerState {
            epoch: 1,
            position: 0
        }
    );
}

#[test]
fn resume_with_another_gpu_count_skips_exactly_what_was_trained() {
    let len = 40;
    // 4 dp ranks train 3 steps each: 12 samples consumed.
    let mut trained = BTreeSet::new();
    let mut state = SamplerState::default();
    for r in 0..4 {
        for (st, i) in sampler(len, r, 4, 1, false)
            .iter_from(SamplerState::default())
            .take(3)
        {
            trained.insert(i);
            state = st;
        }
    }
    assert_eq!(
        state,
        SamplerState {
            epoch: 0,
            position: 12
        }
    );
    // Resume the epoch on 3 dp ranks (6 GPUs with sp 2): each SP group's first rank.
    let rest: Vec<Vec<usize>> = (0..6)
        .step_by(2)
        .map(|r| {
            let mut out = Vec::new();
            for (st, i) in sampler(len, r, 6, 2, false).iter_from(state) {
                out.push(i);
                if st.epoch == 1 {
                    break; // that was the epoch's last index
                }
            }
            out
        })
        .collect();
    let counts: BTreeSet<usize> = rest.iter().map(Vec::len).collect();
    assert_eq!(counts.len(), 1, "equal counts per rank: {rest:?}");
    let untrained: BTreeSet<usize> = (0..len).filter(|i| !trained.contains(i)).collect();
    let remaining: BTreeSet<usize> = rest.concat().into_iter().collect();
    assert!(
        remaining.is_superset(&untrained),
        "every untrained sample comes"
    );
    // Beyond them only wrap-around padding (fewer than 3 extra).
    let total = rest.concat().len();
    assert!(
        total >= untrained.len() && total - untrained.len() < 3,
        "{total}"
    );
}

#[test]
fn bad_topology_is_rejected() {
    let err = DistributedSampler::new(10, 0, 6, 4, 0, true, false).unwrap_err();
    assert!(err.to_string().contains("sequence_parallel 4"), "{err}");
    let err = DistributedSampler::new(10, 8, 8, 1, 0, true, false).unwrap_err();
    assert!(err.to_string().contains("rank 8"), "{err}");
}
