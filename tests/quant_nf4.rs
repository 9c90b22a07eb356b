//! NF4 against bitsandbytes' own outputs (fixtures made by scripts/fixtures/make_nf4_fixtures.py
//! with bitsandbytes 0.50.2 on CPU).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ftrun::quant::nf4::{
    double_quantize_absmax, dynamic_map_signed, NESTED_BLOCKSIZE, NF4_BLOCKSIZE, NF4_CODE,
};
use ftrun::quant::{dequantize_nf4, quantize_nf4, quantized_bytes, Absmax, Nf4Tensor};

const CASES: [&str; 4] = ["w64x128", "w96x200", "w37x91", "outliers"];
const WEIGHT_NAME: &str = "model.layers.0.mlp.down_proj.weight";

fn fixture_path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/nf4")
        .join(file)
}

struct Case {
    shape: Vec<usize>,
    input: Vec<f32>,
    tensors: HashMap<String, Tensor>,
}

impl Case {
    fn load(name: &str) -> Case {
        let tensors = candle_core::safetensors::load(
            fixture_path(&format!("{name}.safetensors")),
            &Device::Cpu,
        )
        .expect("fixture loads");
        let input = &tensors["input"];
        let shape = input.dims().to_vec();
        let input = input
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        Case {
            shape,
            input,
            tensors,
        }
    }

    fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    fn u8s(&self, key: &str) -> Vec<u8> {
        self.tensors[key]
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap()
    }

    fn f32s(&self, key: &str) -> Vec<f32> {
        self.tensors[key]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// The double-quantized state exactly as bitsandbytes' CPU backend made it.
    fn bnb_double(&self) -> Nf4Tensor {
        Nf4Tensor {
            shape: self.shape.clone(),
            packed: self.u8s("plain.packed"),
            absmax: Absmax::Double {
                codes: self.u8s("double.absmax_codes"),
                scales: self.f32s("double.nested_absmax"),
                offset: self.f32s("double.offset")[0],
                code: self.f32s("double.nested_quant_map").try_into().unwrap(),
            },
            blocksize: NF4_BLOCKSIZE,
        }
    }
}

/// Bitwise equality of two f32 slices, with the first mismatch in the message.
fn assert_bits_eq(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(i) = (0..actual.len()).find(|&i| actual[i].to_bits() != expected[i].to_bits()) {
        panic!(
            "{what}: element {i} is {} but bitsandbytes has {}",
            actual[i], expected[i]
        );
    }
}

fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(i) = (0..actual.len()).find(|&i| actual[i] != expected[i]) {
        panic!(
            "{what}: byte {i} is {:#04x} but bitsandbytes has {:#04x}",
            actual[i], expected[i]
        );
    }
}

#[test]
fn quantize_plain_matches_bitsandbytes_bytes_and_absmax() {
    for name in CASES {
        let case = Case::load(name);
        let q = quantize_nf4(&case.input, &case.shape, false).unwrap();
        assert_bytes_eq(
            &q.packed,
            &case.u8s("plain.packed"),
            &format!("{name} packed"),
        );
        match &q.absmax {
            Absmax::Plain(absmax) => assert_bits_eq(
                absmax,
                &case.f32s("plain.absmax"),
                &format!("{name} absmax"),
            ),
            other => panic!("{name}: expected plain absmax, got {other:?}"),
        }
        assert_eq!(q.blocksize, 64);
        assert_eq!(q.shape, case.shape);
    }
}

#[test]
fn dynamic_map_matches_bitsandbytes() {
    let case = Case::load("w64x128");
    assert_bits_eq(
        &dynamic_map_signed(),
        &case.f32s("double.nested_quant_map"),
        "create_dynamic_map(signed=True)",
    );
}

#[test]
fn double_quant_codes_and_scales_match_bitsandbytes_given_its_offset() {
    for name in CASES {
        let case = Case::load(name);
        let offset = case.f32s("double.offset")[0];
        let Absmax::Double {
            codes,
            scales,
            offset: kept,
            code,
        } = double_quantize_absmax(&case.f32s("plain.absmax"), offset)
        else {
            panic!("{name}: double_quantize_absmax gave plain absmax");
        };
        assert_eq!(kept.to_bits(), offset.to_bits());
        // Nearest-code search, as the CUDA kernel and bitsandbytes' pure-torch backend do.
        assert_bytes_eq(
            &codes,
            &case.u8s("double.absmax_codes_exact"),
            &format!("{name} nested codes"),
        );
        // These fixtures hold no value where the CPU backend's lookup-table approximation differs.
        assert_bytes_eq(
            &codes,
            &case.u8s("double.absmax_codes"),
            &format!("{name} nested codes (CPU backend)"),
        );
        assert_bits_eq(
            &scales,
            &case.f32s("double.nested_absmax"),
            &format!("{name} nested absmax"),
        );
        assert_bits_eq(
            &code,
            &case.f32s("double.nested_quant_map"),
            &format!("{name} nested quant map"),
        );
        let blocks = case.f32s("plain.absmax").len();
        assert_eq!(scales.len(), blocks.div_ceil(NESTED_BLOCKSIZE));
    }
}

#[test]
fn quantize_double_matches_bitsandbytes_end_to_end() {
    for name in CASES {
        let case = Case::load(name);
        let q = quantize_nf4(&case.input, &case.shape, true).unwrap();
        assert_bytes_eq(
            &q.packed,
            &case.u8s("plain.packed"),
            &format!("{name} packed"),
        );
        let Absmax::Double {
            codes,
            scales,
            offset,
            ..
        } = &q.absmax
        else {
            panic!("{name}: expected double-quantized absmax");
        };
        // torch's mean reduces in its own order; ours sums in f64. They agree on these inputs.
        let bnb_offset = case.f32s("double.offset")[0];
        assert_eq!(
            offset.to_bits(),
            bnb_offset.to_bits(),
            "{name}: offset {offset} vs bitsandbytes {bnb_offset}"
        );
        assert_bytes_eq(
            codes,
            &case.u8s("double.absmax_codes"),
            &format!("{name} absmax codes"),
        );
        assert_bits_eq(
            scales,
            &case.f32s("double.nested_absmax"),
            &format!("{name} nested absmax"),
        );
        let dequant = dequantize_nf4(&q).unwrap();
        assert_bits_eq(
            &dequant,
            &case.f32s("double.dequant"),
            &format!("{name} dequantized"),
        );
    }
}

#[test]
fn dequantize_matches_bitsandbytes_bit_for_bit() {
    for name in CASES {
        let case = Case::load(name);
        if case.has("plain.dequant") {
            let plain = Nf4Tensor {
                shape: case.shape.clone(),
                packed: case.u8s("plain.packed"),
                absmax: Absmax::Plain(case.f32s("plain.absmax")),
                blocksize: NF4_BLOCKSIZE,
            };
            let dequant = dequantize_nf4(&plain).unwrap();
            assert_bits_eq(
                &dequant,
                &case.f32s("plain.dequant"),
                &format!("{name} plain dequantized"),
            );
        }
        let dequant = dequantize_nf4(&case.bnb_double()).unwrap();
        assert_bits_eq(
            &dequant,
            &case.f32s("double.dequant"),
            &format!("{name} double dequantized"),
        );
    }
}

#[test]
fn round_trip_error_is_within_half_the_widest_code_gap() {
    // The widest gap between neighbouring NF4 codes is 1.0 - 0.7229568 (top) or
    // 0.6961928 - 1.0 (bottom); rounding to the nearest code errs by at most half of it,
    // times the block's absmax (plus the double quant's absmax error).
    let max_half_gap = NF4_CODE
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(0.0f32, f32::max)
        / 2.0;
    for name in CASES {
        let case = Case::load(name);
        for double in [false, true] {
            let q = quantize_nf4(&case.input, &case.shape, double).unwrap();
            let dequant = dequantize_nf4(&q).unwrap();
            let block_absmax = q.absmax.block_absmax();
            let true_absmax: Vec<f32> = case
                .input
                .chunks(64)
                .map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs())))
                .collect();
            let mut sq_err = 0.0f64;
            let mut sq_val = 0.0f64;
            for (i, (&x, &y)) in case.input.iter().zip(dequant.iter()).enumerate() {
                let block = i / 64;
                // Codes are picked at the true absmax (error <= half a gap times it); decoding
                // at the stored absmax adds at most |stored - true| since |code| <= 1.
                let bound = max_half_gap * true_absmax[block]
                    + (block_absmax[block] - true_absmax[block]).abs()
                    + 1e-12;
                assert!(
                    (x - y).abs() <= bound * 1.0001,
                    "{name} double={double}: element {i}: {x} -> {y}, bound {bound}"
                );
                sq_err += f64::from(x - y).powi(2);
                sq_val += f64::from(x).powi(2);
            }
            // NF4 keeps ~10% relative RMS error on Gaussian weights (outliers make it worse).
            let rel_rms = (sq_err / sq_val).sqrt();
            let limit = if name == "outliers" { 0.6 } else { 0.15 };
            assert!(
                rel_rms < limit,
                "{name} double={double}: relative RMS error {rel_rms}"
            );
            if let Absmax::Double { scales, .. } = &q.absmax {
                // The widest gap of the 8-bit dynamic map is ~0.014 (near ±1), so a rebuilt
                // absmax errs by at most ~0.0071 times its nested block's scale.
                for (b, (&stored, &exact)) in
                    block_absmax.iter().zip(true_absmax.iter()).enumerate()
                {
                    let limit = 0.0075 * scales[b / NESTED_BLOCKSIZE];
                    assert!(
                        (stored - exact).abs() <= limit,
                        "{name}: block {b} absmax {stored} vs {exact}"
                    );
                }
            }
        }
    }
}

#[test]
fn odd_sizes_pad_and_short_blocks() {
    // 3 values: one block of 3, two bytes, last low nibble is the code of 0.0.
    let q = quantize_nf4(&[1.0, -1.0, 0.5], &[3], false).unwrap();
    // 0.5 lies below the 0.4407/0.5626 midpoint (0.50166): code 12.
    assert_eq!(q.packed, vec![0xF0, 0xC7]);
    assert_eq!(q.absmax, Absmax::Plain(vec![1.0]));
    assert_eq!(dequantize_nf4(&q).unwrap(), vec![1.0, -1.0, 0.440_709_83]);

    // 65 values: the short second block has its own absmax.
    let mut values: Vec<f32> = (0..65).map(|i| (i as f32 - 32.0) / 32.0).collect();
    values[64] = -3.0;
    let q = quantize_nf4(&values, &[5, 13], false).unwrap();
    assert_eq!(q.packed.len(), 33);
    assert_eq!(q.absmax, Absmax::Plain(vec![1.0, 3.0]));
    assert_eq!(
        q.packed[32], 0x07,
        "value -3.0 is code 0 in its own block, then the pad nibble"
    );
    let dequant = dequantize_nf4(&q).unwrap();
    assert_eq!(dequant.len(), 65);
    assert_eq!(dequant[64], -3.0);

    // 257 blocks double-quantized: two nested scales (256 + 1 absmax values).
    let values: Vec<f32> = (0..257 * 64)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4 * (1 + i / 64) as f32)
        .collect();
    let q = quantize_nf4(&values, &[257, 64], true).unwrap();
    let Absmax::Double { codes, scales, .. } = &q.absmax else {
        panic!("expected double quant")
    };
    assert_eq!((codes.len(), scales.len()), (257, 2));
    // A single-value nested block quantizes its only value to ±1 exactly: code 255 or 0.
    assert!(
        codes[256] == 255 || codes[256] == 0,
        "last nested block code {}",
        codes[256]
    );
}

#[test]
fn zero_block_follows_the_cuda_kernel() {
    // bitsandbytes' CUDA kernel scales by 1/absmax = inf; 0 * inf is NaN, which its decision tree
    // sends to code 0 (-1.0); dequantized: -1.0 * 0.0 = -0.0. (The CPU backend clamps the absmax
    // and writes code 7 instead; both dequantize to zero.)
    let mut values = vec![0.0f32; 128];
    values[64] = 0.25;
    let q = quantize_nf4(&values, &[2, 64], false).unwrap();
    assert_eq!(q.absmax, Absmax::Plain(vec![0.0, 0.25]));
    assert!(q.packed[..32].iter().all(|&b| b == 0x00));
    let dequant = dequantize_nf4(&q).unwrap();
    assert!(dequant[..64].iter().all(|&v| v == 0.0));
    assert_eq!(dequant[64], 0.25);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let err = quantize_nf4(&[], &[0, 4], false).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");

    let mut values = vec![0.5f32; 100];
    values[77] = f32::NAN;
    let err = quantize_nf4(&values, &[10, 10], true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("element 77") && err.contains("NaN"), "{err}");

    values[77] = f32::NEG_INFINITY;
    let err = quantize_nf4(&values, &[10, 10], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("element 77") && err.contains("-inf"), "{err}");

    let err = quantize_nf4(&[1.0; 12], &[5, 2], false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[5, 2]") && err.contains("10 elements") && err.contains("12 values"),
        "{err}"
    );

    let mut bad = quantize_nf4(&[1.0; 100], &[100], false).unwrap();
    bad.packed.pop();
    let err = dequantize_nf4(&bad).unwrap_err().to_string();
    assert!(
        err.contains("50 packed bytes") && err.contains("has 49"),
        "{err}"
    );
}

#[test]
fn to_tensor_dequantizes_and_casts() {
    let case = Case::load("w37x91");
    let q = quantize_nf4(&case.input, &case.shape, true).unwrap();
    let t = q.to_tensor(DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[37, 91]);
    assert_eq!(t.dtype(), DType::BF16);
    let expected: Vec<f32> = case
        .f32s("double.dequant")
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    let got = t
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_bits_eq(&got, &expected, "bf16 tensor");
}

fn load_state(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_path(file), &Device::Cpu).expect("state fixture loads")
}

fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let flat = t.flatten_all().unwrap();
    match t.dtype() {
        DType::U8 => flat.to_vec1::<u8>().unwrap(),
        DType::F32 => flat
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

#[test]
fn bnb_state_dict_round_trips_byte_for_byte() {
    for (case_name, dtype) in [("w37x91", DType::F32), ("outliers", DType::BF16)] {
        let case = Case::load(case_name);
        for (kind, double) in [("plain", false), ("double", true)] {
            let saved = load_state(&format!("{case_name}_state_{kind}.safetensors"));
            let loaded = Nf4Tensor::from_bnb_tensors(WEIGHT_NAME, &saved).unwrap();
            assert_eq!(loaded.shape, case.shape);
            assert_eq!(loaded.is_double_quant(), double);
            let dequant = dequantize_nf4(&loaded).unwrap();
            if double {
                assert_bits_eq(
                    &dequant,
                    &case.f32s("double.dequant"),
                    "loaded double dequant",
                );
            } else {
                assert_bits_eq(
                    &dequant,
                    &case.f32s("plain.dequant"),
                    "loaded plain dequant",
                );
            }

            // What we write for our own quantization is what bitsandbytes wrote: same keys,
            // dtypes, shapes and bytes (JSON blob included).
            let ours = quantize_nf4(&case.input, &case.shape, double).unwrap();
            let written = ours.to_bnb_tensors_as(WEIGHT_NAME, dtype).unwrap();
            let mut written_keys: Vec<&String> = written.iter().map(|(k, _)| k).collect();
            let mut saved_keys: Vec<&String> = saved.keys().collect();
            written_keys.sort();
            saved_keys.sort();
            assert_eq!(written_keys, saved_keys, "{case_name} {kind}: keys");
            for (key, tensor) in &written {
                let reference = &saved[key];
                assert_eq!(tensor.dtype(), reference.dtype(), "{key}: dtype");
                assert_eq!(tensor.dims(), reference.dims(), "{key}: shape");
                let (ours, theirs) = (tensor_bytes(tensor), tensor_bytes(reference));
                if key.ends_with("bitsandbytes__nf4") {
                    assert_eq!(
                        String::from_utf8_lossy(&ours),
                        String::from_utf8_lossy(&theirs),
                        "{key}"
                    );
                }
                assert_eq!(ours, theirs, "{case_name} {kind}: {key}");
            }
            let map: HashMap<String, Tensor> = written.into_iter().collect();
            assert_eq!(
                Nf4Tensor::from_bnb_tensors(WEIGHT_NAME, &map).unwrap(),
                ours
            );
        }
    }
}

#[test]
fn bnb_state_dict_errors_name_the_key() {
    let saved = load_state("w37x91_state_double.safetensors");

    let mut missing = saved.clone();
    missing.remove(&format!("{WEIGHT_NAME}.nested_absmax"));
    let err = format!(
        "{:#}",
        Nf4Tensor::from_bnb_tensors(WEIGHT_NAME, &missing).unwrap_err()
    );
    assert!(
        err.contains(&format!("`{WEIGHT_NAME}.nested_absmax` is missing")),
        "{err}"
    );

    let err = format!(
        "{:#}",
        Nf4Tensor::from_bnb_tensors("model.other.weight", &saved).unwrap_err()
    );
    assert!(
        err.contains("model.other.weight.quant_state.bitsandbytes__nf4"),
        "{err}"
    );

    let mut fp4 = saved.clone();
    let blob = fp4
        .remove(&format!("{WEIGHT_NAME}.quant_state.bitsandbytes__nf4"))
        .unwrap();
    fp4.insert(format!("{WEIGHT_NAME}.quant_state.bitsandbytes__fp4"), blob);
    let err = format!(
        "{:#}",
        Nf4Tensor::from_bnb_tensors(WEIGHT_NAME, &fp4).unwrap_err()
    );
    assert!(err.contains("fp4"), "{err}");

    let mut truncated = saved.clone();
    let key = format!("{WEIGHT_NAME}.absmax");
    let absmax = truncated[&key].narrow(0, 0, 10).unwrap();
    truncated.insert(key, absmax);
    let err = format!(
        "{:#}",
        Nf4Tensor::from_bnb_tensors(WEIGHT_NAME, &truncated).unwrap_err()
    );
    assert!(err.contains("needs 53 absmax values, has 10"), "{err}");

    let mut bad_json = saved.clone();
    let json = br#"{"quant_type": "nf4", "blocksize": -1}"#.to_vec();
    let len = json.len();
    bad_json.insert(
        format!("{WEIGHT_NAME}.quant_state.bitsandbytes__nf4"),
        Tensor::from_vec(json, len, &Device::Cpu).unwrap(),
    );
    let err = format!(
        "{:#}",
        Nf4Tensor::from_bnb_tensors(WEIGHT_NAME, &bad_json).unwrap_err()
    );
    assert!(err.contains("blocksize has -1"), "{err}");
}

#[test]
fn storage_is_4_127_bits_per_parameter_with_double_quant() {
    // A 4096 x 4096 projection: 262144 blocks, 1024 nested blocks.
    let numel = 4096 * 4096;
    let double_bits = quantized_bytes(numel, true) as f64 * 8.0 / numel as f64;
    assert!(
        (double_bits - 4.127).abs() < 0.0005,
        "double quant: {double_bits} bits/param"
    );
    let plain_bits = quantized_bytes(numel, false) as f64 * 8.0 / numel as f64;
    assert!(
        (plain_bits - 4.5).abs() < 1e-9,
        "plain: {plain_bits} bits/param"
    );

    // The count matches what a quantized tensor actually holds, odd sizes included.
    for (shape, double) in [
        (vec![257usize, 64], true),
        (vec![37, 91], true),
        (vec![37, 91], false),
        (vec![3], true),
    ] {
        let numel: usize = shape.iter().product();
        let values: Vec<f32> = (0..numel).map(|i| (i as f32).sin()).collect();
        let q = quantize_nf4(&values, &shape, double).unwrap();
        let held = q.packed.len()
            + match &q.absmax {
                Absmax::Plain(a) => a.len() * 4,
                Absmax::Double { codes, scales, .. } => codes.len() + scales.len() * 4 + 4,
            };
        assert_eq!(
            quantized_bytes(numel, double),
            held,
            "{shape:?} double={double}"
        );
        assert_eq!(q.storage_bytes(), held);
    }
}
