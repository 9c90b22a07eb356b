//! Packing (against XTuner 0.2.0's Packer) and the memory-mapped dataset cache.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::bail;
use ftrun::data::cache::{cache_key, load_or_build, load_or_build_with_timeout, DataReport};
use ftrun::data::pack::{efficiency, pack, pack_with_stats, unpacked, PackMode, PackedSeq};
use ftrun::data::{Encoded, IGNORE_INDEX};
use serde_json::Value;

/// Samples with globally unique token ids (1, 2, 3, ...) so every token can be traced;
/// the first `len / 3` positions of each are untrained prompt tokens.
fn samples(lengths: &[usize]) -> Vec<Encoded> {
    let mut next = 1u32;
    lengths
        .iter()
        .map(|&n| {
            let input_ids: Vec<u32> = (next..next + n as u32).collect();
            next += n as u32;
            let labels = input_ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i < n / 3 { IGNORE_INDEX } else { t as i32 })
                .collect();
            Encoded { input_ids, labels }
        })
        .collect()
}

/// Checks cu_seqlens/position_ids agree and returns the pieces as (ids, labels).
fn pieces(seq: &PackedSeq) -> Vec<(Vec<u32>, Vec<i32>)> {
    let n = seq.len();
    assert_eq!(seq.labels.len(), n);
    assert_eq!(seq.position_ids.len(), n);
    assert_eq!(seq.cu_seqlens.first(), Some(&0));
    assert_eq!(seq.cu_seqlens.last(), Some(&(n as u32)));
    seq.cu_seqlens
        .windows(2)
        .map(|w| {
            let (a, b) = (w[0] as usize, w[1] as usize);
            assert!(a < b, "empty piece in {:?}", seq.cu_seqlens);
            let expected_pos: Vec<u32> = (0..(b - a) as u32).collect();
            assert_eq!(
                seq.position_ids[a..b],
                expected_pos[..],
                "positions restart per piece"
            );
            (seq.input_ids[a..b].to_vec(), seq.labels[a..b].to_vec())
        })
        .collect()
}

/// Every (token, label) pair of the packed output, sorted, to compare with the input's.
fn token_multiset(seqs: &[PackedSeq]) -> Vec<(u32, i32)> {
    let mut all: Vec<(u32, i32)> = seqs
        .iter()
        .flat_map(|s| s.input_ids.iter().copied().zip(s.labels.iter().copied()))
        .collect();
    all.sort_unstable();
    all
}

fn input_multiset(samples: &[Encoded]) -> Vec<(u32, i32)> {
    let mut all: Vec<(u32, i32)> = samples
        .iter()
        .flat_map(|s| s.input_ids.iter().copied().zip(s.labels.iter().copied()))
        .collect();
    all.sort_unstable();
    all
}

fn as_u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("u32") as u32)
        .collect()
}

fn as_i32s(v: &Value) -> Vec<i32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("i32") as i32)
        .collect()
}

#[test]
fn split_matches_xtuner_packer() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pack/xtuner_packer.json");
    let fixture: Value =
        serde_json::from_str(&fs::read_to_string(path).expect("fixture")).expect("fixture JSON");
    let cases = fixture["cases"].as_array().expect("cases");
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let max_length = case["max_length"].as_u64().expect("max_length") as usize;
        let samples: Vec<Encoded> = case["samples"]
            .as_array()
            .expect("samples")
            .iter()
            .map(|s| Encoded {
                input_ids: as_u32s(&s["input_ids"]),
                labels: as_i32s(&s["labels"]),
            })
            .collect();
        let expected: Vec<PackedSeq> = case["packed"]
            .as_array()
            .expect("packed")
            .iter()
            .map(|p| PackedSeq {
                input_ids: as_u32s(&p["input_ids"]),
                labels: as_i32s(&p["labels"]),
                position_ids: as_u32s(&p["position_ids"]),
                cu_seqlens: as_u32s(&p["cumulative_len"]),
            })
            .collect();
        let got = pack(samples, max_length, PackMode::Split, false, 0);
        assert_eq!(got, expected, "case {name}");
    }
}

#[test]
fn split_cuts_samples_across_chunks_and_drops_only_the_tail() {
    // 33 tokens, max_length 8: 4 chunks; the 6-token sample is cut between chunks 3 and 4,
    // and the last token of the 7-token sample is the dropped tail.
    let input = samples(&[3, 5, 8, 4, 6, 7]);
    let (seqs, stats) = pack_with_stats(input.clone(), 8, PackMode::Split, false, 0);
    assert_eq!(seqs.len(), 4);
    assert!(seqs.iter().all(|s| s.len() == 8));
    let cu: Vec<Vec<u32>> = seqs.iter().map(|s| s.cu_seqlens.clone()).collect();
    assert_eq!(
        cu,
        vec![vec![0, 3, 8], vec![0, 8], vec![0, 4, 8], vec![0, 2, 8]]
    );
    // The continued piece restarts its positions.
    assert_eq!(seqs[3].position_ids, vec![0, 1, 0, 1, 2, 3, 4, 5]);
    // The stream in order, minus the tail, is exactly what the chunks hold.
    let stream: Vec<u32> = input.iter().flat_map(|s| s.input_ids.clone()).collect();
    let packed: Vec<u32> = seqs.iter().flat_map(|s| s.input_ids.clone()).collect();
    assert_eq!(packed, stream[..32]);
    assert_eq!(stats.tail_tokens_dropped, 1);
    assert_eq!(stats.tail_trained_dropped, 1);
    // Labels are carried unchanged: the first label of each piece is the sample's own.
    for seq in &seqs {
        for (ids, labels) in pieces(seq) {
            let original = input
                .iter()
                .find(|s| s.input_ids.contains(&ids[0]))
                .unwrap();
            let at = original
                .input_ids
                .iter()
                .position(|&t| t == ids[0])
                .unwrap();
            assert_eq!(labels[..], original.labels[at..at + labels.len()]);
        }
    }
}

#[test]
fn split_keeps_a_short_stream_as_one_sequence() {
    let input = samples(&[2, 3, 1]);
    let (seqs, stats) = pack_with_stats(input.clone(), 16, PackMode::Split, true, 9);
    assert_eq!(seqs.len(), 1);
    assert_eq!(stats.tail_tokens_dropped, 0);
    assert_eq!(token_multiset(&seqs), input_multiset(&input));
}

#[test]
fn whole_never_splits_and_loses_nothing() {
    let lengths: Vec<usize> = (0..200).map(|i| 1 + (i * 37 + 11) % 64).collect();
    let input = samples(&lengths);
    let max_length = 64;
    let seqs = pack(input.clone(), max_length, PackMode::Whole, true, 3);
    assert_eq!(
        token_multiset(&seqs),
        input_multiset(&input),
        "no token lost or duplicated"
    );
    let mut seen = 0;
    for seq in &seqs {
        assert!(seq.len() <= max_length);
        for (ids, labels) in pieces(seq) {
            // Each piece is exactly one whole input sample.
            let original = input.iter().find(|s| s.input_ids[0] == ids[0]).unwrap();
            assert_eq!(ids, original.input_ids);
            assert_eq!(labels, original.labels);
            seen += 1;
        }
    }
    assert_eq!(seen, input.len());
    // First-fit decreasing is within 11/9 OPT + 1; OPT >= ceil(total / max_length).
    let total: usize = lengths.iter().sum();
    let lower_bound = total.div_ceil(max_length);
    assert!(
        seqs.len() <= lower_bound * 11 / 9 + 1,
        "{} bins",
        seqs.len()
    );
    assert!(efficiency(&seqs, max_length) > 0.8);
}

#[test]
fn whole_uses_first_fit_decreasing() {
    // Sorted: 6 5 4 3 2 -> bins [6,4] (room 0), [5,3,2] (room 0) with capacity 10.
    let seqs = pack(samples(&[2, 4, 6, 3, 5]), 10, PackMode::Whole, false, 0);
    let lens: Vec<Vec<u32>> = seqs
        .iter()
        .map(|s| s.cu_seqlens.windows(2).map(|w| w[1] - w[0]).collect())
        .collect();
    assert_eq!(lens, vec![vec![6, 4], vec![5, 3, 2]]);
    assert_eq!(efficiency(&seqs, 10), 1.0);
}

#[test]
fn whole_cuts_an_overlong_sample_instead_of_exceeding_max_length() {
    let input = samples(&[25, 3]);
    let seqs = pack(input.clone(), 10, PackMode::Whole, false, 0);
    assert!(seqs.iter().all(|s| s.len() <= 10));
    assert_eq!(token_multiset(&seqs), input_multiset(&input));
}

#[test]
fn unpacked_is_one_sample_per_sequence_in_order() {
    let mut input = samples(&[4, 1, 7]);
    input.insert(1, Encoded::default()); // empty samples are skipped
    let seqs = unpacked(input.clone());
    assert_eq!(seqs.len(), 3);
    for (seq, sample) in seqs
        .iter()
        .zip(input.iter().filter(|s| !s.input_ids.is_empty()))
    {
        assert_eq!(seq.input_ids, sample.input_ids);
        assert_eq!(seq.labels, sample.labels);
        assert_eq!(seq.cu_seqlens, vec![0, sample.input_ids.len() as u32]);
        assert_eq!(pieces(seq).len(), 1);
    }
    assert_eq!(seqs[0].trained(), 3);
}

#[test]
fn efficiency_is_real_tokens_over_capacity() {
    let seqs = unpacked(samples(&[4, 1, 7]));
    assert!((efficiency(&seqs, 8) - 12.0 / 24.0).abs() < 1e-12);
    assert_eq!(efficiency(&[], 8), 0.0);
}

#[test]
fn shuffle_is_deterministic_per_seed() {
    let input = samples(&(1..60).map(|i| i % 13 + 1).collect::<Vec<_>>());
    for mode in [PackMode::Split, PackMode::Whole] {
        let a = pack(input.clone(), 32, mode, true, 42);
        let b = pack(input.clone(), 32, mode, true, 42);
        let c = pack(input.clone(), 32, mode, true, 43);
        let unshuffled = pack(input.clone(), 32, mode, false, 42);
        assert_eq!(a, b, "{mode:?}: same seed, same packing");
        assert_ne!(a, c, "{mode:?}: another seed, another order");
        assert_ne!(a, unshuffled, "{mode:?}: shuffling changes the order");
    }
    // Split with shuffle still loses nothing but the tail.
    let (seqs, stats) = pack_with_stats(input.clone(), 32, PackMode::Split, true, 42);
    let total: usize = input.iter().map(|s| s.input_ids.len()).sum();
    assert_eq!(seqs.len() * 32 + stats.tail_tokens_dropped, total);
}

// ---- cache ----

fn report_for(seqs: &[PackedSeq], max_length: usize) -> DataReport {
    DataReport {
        records_read: 10,
        dropped: BTreeMap::from([("too_long".to_string(), 1)]),
        samples: 9,
        tokens: seqs.iter().map(PackedSeq::len).sum(),
        trained_tokens: seqs.iter().map(PackedSeq::trained).sum(),
        sequences: seqs.len(),
        efficiency: efficiency(seqs, max_length),
        max_length,
    }
}

fn build_fixture() -> (Vec<PackedSeq>, DataReport) {
    let seqs = pack(
        samples(&[5, 9, 3, 12, 7, 1, 30]),
        16,
        PackMode::Whole,
        true,
        1,
    );
    let report = report_for(&seqs, 16);
    (seqs, report)
}

fn cache_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    names.sort();
    names
}

#[test]
fn cache_round_trip_and_reuse() {
    let dir = tempfile::tempdir().unwrap();
    let key = cache_key(&[b"data.jsonl", b"template=internlm2_chat", b"max_length=16"]);
    let (seqs, report) = build_fixture();
    let (ds, got_report, cached) =
        load_or_build(dir.path(), &key, || Ok((seqs.clone(), report.clone()))).unwrap();
    assert!(!cached);
    assert_eq!(got_report, report);
    assert_eq!(ds.report(), &report);
    assert_eq!(ds.len(), seqs.len());
    assert_eq!(ds.tokens(), seqs.iter().map(PackedSeq::len).sum::<usize>());
    for (i, seq) in seqs.iter().enumerate() {
        assert_eq!(&ds.get_owned(i), seq);
        assert_eq!(ds.get(i).len(), ds.seq_len(i));
    }
    assert_eq!(
        cache_files(dir.path()),
        vec![format!("pack-{key}.bin"), format!("pack-{key}.json")]
    );
    let sidecar: DataReport =
        serde_json::from_slice(&fs::read(dir.path().join(format!("pack-{key}.json"))).unwrap())
            .unwrap();
    assert_eq!(sidecar, report);
    drop(ds);

    // Same key: reused, the build closure is not called.
    let (ds, got_report, cached) =
        load_or_build(dir.path(), &key, || bail!("must not rebuild")).unwrap();
    assert!(cached);
    assert_eq!(got_report, report);
    assert_eq!(ds.get_owned(seqs.len() - 1), seqs[seqs.len() - 1]);

    // Another key: built anew next to it.
    let other = cache_key(&[b"data.jsonl", b"template=internlm2_chat", b"max_length=32"]);
    assert_ne!(other, key);
    let mut calls = 0;
    let (ds2, _, cached) = load_or_build(dir.path(), &other, || {
        calls += 1;
        let seqs = pack(samples(&[4, 4]), 32, PackMode::Whole, false, 0);
        let report = report_for(&seqs, 32);
        Ok((seqs, report))
    })
    .unwrap();
    assert!(!cached);
    assert_eq!(calls, 1);
    assert_eq!(ds2.len(), 1);
    assert_eq!(ds2.get(0).cu_seqlens, &[0, 4, 8]);
}

#[test]
fn empty_dataset_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let (ds, _, cached) = load_or_build(dir.path(), "empty", || {
        Ok((Vec::new(), DataReport::default()))
    })
    .unwrap();
    assert!(!cached);
    assert!(ds.is_empty());
    assert_eq!(ds.tokens(), 0);
}

#[test]
fn failed_build_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_or_build(dir.path(), "abc", || bail!("tokenizer exploded")).unwrap_err();
    assert!(format!("{err:#}").contains("tokenizer exploded"), "{err:#}");
    assert!(
        cache_files(dir.path()).is_empty(),
        "{:?}",
        cache_files(dir.path())
    );

    // A build returning a malformed sequence fails at write time, naming the sequence, and
    // removes its temporary file.
    let bad = PackedSeq {
        input_ids: vec![1, 2, 3],
        labels: vec![1, 2, 3],
        position_ids: vec![0, 1, 2],
        cu_seqlens: vec![0, 2],
    };
    let err = load_or_build(dir.path(), "abc", || {
        Ok((vec![PackedSeq::default(), bad], DataReport::default()))
    })
    .unwrap_err();
    // The empty sequence 0 fails first: its cu_seqlens are empty.
    assert!(format!("{err:#}").contains("sequence 0"), "{err:#}");
    assert!(
        cache_files(dir.path()).is_empty(),
        "{:?}",
        cache_files(dir.path())
    );

    // Leftovers of a killed build are removed by the next build.
    fs::write(dir.path().join("pack-abc.bin.tmp-99999"), b"partial").unwrap();
    let (ds, _, _) = load_or_build(dir.path(), "abc", || Ok(build_fixture())).unwrap();
    assert!(!ds.is_empty());
    assert_eq!(
        cache_files(dir.path()),
        vec!["pack-abc.bin", "pack-abc.json"]
    );
}

#[test]
fn corrupt_or_truncated_cache_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let (seqs, report) = build_fixture();
    let bin = dir.path().join("pack-k.bin");
    load_or_build(dir.path(), "k", || Ok((seqs.clone(), report.clone()))).unwrap();
    let good = fs::read(&bin).unwrap();

    let corruptions: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() - 4].to_vec()),
        ("header only", good[..100].to_vec()),
        ("bad magic", {
            let mut b = good.clone();
            b[0] = b'X';
            b
        }),
        ("token count changed", {
            let mut b = good.clone();
            b[24] ^= 1;
            b
        }),
        ("payload byte flipped", {
            let mut b = good.clone();
            let at = b.len() - 10;
            b[at] ^= 0x40;
            b
        }),
        ("report byte flipped", {
            let mut b = good.clone();
            b[113] ^= 0x01;
            b
        }),
    ];
    for (what, bytes) in corruptions {
        fs::write(&bin, &bytes).unwrap();
        assert!(
            ftrun::data::cache::PackedDataset::open(&bin)
                .and_then(|d| d.verify_payload())
                .is_err(),
            "{what}: not detected"
        );
        let mut rebuilt = false;
        let (ds, _, cached) = load_or_build(dir.path(), "k", || {
            rebuilt = true;
            Ok((seqs.clone(), report.clone()))
        })
        .unwrap();
        assert!(rebuilt && !cached, "{what}: not rebuilt");
        assert_eq!(ds.get_owned(0), seqs[0]);
        assert_eq!(
            fs::read(&bin).unwrap(),
            good,
            "{what}: rebuilt file differs"
        );
    }
}

#[test]
fn concurrent_ranks_build_once() {
    let dir = tempfile::tempdir().unwrap();
    let builds = std::sync::atomic::AtomicUsize::new(0);
    let (seqs, report) = build_fixture();
    let results: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let (ds, _, cached) = load_or_build_with_timeout(
                        dir.path(),
                        "shared",
                        std::time::Duration::from_secs(30),
                        || {
                            builds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            // Slow enough that the others find the lock taken.
                            std::thread::sleep(std::time::Duration::from_millis(300));
                            Ok((seqs.clone(), report.clone()))
                        },
                    )
                    .unwrap();
                    assert_eq!(ds.len(), seqs.len());
                    assert_eq!(ds.get_owned(1), seqs[1]);
                    cached
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(builds.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(results.iter().filter(|&&cached| !cached).count(), 1);
}

#[test]
fn waiting_for_a_held_lock_times_out_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let held = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.path().join("pack-busy.lock"))
        .unwrap();
    fs2::FileExt::lock_exclusive(&held).unwrap();
    let err = load_or_build_with_timeout(
        dir.path(),
        "busy",
        std::time::Duration::from_millis(200),
        || bail!("must not build while another holds the lock"),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("timed out") && msg.contains("pack-busy.lock"),
        "{msg}"
    );
}

#[test]
fn bad_key_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_or_build(dir.path(), "../escape", || Ok(build_fixture())).unwrap_err();
    assert!(format!("{err}").contains("\"../escape\""), "{err}");
}
