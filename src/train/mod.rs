//! Training: the optimizer over a flat fp32 parameter buffer and the learning-rate schedule.

pub mod optim;
pub mod schedule;

pub use optim::{clip_grad_norm, AdamW, FlatParams, Slot};
pub use schedule::LrSchedule;
pub mod checkpoint;
pub mod eval;
pub mod llava;
pub mod metrics;
pub mod step;
pub mod trainer;
pub mod zero;
