//! Fault injection for the robustness tests, built only with the
//! `fault-injection` feature (`./x.sh test` enables it through the binary's
//! feature of that name; the shipped binary does not, so it never reads
//! these variables):
//! - `SIMCLR_TEST_STOP_AFTER_STEPS=N`: stop as a signal would, once N steps are done;
//! - `SIMCLR_TEST_KILL_AFTER_STEPS=N`: SIGKILL the process once N steps are
//!   done (before anything the loop does after the step, a checkpoint due);
//! - `SIMCLR_TEST_POISON_STEPS=a,b,...`: make the loss of these 0-based steps NaN;
//! - `SIMCLR_TEST_WRITE_PAUSE_MS=N`: pause halfway through writing each file.
use crate::{Error, Result};

#[derive(Debug, Default)]
pub struct Faults {
    stop_after_steps: Option<usize>,
    kill_after_steps: Option<usize>,
    poison_steps: Vec<usize>,
}

/// Step numbers from a variable, comma-separated; absent means none.
fn steps(name: &str) -> Result<Vec<usize>> {
    let Ok(value) = std::env::var(name) else { return Ok(Vec::new()) };
    let bad = |e: std::num::ParseIntError| Error::InvalidArgument(format!("{name}={value}: {e}"));
    value.split(',').map(|v| v.trim().parse().map_err(bad)).collect()
}

impl Faults {
    pub fn from_env() -> Result<Self> {
        Ok(Self {
            stop_after_steps: steps("SIMCLR_TEST_STOP_AFTER_STEPS")?.first().copied(),
            kill_after_steps: steps("SIMCLR_TEST_KILL_AFTER_STEPS")?.first().copied(),
            poison_steps: steps("SIMCLR_TEST_POISON_STEPS")?,
        })
    }

    pub fn stop_after(&self, step: usize) -> bool {
        self.stop_after_steps.is_some_and(|steps| step >= steps)
    }

    /// Kills this process, as `kill -9` would, once `step` steps are done
    /// (nothing after it runs: no destructor, no buffered write).
    pub fn kill_after(&self, step: usize) {
        if self.kill_after_steps.is_some_and(|steps| step >= steps) {
            // SAFETY: kill(2) on this process; SIGKILL cannot be caught.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }

    pub fn poisoned(&self, step: usize) -> bool {
        self.poison_steps.contains(&step)
    }
}

/// Process-wide faults, set before anything runs.
pub fn install() {
    if let Ok(pause) = std::env::var("SIMCLR_TEST_WRITE_PAUSE_MS") {
        crate::io::set_write_pause(pause.parse().unwrap_or(0));
    }
}
