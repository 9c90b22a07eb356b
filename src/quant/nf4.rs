//! NF4 (4-bit NormalFloat) quantization, bit-compatible with bitsandbytes.
//!
//! Layout (bitsandbytes `quantize_4bit(quant_type="nf4")`):
//! - the flat weight (row-major) is cut into blocks of 64 values; the last block may be short;
//! - each block keeps its fp32 absmax; every value is scaled by `1 / absmax` (a reciprocal
//!   multiply, as the CUDA kernel does) and mapped to one of 16 NF4 codes by the decision tree of
//!   bitsandbytes' `dQuantizeNF4` (thresholds are the midpoints of the code table; a value equal
//!   to a threshold takes the lower code);
//! - two codes per byte: element `2i` in the high nibble, `2i + 1` in the low nibble; an odd
//!   element count pads the last low nibble with the code of 0.0 (`0b0111`);
//! - double quantization (`compress_statistics=True`): `offset = mean(absmax)`, then
//!   `absmax - offset` is quantized blockwise (256 absmax per block) to 8 bits with the signed
//!   dynamic map (`create_dynamic_map(signed=True)`) and one fp32 scale per 256 blocks.
//!
//! Dequantization is `NF4[code] * absmax` in fp32; with double quantization the absmax is first
//! rebuilt as `dynamic[code8] * scale + offset` (two fp32 roundings, as bitsandbytes does).

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde_json::{Map, Value};

/// The 16 NF4 values (bitsandbytes `get_4bit_type("nf4")`), indexed by the 4-bit code.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Values per absmax block (bitsandbytes' default for 4-bit, the QLoRA setting).
pub const NF4_BLOCKSIZE: usize = 64;
/// Absmax values per block of the second (8-bit) quantization.
pub const NESTED_BLOCKSIZE: usize = 256;
/// The code of 0.0: used for the padding nibble of an odd element count.
const NF4_ZERO_CODE: u8 = 0b0111;

/// Per-block scales of an [`Nf4Tensor`].
// `code` is inline as the task's API fixes it; one 1 KiB map per weight is negligible.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One fp32 absmax per block of `blocksize` values.
    Plain(Vec<f32>),
    /// Double quantization: block `i`'s absmax is `code[codes[i]] * scales[i / 256] + offset`.
    Double {
        /// One 8-bit index into `code` per block.
        codes: Vec<u8>,
        /// One fp32 absmax of `absmax - offset` per 256 blocks.
        scales: Vec<f32>,
        /// The mean of the absmax values, subtracted before quantizing them.
        offset: f32,
        /// The signed dynamic map the codes index (`create_dynamic_map(signed=True)`).
        code: [f32; 256],
    },
}

impl Absmax {
    /// Number of quantization blocks these scales cover.
    pub fn num_blocks(&self) -> usize {
        match self {
            Absmax::Plain(values) => values.len(),
            Absmax::Double { codes, .. } => codes.len(),
        }
    }

    /// The fp32 absmax of every block (rebuilt from the 8-bit codes under double quantization).
    pub fn block_absmax(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(values) => values.clone(),
            Absmax::Double {
                codes,
                scales,
                offset,
                code,
            } => dequantize_dynamic_blockwise(codes, scales, code, NESTED_BLOCKSIZE)
                .into_iter()
                // Separate add after the multiply: bitsandbytes rounds twice (no fused multiply-add).
                .map(|centered| centered + offset)
                .collect(),
        }
    }
}

/// A weight quantized to NF4, stored exactly as bitsandbytes stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Logical shape of the weight (row-major), e.g. `[out_features, in_features]`.
    pub shape: Vec<usize>,
    /// `ceil(numel / 2)` bytes: element `2i` in the high nibble, `2i + 1` in the low nibble.
    pub packed: Vec<u8>,
    /// Per-block scales.
    pub absmax: Absmax,
    /// Values per absmax block (64 for everything [`quantize_nf4`] makes).
    pub blocksize: usize,
}

impl Nf4Tensor {
    /// Number of logical elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the absmax values are themselves quantized (double quantization).
    pub fn is_double_quant(&self) -> bool {
        matches!(self.absmax, Absmax::Double { .. })
    }

    /// Bytes of the quantized data (packed codes and scales), as [`quantized_bytes`] counts them.
    pub fn storage_bytes(&self) -> usize {
        let scales = match &self.absmax {
            Absmax::Plain(values) => values.len() * 4,
            Absmax::Double { codes, scales, .. } => codes.len() + scales.len() * 4 + 4,
        };
        self.packed.len() + scales
    }

    /// Checks that lengths agree with the shape and blocksize (for tensors built by hand or loaded).
    pub fn validate(&self) -> Result<()> {
        let numel = self.numel();
        ensure!(
            numel > 0,
            "NF4 tensor has no elements (shape {:?})",
            self.shape
        );
        ensure!(
            self.blocksize > 0 && self.blocksize % 2 == 0,
            "NF4 blocksize must be a positive even number, got {}",
            self.blocksize
        );
        ensure!(
            self.packed.len() == numel.div_ceil(2),
            "NF4 tensor of shape {:?} needs {} packed bytes, has {}",
            self.shape,
            numel.div_ceil(2),
            self.packed.len()
        );
        let blocks = numel.div_ceil(self.blocksize);
        ensure!(
            self.absmax.num_blocks() == blocks,
            "NF4 tensor of shape {:?} with blocksize {} needs {} absmax values, has {}",
            self.shape,
            self.blocksize,
            blocks,
            self.absmax.num_blocks()
        );
        if let Absmax::Double { scales, .. } = &self.absmax {
            ensure!(
                scales.len() == blocks.div_ceil(NESTED_BLOCKSIZE),
                "double-quantized NF4 tensor with {} blocks needs {} nested absmax values, has {}",
                blocks,
                blocks.div_ceil(NESTED_BLOCKSIZE),
                scales.len()
            );
        }
        Ok(())
    }

    /// Dequantizes into a candle tensor of `self.shape`, cast to `dtype` (from the fp32 values,
    /// as bitsandbytes casts its fp32 products).
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let values = dequantize_nf4(self)?;
        let tensor = Tensor::from_vec(values, self.shape.as_slice(), device)?; // [shape..] f32
        Ok(tensor.to_dtype(dtype)?)
    }

    /// The tensors bitsandbytes / transformers save for this weight under `name`, recording
    /// `bfloat16` as the weight's original dtype. See [`Nf4Tensor::to_bnb_tensors_as`].
    pub fn to_bnb_tensors(&self, name: &str) -> Result<Vec<(String, Tensor)>> {
        self.to_bnb_tensors_as(name, DType::BF16)
    }

    /// The tensors bitsandbytes' `Params4bit` state dict holds (transformers' 4-bit safetensors):
    /// `name` (uint8 `[ceil(numel/2), 1]`), `name.absmax` (fp32, or uint8 codes with double
    /// quantization), `name.quant_map` (fp32 `[16]`), with double quantization
    /// `name.nested_absmax` and `name.nested_quant_map`, and `name.quant_state.bitsandbytes__nf4`:
    /// the UTF-8 bytes of the JSON `json.dumps` writes for the non-tensor state. `dtype` is the
    /// dtype the weight had before quantization (what dequantization returns in bitsandbytes).
    pub fn to_bnb_tensors_as(&self, name: &str, dtype: DType) -> Result<Vec<(String, Tensor)>> {
        self.validate()?;
        let cpu = Device::Cpu;
        let mut tensors = Vec::with_capacity(6);
        let packed = Tensor::from_vec(self.packed.clone(), (self.packed.len(), 1), &cpu)?;
        tensors.push((name.to_string(), packed)); // [ceil(numel/2), 1] u8
        let mut state = Map::new();
        state.insert("quant_type".into(), Value::from("nf4"));
        match &self.absmax {
            Absmax::Plain(values) => {
                let absmax = Tensor::from_vec(values.clone(), values.len(), &cpu)?; // [blocks] f32
                tensors.push((format!("{name}.absmax"), absmax));
            }
            Absmax::Double { codes, .. } => {
                let absmax = Tensor::from_vec(codes.clone(), codes.len(), &cpu)?; // [blocks] u8
                tensors.push((format!("{name}.absmax"), absmax));
            }
        }
        state.insert("blocksize".into(), Value::from(self.blocksize));
        let quant_map = Tensor::from_vec(NF4_CODE.to_vec(), NF4_CODE.len(), &cpu)?; // [16] f32
        tensors.push((format!("{name}.quant_map"), quant_map));
        state.insert("dtype".into(), Value::from(torch_dtype_name(dtype)?));
        let shape: Vec<Value> = self.shape.iter().map(|&d| Value::from(d)).collect();
        state.insert("shape".into(), Value::Array(shape));
        if let Absmax::Double {
            scales,
            offset,
            code,
            ..
        } = &self.absmax
        {
            let nested = Tensor::from_vec(scales.clone(), scales.len(), &cpu)?; // [ceil(blocks/256)] f32
            tensors.push((format!("{name}.nested_absmax"), nested));
            let nested_map = Tensor::from_vec(code.to_vec(), code.len(), &cpu)?; // [256] f32
            tensors.push((format!("{name}.nested_quant_map"), nested_map));
            state.insert("nested_blocksize".into(), Value::from(NESTED_BLOCKSIZE));
            state.insert("nested_dtype".into(), Value::from("float32"));
            // A placeholder replaced below: serde_json does not print floats the way Python does.
            state.insert("nested_offset".into(), Value::from("@offset@"));
            let json = python_json_dumps(&state, f64::from(*offset));
            tensors.push(quant_state_tensor(name, json)?);
        } else {
            tensors.push(quant_state_tensor(name, python_json_dumps(&state, 0.0))?);
        }
        Ok(tensors)
    }

    /// Reads a weight saved by bitsandbytes / transformers in 4-bit NF4 (see
    /// [`Nf4Tensor::to_bnb_tensors_as`] for the keys). `tensors` maps full tensor names (as in
    /// the safetensors file) to tensors on any device.
    pub fn from_bnb_tensors(name: &str, tensors: &HashMap<String, Tensor>) -> Result<Nf4Tensor> {
        let get = |suffix: &str| -> Result<&Tensor> {
            let key = if suffix.is_empty() {
                name.to_string()
            } else {
                format!("{name}.{suffix}")
            };
            tensors
                .get(&key)
                .with_context(|| format!("4-bit weight `{name}`: tensor `{key}` is missing"))
        };
        let state_key = format!("{name}.quant_state.bitsandbytes__nf4");
        let state_tensor = match tensors.get(&state_key) {
            Some(t) => t,
            None => {
                if tensors.contains_key(&format!("{name}.quant_state.bitsandbytes__fp4")) {
                    bail!("4-bit weight `{name}` is quantized as fp4; only nf4 is supported");
                }
                bail!("4-bit weight `{name}`: tensor `{state_key}` is missing");
            }
        };
        let state_bytes = u8_values(state_tensor, &state_key)?;
        let state: Map<String, Value> = serde_json::from_slice(&state_bytes)
            .with_context(|| format!("`{state_key}` is not a JSON object"))?;
        let field = |key: &str| -> Result<&Value> {
            state
                .get(key)
                .with_context(|| format!("`{state_key}`: key `{key}` is missing"))
        };
        let quant_type = field("quant_type")?;
        ensure!(
            quant_type.as_str() == Some("nf4"),
            "`{state_key}`: quant_type is {quant_type}, expected \"nf4\""
        );
        let blocksize = json_usize(field("blocksize")?, &state_key, "blocksize")?;
        let shape = match field("shape")? {
            Value::Array(dims) => dims
                .iter()
                .map(|d| json_usize(d, &state_key, "shape"))
                .collect::<Result<Vec<usize>>>()?,
            other => bail!("`{state_key}`: shape is {other}, expected a list of integers"),
        };
        let dtype = field("dtype")?;
        ensure!(
            matches!(dtype.as_str(), Some("float32" | "float16" | "bfloat16")),
            "`{state_key}`: dtype is {dtype}, expected float32, float16 or bfloat16"
        );

        let quant_map_key = format!("{name}.quant_map");
        let quant_map = f32_values(get("quant_map")?, &quant_map_key)?;
        ensure!(
            quant_map.len() == 16
                && quant_map
                    .iter()
                    .zip(NF4_CODE.iter())
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
            "`{quant_map_key}` is not the NF4 code table: {quant_map:?}"
        );

        let weight = get("")?;
        ensure!(
            weight.dtype() == DType::U8,
            "4-bit weight `{name}` is stored as {:?}; only uint8 quant_storage is supported",
            weight.dtype()
        );
        let packed = u8_values(weight, name)?;

        let absmax_key = format!("{name}.absmax");
        let absmax_tensor = get("absmax")?;
        let absmax = if state.contains_key("nested_offset") {
            let nested_blocksize =
                json_usize(field("nested_blocksize")?, &state_key, "nested_blocksize")?;
            ensure!(
                nested_blocksize == NESTED_BLOCKSIZE,
                "`{state_key}`: nested_blocksize is {nested_blocksize}, only {NESTED_BLOCKSIZE} is supported"
            );
            let nested_dtype = field("nested_dtype")?;
            ensure!(
                nested_dtype.as_str() == Some("float32"),
                "`{state_key}`: nested_dtype is {nested_dtype}, expected \"float32\""
            );
            let offset = field("nested_offset")?
                .as_f64()
                .with_context(|| format!("`{state_key}`: nested_offset is not a number"))?
                as f32;
            let codes = u8_values(absmax_tensor, &absmax_key)?;
            let nested_key = format!("{name}.nested_absmax");
            let scales = f32_values(get("nested_absmax")?, &nested_key)?;
            let map_key = format!("{name}.nested_quant_map");
            let map = f32_values(get("nested_quant_map")?, &map_key)?;
            let code: [f32; 256] = map.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!("`{map_key}` has {} values, expected 256", map.len())
            })?;
            Absmax::Double {
                codes,
                scales,
                offset,
                code,
            }
        } else {
            Absmax::Plain(f32_values(absmax_tensor, &absmax_key)?)
        };

        let tensor = Nf4Tensor {
            shape,
            packed,
            absmax,
            blocksize,
        };
        tensor
            .validate()
            .with_context(|| format!("4-bit weight `{name}`"))?;
        Ok(tensor)
    }
}

/// Quantizes `values` (row-major, `shape`) to NF4 with blocksize 64, as bitsandbytes'
/// `quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)`.
///
/// Errors on an empty input, a shape that does not match the length, and NaN or infinite values.
pub fn quantize_nf4(values: &[f32], shape: &[usize], double_quant: bool) -> Result<Nf4Tensor> {
    ensure!(
        !values.is_empty(),
        "cannot quantize an empty tensor to NF4 (shape {shape:?})"
    );
    let numel: usize = shape.iter().product();
    ensure!(
        numel == values.len(),
        "NF4 quantization: shape {shape:?} has {numel} elements but {} values were given",
        values.len()
    );
    if let Some((index, value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        bail!("cannot quantize to NF4: element {index} (flat index, shape {shape:?}) is {value}");
    }

    let blocksize = NF4_BLOCKSIZE;
    // Chunks of whole blocks (an even element count, so bytes never straddle chunks) are
    // quantized in parallel; the result does not depend on the split.
    let chunk = blocksize * 1024;
    let parts: Vec<(Vec<f32>, Vec<u8>)> = values
        .par_chunks(chunk)
        .map(|part| {
            let mut absmax = Vec::with_capacity(part.len().div_ceil(blocksize));
            let mut codes = Vec::with_capacity(part.len() + 1); // one code per value
            for block in part.chunks(blocksize) {
                let block_absmax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                // bitsandbytes scales by the reciprocal (1/0 = inf gives NaN for an all-zero
                // block, which the decision tree maps to code 0; dequantized it is -1 * 0 = -0.0).
                let inverse = 1.0f32 / block_absmax;
                codes.extend(block.iter().map(|&v| nf4_code_index(v * inverse)));
                absmax.push(block_absmax);
            }
            if codes.len() % 2 == 1 {
                codes.push(NF4_ZERO_CODE); // only the last chunk can be odd
            }
            let packed = codes
                .chunks_exact(2)
                .map(|pair| (pair[0] << 4) | pair[1])
                .collect();
            (absmax, packed)
        })
        .collect();
    let mut absmax = Vec::with_capacity(numel.div_ceil(blocksize));
    let mut packed = Vec::with_capacity(numel.div_ceil(2));
    for (a, p) in parts {
        absmax.extend(a);
        packed.extend(p);
    }

    let absmax = if double_quant {
        let offset = absmax_mean(&absmax);
        double_quantize_absmax(&absmax, offset)
    } else {
        Absmax::Plain(absmax)
    };
    Ok(Nf4Tensor {
        shape: shape.to_vec(),
        packed,
        absmax,
        blocksize,
    })
}

/// Dequantizes to fp32 values in row-major order (`numel` values), as bitsandbytes'
/// `dequantize_4bit(..., quant_type="nf4")` with an fp32 output.
pub fn dequantize_nf4(tensor: &Nf4Tensor) -> Result<Vec<f32>> {
    tensor.validate()?;
    let numel = tensor.numel();
    let absmax = tensor.absmax.block_absmax();
    let mut out = Vec::with_capacity(numel + 1);
    for &byte in &tensor.packed {
        out.push(NF4_CODE[usize::from(byte >> 4)]);
        out.push(NF4_CODE[usize::from(byte & 0x0F)]);
    }
    out.truncate(numel);
    for (block, &scale) in out.chunks_mut(tensor.blocksize).zip(absmax.iter()) {
        for value in block {
            *value *= scale;
        }
    }
    Ok(out)
}

/// Bytes the quantized weight takes (packed codes + scales): `ceil(numel/2)` bytes of codes, plus
/// 4 bytes per 64-block (plain), or 1 byte per block + 4 bytes per 256 blocks + 4 bytes of offset
/// (double quantization). The constant code tables (64 + 1024 bytes, shared by all weights) are
/// not counted. Double quantization comes to 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter.
pub fn quantized_bytes(numel: usize, double_quant: bool) -> usize {
    let blocks = numel.div_ceil(NF4_BLOCKSIZE);
    let scales = if double_quant {
        blocks + blocks.div_ceil(NESTED_BLOCKSIZE) * 4 + 4
    } else {
        blocks * 4
    };
    numel.div_ceil(2) + scales
}

/// The NF4 code of a value already scaled to [-1, 1]: bitsandbytes' `dQuantizeNF4` decision
/// tree. The thresholds are the midpoints between neighbouring codes; a value equal to a
/// threshold takes the lower code, and NaN falls through every comparison to code 0.
pub fn nf4_code_index(x: f32) -> u8 {
    if x > 0.039_790_15 {
        if x > 0.389_312_54 {
            if x > 0.642_786_9 {
                if x > 0.861_478_4 {
                    0b1111
                } else {
                    0b1110
                }
            } else if x > 0.501_663_4 {
                0b1101
            } else {
                0b1100
            }
        } else if x > 0.203_521_25 {
            if x > 0.292_013_77 {
                0b1011
            } else {
                0b1010
            }
        } else if x > 0.120_255_25 {
            0b1001
        } else {
            0b1000
        }
    } else if x > -0.339_679_43 {
        if x > -0.137_911_73 {
            if x > -0.045_525_018 {
                0b0111
            } else {
                0b0110
            }
        } else if x > -0.234_607_4 {
            0b0101
        } else {
            0b0100
        }
    } else if x > -0.610_632_9 {
        if x > -0.459_995_27 {
            0b0011
        } else {
            0b0010
        }
    } else if x > -0.848_096_4 {
        0b0001
    } else {
        0b0000
    }
}

/// The mean of the block absmax values that double quantization subtracts (the sum is taken in
/// f64 and rounded once, then divided in f32 like torch's `sum / n`; torch's own reduction order
/// depends on the backend and can differ from this in the last bit).
pub fn absmax_mean(absmax: &[f32]) -> f32 {
    let sum: f64 = absmax.iter().map(|&v| f64::from(v)).sum();
    (sum as f32) / (absmax.len() as f32)
}

/// Double quantization of the block absmax values with a given `offset`: `absmax - offset` is
/// quantized in blocks of 256 to 8-bit indices into the signed dynamic map, with one fp32 absmax
/// per 256 blocks (bitsandbytes' `quantize_blockwise(absmax - offset, blocksize=256)`).
pub fn double_quantize_absmax(absmax: &[f32], offset: f32) -> Absmax {
    let code = dynamic_map_signed();
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mut codes = Vec::with_capacity(centered.len());
    let mut scales = Vec::with_capacity(centered.len().div_ceil(NESTED_BLOCKSIZE));
    for block in centered.chunks(NESTED_BLOCKSIZE) {
        let block_absmax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let inverse = 1.0f32 / block_absmax;
        codes.extend(
            block
                .iter()
                .map(|&v| dynamic_code_index(&code, v * inverse)),
        );
        scales.push(block_absmax);
    }
    Absmax::Double {
        codes,
        scales,
        offset,
        code,
    }
}

/// `code[codes[i]] * scales[i / blocksize]` in fp32 (bitsandbytes' `dequantize_blockwise`).
fn dequantize_dynamic_blockwise(
    codes: &[u8],
    scales: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> Vec<f32> {
    codes
        .chunks(blocksize)
        .zip(scales.iter())
        .flat_map(|(block, &scale)| block.iter().map(move |&c| code[usize::from(c)] * scale))
        .collect()
}

/// The index of a scaled value in the sorted 256-entry `code`, found the way bitsandbytes' CUDA
/// kernel `dQuantize<0>` does: a 7-step binary search from the middle entry, then the nearer of
/// the final entry and the last entry visited on the other side (by midpoint comparison).
pub fn dynamic_code_index(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot = 127usize;
    let mut upper_pivot = 255usize;
    let mut lower_pivot = 0usize;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut value = code[pivot];
    let mut step = 64usize;
    while step > 0 {
        if x > value {
            lower_pivot = pivot;
            lower = value;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = value;
            pivot -= step;
        }
        value = code[pivot];
        step >>= 1;
    }
    // The search starts with bounds ±1; if a side was never visited, use the table's end.
    if upper_pivot == 255 {
        upper = code[255];
    }
    if lower_pivot == 0 {
        lower = code[0];
    }
    let index = if x > value {
        if x > (upper + value) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + value) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    index as u8
}

/// bitsandbytes' `create_dynamic_map(signed=True)` (7 exponent bits, 8 bits total): for each
/// decade `10^(i-6)`, `i` in 0..7, the midpoints of `linspace(0.1, 1, 2^i + 1)` (fp32) times the
/// decade, both signs, plus 0 and 1, sorted.
pub fn dynamic_map_signed() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let steps = (1usize << i) + 1;
        let boundaries = linspace_f32(0.1, 1.0, steps);
        // Python's `10 ** (i - 6)` as a double, then torch casts the scalar to fp32.
        let decade = format!("1e{}", i - 6)
            .parse::<f64>()
            .expect("decimal literal parses") as f32;
        for pair in boundaries.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            data.push(decade * mean);
            data.push(-decade * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut code = [0.0f32; 256];
    code.copy_from_slice(&data);
    code
}

/// torch's fp32 `linspace` on CPU: `start + step * i` on the first half and
/// `end - step * (n - 1 - i)` on the second, each as a fused multiply-add (one rounding; plain
/// multiply-then-add differs from torch in the last bit for some entries).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

fn quant_state_tensor(name: &str, json: String) -> Result<(String, Tensor)> {
    let bytes = json.into_bytes();
    let len = bytes.len();
    let tensor = Tensor::from_vec(bytes, len, &Device::Cpu)?; // [json bytes] u8
    Ok((format!("{name}.quant_state.bitsandbytes__nf4"), tensor))
}

/// `json.dumps(state)` as Python writes it (", " and ": " separators, floats in `repr` form);
/// the `nested_offset` placeholder is replaced by `offset` printed as Python prints a float.
fn python_json_dumps(state: &Map<String, Value>, offset: f64) -> String {
    let fields: Vec<String> = state
        .iter()
        .map(|(key, value)| {
            let text = match value {
                Value::String(s) if s == "@offset@" => python_float_repr(offset),
                Value::Array(items) => {
                    let items: Vec<String> = items.iter().map(Value::to_string).collect();
                    format!("[{}]", items.join(", "))
                }
                other => other.to_string(),
            };
            format!("{}: {text}", Value::from(key.as_str()))
        })
        .collect();
    format!("{{{}}}", fields.join(", "))
}

/// Python's `repr(float)`: the shortest round-trip digits, in positional form for exponents in
/// [-4, 16) and as `d.ddde-XX` otherwise.
fn python_float_repr(value: f64) -> String {
    if value == 0.0 {
        return if value.is_sign_negative() {
            "-0.0"
        } else {
            "0.0"
        }
        .into();
    }
    // `{:e}` gives the shortest round-trip digits: "1.2345e-5".
    let scientific = format!("{value:e}");
    let (mantissa, exponent) = scientific
        .split_once('e')
        .expect("`{:e}` output has an exponent");
    let exponent: i32 = exponent.parse().expect("`{:e}` exponent is an integer");
    if (-4..16).contains(&exponent) {
        let shortest = format!("{value}");
        if shortest.contains('.') {
            shortest
        } else {
            format!("{shortest}.0")
        }
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    }
}

fn torch_dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        other => bail!("bitsandbytes records a 4-bit weight's dtype as float32, float16 or bfloat16, not {other:?}"),
    })
}

fn json_usize(value: &Value, key_path: &str, key: &str) -> Result<usize> {
    value
        .as_u64()
        .and_then(|v| usize::try_from(v).ok())
        .with_context(|| {
            format!("`{key_path}`: {key} has {value}, expected a non-negative integer")
        })
}

fn u8_values(tensor: &Tensor, key: &str) -> Result<Vec<u8>> {
    ensure!(
        tensor.dtype() == DType::U8,
        "`{key}` has dtype {:?}, expected uint8",
        tensor.dtype()
    );
    Ok(tensor.flatten_all()?.to_vec1::<u8>()?)
}

fn f32_values(tensor: &Tensor, key: &str) -> Result<Vec<f32>> {
    ensure!(
        tensor.dtype() == DType::F32,
        "`{key}` has dtype {:?}, expected float32",
        tensor.dtype()
    );
    Ok(tensor.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_tree_thresholds_are_code_midpoints() {
        // Each threshold of the tree must sit between the two codes it separates, and the
        // tree must return the nearest code for values just off every midpoint.
        for code in 0..15usize {
            let mid = (NF4_CODE[code] + NF4_CODE[code + 1]) / 2.0;
            let below = mid - 1e-4;
            let above = mid + 1e-4;
            assert_eq!(
                usize::from(nf4_code_index(below)),
                code,
                "below midpoint {mid}"
            );
            assert_eq!(
                usize::from(nf4_code_index(above)),
                code + 1,
                "above midpoint {mid}"
            );
        }
        assert_eq!(nf4_code_index(f32::NAN), 0);
        assert_eq!(nf4_code_index(0.0), NF4_ZERO_CODE);
    }

    #[test]
    fn python_float_repr_matches_python() {
        // Expected strings are what CPython 3.11 prints for repr(float(x)).
        assert_eq!(python_float_repr(0.5), "0.5");
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(0.0001), "0.0001");
        assert_eq!(python_float_repr(0.00001), "1e-05");
        assert_eq!(python_float_repr(1.5e-7), "1.5e-07");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(123.25), "123.25");
        assert_eq!(
            python_float_repr(f64::from(0.033_710_09f32)),
            format!("{}", f64::from(0.033_710_09f32))
        );
    }

    #[test]
    fn dynamic_code_search_finds_nearest_entry() {
        let code = dynamic_map_signed();
        for (i, &c) in code.iter().enumerate() {
            assert_eq!(
                usize::from(dynamic_code_index(&code, c)),
                i,
                "entry {i} = {c}"
            );
        }
    }
}
