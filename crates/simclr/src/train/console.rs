//! The observer a command-line run uses: a stop flag (set by a signal
//! handler) and a progress bar on the terminal.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

use super::metrics::EpochMetrics;
use super::trainer::{Control, Observer, Progress};

/// The observer of a run on a terminal: stops the run when asked (after
/// the step, with a checkpoint) and draws a progress bar.
pub struct Console {
    stop: Arc<AtomicBool>,
    bar: Option<ProgressBar>,
    terminal: bool,
    #[cfg(feature = "fault-injection")]
    faults: super::faults::Faults,
}

impl Console {
    /// An observer that stops the run once `stop` is set (by a signal
    /// handler, say) and draws a progress bar when stderr is a terminal.
    pub fn new(stop: Arc<AtomicBool>) -> crate::Result<Self> {
        Ok(Self {
            stop,
            bar: None,
            terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            #[cfg(feature = "fault-injection")]
            faults: super::faults::Faults::from_env()?,
        })
    }

    /// The same, never drawing: for the processes of a multi-process run but rank 0.
    pub fn without_bar(mut self) -> Self {
        self.terminal = false;
        self
    }

    fn control(&self, _step: usize) -> Control {
        #[cfg(feature = "fault-injection")]
        self.faults.kill_after(_step);
        #[cfg(feature = "fault-injection")]
        if self.faults.stop_after(_step) {
            return Control::Stop;
        }
        match self.stop.load(Ordering::SeqCst) {
            true => Control::Stop,
            false => Control::Continue,
        }
    }
}

impl Observer for Console {
    fn on_step(&mut self, progress: &Progress) -> Control {
        if self.terminal {
            let bar = self.bar.get_or_insert_with(|| {
                let style = ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                    .expect("the template is valid")
                    .progress_chars("=> ");
                let bar = ProgressBar::new(progress.steps_per_epoch as u64).with_style(style);
                bar.set_prefix(format!("{}/{}", progress.position.epoch + 1, progress.epochs));
                bar
            });
            bar.set_position(progress.position.batch as u64);
            if let Some(loss) = progress.loss {
                let (rate, speed) = (progress.learning_rate, progress.images_per_second);
                let waited = 100.0 * progress.data_wait_share;
                bar.set_message(format!("loss {loss:.4} lr {rate:.4} {speed:.0} images/s, data wait {waited:.0}%"));
            }
        }
        self.control(progress.position.step)
    }

    fn on_epoch_end(&mut self, metrics: &EpochMetrics) -> Control {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.control(metrics.step)
    }

    #[cfg(feature = "fault-injection")]
    fn poison(&mut self, step: usize) -> bool {
        self.faults.poisoned(step)
    }
}
