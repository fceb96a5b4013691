//! Linear warm-up then cosine decay to zero, stepped per iteration, as in
//! the paper's code (`WarmUpAndCosineDecay`).
use std::f64::consts::PI;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub peak: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// The rate for 0-based step `step`. Warm-up uses (step + 1) / W rather
    /// than the paper's step / W so the first update is not wasted at zero.
    pub fn learning_rate(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        self.peak * 0.5 * (1.0 + (PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays() {
        let schedule = Schedule { peak: 1.0, warmup_steps: 10, total_steps: 110 };
        assert!((schedule.learning_rate(0) - 0.1).abs() < 1e-12);
        assert!((schedule.learning_rate(9) - 1.0).abs() < 1e-12);
        assert!((schedule.learning_rate(10) - 1.0).abs() < 1e-12);
        assert!((schedule.learning_rate(60) - 0.5).abs() < 1e-12);
        assert!(schedule.learning_rate(109) < 0.001);
    }
}
