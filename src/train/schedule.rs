//! The learning-rate schedule: XTuner's mmengine pair `LinearLR(start_factor=1e-5)` for the
//! warm-up then `CosineAnnealingLR(eta_min)` to the end, in closed form over optimizer steps.
//!
//! mmengine semantics reproduced (its chained recursions reduce to these closed forms):
//! - warm-up length `W = floor(warmup_ratio * total)` (its `int(begin * epoch_length)`), or
//!   `warmup_steps` when set;
//! - `LinearLR` over `[0, W)` has `total_iters = W - 1`: the factor goes from `start_factor` at
//!   step 0 to exactly 1 at step `W - 1`;
//! - `CosineAnnealingLR` over `[W, total)` has `T_max = total - W`: step `W + s` gets
//!   `eta_min + (base - eta_min) * (1 + cos(pi * s / T_max)) / 2`;
//! - past the end the last value holds.
//!
//! Differences, on purpose: XTuner steps its scheduler every micro-batch iteration, ftrun every
//! optimizer step (the same curve when gradient accumulation is 1). With `W = 1` mmengine's
//! chained cosine would start from `base * start_factor` and stay ~1e5 times too small for the
//! whole run; here the cosine always starts from the base learning rate.

use crate::config::ScheduleConfig;
use anyhow::{bail, Result};

/// mmengine `LinearLR` start factor used by every XTuner config.
pub const WARMUP_START_FACTOR: f64 = 1e-5;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Decay {
    Cosine,
    Constant,
}

/// Learning rate per optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    base_lr: f64,
    eta_min: f64,
    warmup_steps: usize,
    total_steps: usize,
    decay: Decay,
}

impl LrSchedule {
    /// A schedule of `total_steps` optimizer steps peaking at `base_lr`.
    pub fn new(cfg: &ScheduleConfig, base_lr: f64, total_steps: usize) -> Result<LrSchedule> {
        let decay = match cfg.decay.as_str() {
            "cosine" => Decay::Cosine,
            "constant" => Decay::Constant,
            other => bail!("schedule.decay: unknown value `{other}` (expected cosine or constant)"),
        };
        if !(base_lr.is_finite() && base_lr > 0.0) {
            bail!("optim.lr: must be a positive number, got {base_lr}");
        }
        if !(0.0..1.0).contains(&cfg.warmup_ratio) {
            bail!(
                "schedule.warmup_ratio: must be in [0, 1), got {}",
                cfg.warmup_ratio
            );
        }
        if !(cfg.eta_min >= 0.0 && cfg.eta_min <= base_lr) {
            bail!(
                "schedule.eta_min: must be between 0 and optim.lr ({base_lr}), got {}",
                cfg.eta_min
            );
        }
        if total_steps == 0 {
            bail!("the schedule needs at least one optimizer step");
        }
        let warmup_steps = match cfg.warmup_steps {
            Some(w) => w,
            // Truncation as mmengine's int(); the product is computed exactly as Python does.
            None => (cfg.warmup_ratio * total_steps as f64).floor() as usize,
        };
        if warmup_steps > total_steps {
            bail!(
                "schedule.warmup_steps: {warmup_steps} is more than the {total_steps} optimizer \
                 steps of the run"
            );
        }
        Ok(LrSchedule {
            base_lr,
            eta_min: cfg.eta_min,
            warmup_steps,
            total_steps,
            decay,
        })
    }

    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        let step = step.min(self.total_steps - 1);
        let w = self.warmup_steps;
        if step < w {
            if w == 1 {
                return self.base_lr * WARMUP_START_FACTOR;
            }
            let progress = step as f64 / (w - 1) as f64;
            return self.base_lr * (WARMUP_START_FACTOR + (1.0 - WARMUP_START_FACTOR) * progress);
        }
        match self.decay {
            Decay::Constant => self.base_lr,
            Decay::Cosine => {
                let t_max = (self.total_steps - w) as f64;
                let s = (step - w) as f64;
                self.eta_min
                    + (self.base_lr - self.eta_min)
                        * (1.0 + (std::f64::consts::PI * s / t_max).cos())
                        / 2.0
            }
        }
    }

    pub fn warmup_steps(&self) -> usize {
        self.warmup_steps
    }

    pub fn total_steps(&self) -> usize {
        self.total_steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ratio: f64, steps: Option<usize>, decay: &str, eta_min: f64) -> ScheduleConfig {
        ScheduleConfig {
            warmup_ratio: ratio,
            warmup_steps: steps,
            decay: decay.into(),
            eta_min,
        }
    }

    #[test]
    fn rejects_bad_settings_with_the_key() {
        let err = |c: ScheduleConfig, lr: f64, n: usize| {
            LrSchedule::new(&c, lr, n).unwrap_err().to_string()
        };
        assert!(err(cfg(0.03, None, "linear", 0.0), 1e-3, 10).contains("schedule.decay"));
        assert!(err(cfg(1.5, None, "cosine", 0.0), 1e-3, 10).contains("schedule.warmup_ratio"));
        assert!(err(cfg(0.0, Some(11), "cosine", 0.0), 1e-3, 10).contains("warmup_steps"));
        assert!(err(cfg(0.0, None, "cosine", 1.0), 1e-3, 10).contains("schedule.eta_min"));
        assert!(err(cfg(0.0, None, "cosine", 0.0), 0.0, 10).contains("optim.lr"));
        assert!(LrSchedule::new(&cfg(0.0, None, "cosine", 0.0), 1e-3, 0).is_err());
    }

    #[test]
    fn constant_after_warmup_and_clamped_past_the_end() {
        let s = LrSchedule::new(&cfg(0.0, Some(3), "constant", 0.0), 2e-4, 10).unwrap();
        assert_eq!(s.lr_at(0), 2e-4 * WARMUP_START_FACTOR);
        assert_eq!(s.lr_at(2), 2e-4);
        assert_eq!(s.lr_at(9), 2e-4);
        assert_eq!(s.lr_at(100), s.lr_at(9));
    }
}
