//! How long a run trains when `train.time_budget_seconds` sizes it.

/// Sizes a run to `train.time_budget_seconds` of training (epoch time; the
/// kNN monitor is not counted). The first epoch pays one-off costs (cuDNN's
/// benchmark mode tries its kernels, the allocators grow, pages are touched
/// for the first time), so it gives a provisional plan, as many epochs as fit
/// at its pace; the second, the first at full speed, gives the plan: two plus
/// as many as fit in the time left at its pace. The cosine schedule follows
/// the plan; changing its length at the end of epoch 2 barely moves the
/// learning rate, as the cosine is still flat there (after a warm-up epoch,
/// 1 - lr/peak is under 1% for any final length of 17 epochs or more).
/// After that the plan only shrinks: when the warm epochs' mean pace says
/// the planned ones would end past the budget (a machine that slows down;
/// a CPU race once ran 6% over), it becomes the epochs that still fit, so
/// the budget is a ceiling. Shrinking by an epoch of a long run lowers the
/// learning rate a little sooner. A resumed run counts from its resume,
/// and its process's first epoch, which pays the one-off costs again, is
/// not warm.
#[derive(Debug)]
pub(super) struct Budget {
    pub(super) seconds: f64,
    spent: f64,
    /// Epochs this process has closed: all but its first are warm (the
    /// second closed is at least epoch 2).
    closed: usize,
    /// Whole-epoch seconds of the warm epochs.
    warm_seconds: f64,
}

impl Budget {
    pub(super) fn new(seconds: f64) -> Self {
        Self { seconds, spent: 0.0, closed: 0, warm_seconds: 0.0 }
    }

    /// The planned number of epochs now that `epoch` (1-based) is done in
    /// `seconds` (`whole_epoch_seconds` for all its batches), where
    /// `planned` were; `None` where the plan stands.
    pub(super) fn plan(
        &mut self,
        epoch: usize,
        seconds: f64,
        whole_epoch_seconds: f64,
        planned: usize,
    ) -> Option<usize> {
        self.spent += seconds;
        self.closed += 1;
        if self.closed >= 2 {
            self.warm_seconds += whole_epoch_seconds;
        }
        let fit = |seconds: f64, pace: f64| (seconds.max(0.0) / pace).floor() as usize;
        match epoch {
            1 => Some(fit(self.seconds, whole_epoch_seconds).max(1)),
            2 => Some(2 + fit(self.seconds - self.spent, whole_epoch_seconds)),
            _ if self.closed < 2 => None,
            _ => {
                let pace = self.warm_seconds / (self.closed - 1) as f64;
                let left = planned.saturating_sub(epoch);
                let fits = epoch + fit(self.seconds - self.spent, pace);
                (self.spent + left as f64 * pace > self.seconds && fits < planned).then_some(fits)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_is_planned_from_the_first_epoch_then_from_the_first_warm_one() {
        let mut budget = Budget::new(180.0);
        // A slow first epoch (autotuning) plans too few...
        assert_eq!(budget.plan(1, 6.0, 6.0, 200), Some(30));
        // ...the warm second fills what is left: 2 + floor((180 - 8) / 2).
        assert_eq!(budget.plan(2, 2.0, 2.0, 30), Some(88));
        // At the same pace the plan stands.
        assert_eq!(budget.plan(3, 2.0, 2.0, 88), None);

        // A first epoch over the budget still trains one epoch.
        assert_eq!(Budget::new(1.0).plan(1, 5.0, 5.0, 200), Some(1));
        // A second epoch that ends past the budget stops the run there.
        let mut over = Budget::new(10.0);
        assert_eq!(over.plan(1, 4.0, 4.0, 200), Some(2));
        assert_eq!(over.plan(2, 7.0, 7.0, 2), Some(2));
        // A resumed epoch is sized by its whole-epoch pace, not its remainder.
        assert_eq!(Budget::new(100.0).plan(1, 1.0, 10.0, 200), Some(10));
    }

    #[test]
    fn a_budget_shrinks_its_plan_when_the_epochs_slow_down_and_never_grows_it() {
        let mut budget = Budget::new(100.0);
        assert_eq!(budget.plan(1, 10.0, 10.0, 50), Some(10));
        // 2 + floor((100 - 20) / 10) = 10.
        assert_eq!(budget.plan(2, 10.0, 10.0, 10), Some(10));
        // Epochs 2 and 3 average 12.5 s: 20 + 15 = 35 s spent, and seven more
        // at that pace would end at 122.5 s; floor(65 / 12.5) = 5 more fit.
        assert_eq!(budget.plan(3, 15.0, 15.0, 10), Some(8));
        // Back on pace (a mean of 11.7 s over three): 45 + 4 x 11.7 = 91.7 s stands.
        assert_eq!(budget.plan(4, 10.0, 10.0, 8), None);
        // Faster epochs never lengthen the plan.
        assert_eq!(budget.plan(5, 1.0, 1.0, 8), None);
        // Control: the same epochs without the slow one keep all ten.
        let mut steady = Budget::new(100.0);
        steady.plan(1, 10.0, 10.0, 50);
        steady.plan(2, 10.0, 10.0, 10);
        assert_eq!(steady.plan(3, 10.0, 10.0, 10), None);

        // Resumed at epoch 3 of 180 planned at 1.6 s: the process's first
        // epoch (6 s, autotuning again) is not its pace...
        let mut resumed = Budget::new(300.0);
        assert_eq!(resumed.plan(4, 6.0, 6.0, 180), None);
        // ...its second is: 7.6 s spent + 175 x 1.6 s = 287.6 s stands.
        assert_eq!(resumed.plan(5, 1.6, 1.6, 180), None);
    }
}
