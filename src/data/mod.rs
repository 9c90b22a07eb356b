//! The data pipeline: records -> template -> token ids + labels -> packed sequences -> cache,
//! and the samplers that hand packed sequences to ranks.

pub mod encode;
pub mod format;
pub mod image;
pub mod template;

/// Label of a token that is not trained (PyTorch's CrossEntropyLoss ignore_index).
pub const IGNORE_INDEX: i32 = -100;

/// Placeholder for an image in `Encoded::input_ids` (XTuner's IMAGE_TOKEN_INDEX, -200): the
/// multimodal model replaces it with the projected image features. Never a vocabulary id.
pub const IMAGE_TOKEN_ID: u32 = u32::MAX;

/// The text that marks where an image goes in a LLaVA conversation (XTuner's DEFAULT_IMAGE_TOKEN).
pub const IMAGE_TOKEN: &str = "<image>";

/// One conversation turn after format parsing (XTuner's `conversation` item).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Turn {
    pub system: Option<String>,
    pub input: String,
    pub output: String,
    /// false masks this turn's output too (OpenAI format `"loss": false`).
    pub loss: bool,
}

/// A parsed record.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Chat turns (messages, conversation, alpaca, and LLaVA with its image path).
    Chat {
        turns: Vec<Turn>,
        image: Option<String>,
    },
    /// Raw text for pretraining: no template, every token trained, no EOS added.
    Text(String),
}

/// A tokenized sample: `labels[i]` is the target for position i (IGNORE_INDEX = not trained);
/// the shift to next-token prediction happens in the loss, as in transformers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Encoded {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
}

impl Encoded {
    /// Number of trained tokens.
    pub fn trained(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

pub mod cache;
pub mod dataset;
pub mod llava;
pub mod loader;
pub mod pack;
pub mod sampler;

pub use dataset::build_dataset;
