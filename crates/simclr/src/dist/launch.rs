//! Starting a multi-process run: the environment a process finds itself in
//! (torchrun's or SLURM's variables), and the local launcher behind
//! `simclr train --nproc-per-node N`, which starts N copies of the command
//! with torchrun's variables set.
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Backend, GroupOptions, ProcessGroup, Rendezvous, StoreServer};
use crate::{Error, Result};

/// torchrun's port when none is given.
const DEFAULT_PORT: u16 = 29500;

/// How many times torchrun's agent has restarted a run's processes.
const RESTART_COUNT: &str = "TORCHELASTIC_RESTART_COUNT";

/// This process's place in a multi-process run, from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// The process's index on its machine: which GPU it uses.
    pub local_rank: usize,
    pub host: String,
    pub port: u16,
    /// Whether this process serves the TCP store: rank 0, unless torchrun's
    /// agent already does (`TORCHELASTIC_USE_AGENT_STORE`).
    pub serves_store: bool,
    /// How many processes run on this machine, where the launcher says
    /// (torchrun's `LOCAL_WORLD_SIZE`).
    pub local_size: Option<usize>,
    /// How many times torchrun's agent has restarted the processes
    /// (`TORCHELASTIC_RESTART_COUNT`, with `--max-restarts`); 0 at first.
    pub attempt: usize,
}

/// One environment variable, unset or empty meaning absent.
type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

fn variable(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value.parse().map_err(|_| Error::Distributed(format!("{name}={value}: expected a non-negative integer")))
}

fn required(lookup: Lookup, name: &str, why: &str) -> Result<String> {
    lookup(name).ok_or_else(|| Error::Distributed(format!("{name} is not set ({why})")))
}

impl World {
    /// torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
    /// `MASTER_ADDR`, `MASTER_PORT`), else, in a task that srun started
    /// (`SLURM_STEP_ID` set), SLURM's (`SLURM_PROCID`, the step's
    /// `SLURM_STEP_NUM_TASKS` or `SLURM_NTASKS`, `SLURM_LOCALID`, with
    /// `MASTER_ADDR` and optionally `MASTER_PORT`); `None` when neither
    /// says there are several processes. A batch script (or an salloc
    /// shell) has SLURM's rank and task count too, but no other process
    /// of them is coming: a command run there directly is one process.
    pub fn from_env() -> Result<Option<World>> {
        Self::from_variables(&variable)
    }

    /// [`World::from_env`] over any source of variables.
    pub fn from_variables(lookup: Lookup) -> Result<Option<World>> {
        let (rank, size, local_rank, port) = if let Some(rank) = lookup("RANK") {
            let size = required(lookup, "WORLD_SIZE", "RANK is")?;
            let port = required(lookup, "MASTER_PORT", "RANK is")?;
            let local = lookup("LOCAL_RANK").unwrap_or_else(|| "0".to_owned());
            (
                number("RANK", &rank)?,
                number("WORLD_SIZE", &size)?,
                number("LOCAL_RANK", &local)?,
                number("MASTER_PORT", &port)?,
            )
        } else if let (Some(rank), Some(size)) =
            (lookup("SLURM_PROCID"), lookup("SLURM_STEP_NUM_TASKS").or_else(|| lookup("SLURM_NTASKS")))
        {
            if lookup("SLURM_STEP_ID").is_none() {
                if size != "1" {
                    tracing::info!(
                        "SLURM_NTASKS={size}, but srun did not start this process: it trains alone (srun starts \
                         one process per task; --nproc-per-node N starts N on this machine)"
                    );
                }
                return Ok(None);
            }
            let local = lookup("SLURM_LOCALID").unwrap_or_else(|| "0".to_owned());
            let port = lookup("MASTER_PORT").map_or(Ok(DEFAULT_PORT), |port| number("MASTER_PORT", &port))?;
            (number("SLURM_PROCID", &rank)?, number("SLURM_NTASKS", &size)?, number("SLURM_LOCALID", &local)?, port)
        } else {
            return Ok(None);
        };
        let size: usize = size;
        if size <= 1 && lookup("RANK").is_none() {
            return Ok(None);
        }
        if size == 0 || rank >= size {
            return Err(Error::Distributed(format!("rank {rank} of a world of {size}: expected 0 <= rank < size")));
        }
        let host = required(lookup, "MASTER_ADDR", "the address of rank 0's machine, where the processes meet")?;
        let agent_store =
            lookup("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|value| value.eq_ignore_ascii_case("true"));
        let local_size = lookup("LOCAL_WORLD_SIZE").map(|n| number("LOCAL_WORLD_SIZE", &n)).transpose()?;
        let attempt = lookup(RESTART_COUNT).map_or(Ok(0), |n| number(RESTART_COUNT, &n))?;
        let serves_store = rank == 0 && !agent_store;
        Ok(Some(World { rank, size, local_rank, host, port, serves_store, local_size, attempt }))
    }

    /// `--nproc-per-node processes` given to a process that a launcher
    /// started: right where that launcher started `processes` on this
    /// machine (as `simclr train --nproc-per-node` gives its own processes
    /// the same flag), else an error, since it would start nothing.
    pub fn check_nproc_per_node(&self, processes: usize) -> Result<()> {
        if self.local_size == Some(processes) {
            return Ok(());
        }
        let local = self.local_size.map_or_else(String::new, |n| format!(", {n} on this machine"));
        Err(Error::Distributed(format!(
            "--nproc-per-node {processes}: this process is already rank {} of {}{local}, started by torchrun or \
             srun, which start the processes; leave --nproc-per-node out, or run without them",
            self.rank, self.size
        )))
    }

    /// Whether CUDA tensors go through NCCL: asked for, or (`auto`) in a
    /// cuda build training on CUDA with at least one GPU per process of
    /// this machine (NCCL refuses two processes on one GPU).
    pub fn uses_nccl(&self, backend: Backend, cuda: bool) -> Result<bool> {
        check_backend(backend, cuda)?;
        match backend {
            Backend::Gloo => Ok(false),
            Backend::Nccl => Ok(true),
            Backend::Auto => {
                let local = self.local_size.unwrap_or(1) as i64;
                Ok(cfg!(feature = "cuda") && cuda && tch::Cuda::device_count() >= local)
            }
        }
    }

    /// Joins the other processes (waiting for them up to `timeout`), with
    /// NCCL for CUDA tensors when `nccl`.
    pub fn join(&self, timeout: Duration, nccl: bool) -> Result<ProcessGroup> {
        let loopback = matches!(self.host.as_str(), "127.0.0.1" | "localhost" | "::1");
        let options = GroupOptions {
            rendezvous: Rendezvous::Tcp { host: self.host.clone(), port: self.port, server: self.serves_store },
            rank: self.rank,
            size: self.size,
            timeout,
            // Processes of one machine talk over loopback; across machines,
            // Gloo binds to the host's own address (or GLOO_SOCKET_IFNAME's).
            device_host: loopback.then(|| "127.0.0.1".to_owned()),
            interface: variable("GLOO_SOCKET_IFNAME"),
            nccl,
            attempt: self.attempt,
        };
        ProcessGroup::new(&options)
    }
}

/// A start of a run that its launcher made again after the run failed:
/// torchrun's agent (`--max-restarts`), or SLURM requeueing the job (after
/// a preemption or a node's failure, with `--requeue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restart {
    /// The variable that counts the restarts.
    pub counter: &'static str,
    /// How many restarts, this one included.
    pub count: usize,
}

/// SLURM's count of a job's requeues.
const REQUEUE_COUNT: &str = "SLURM_RESTART_COUNT";

impl Restart {
    /// The restart this process is, from its environment; `None` in a
    /// first start.
    pub fn from_env() -> Result<Option<Restart>> {
        Self::from_variables(&variable)
    }

    /// [`Restart::from_env`] over any source of variables.
    pub fn from_variables(lookup: Lookup) -> Result<Option<Restart>> {
        for counter in [RESTART_COUNT, REQUEUE_COUNT] {
            if let Some(count) = lookup(counter) {
                let count: usize = number(counter, &count)?;
                return Ok((count > 0).then_some(Restart { counter, count }));
            }
        }
        Ok(None)
    }
}

/// A global batch splits into equal slices, one per process.
pub fn check_divides(batch_size: usize, processes: usize) -> Result<()> {
    if processes == 0 {
        return Err(Error::Distributed("0 processes: at least 1 is needed".to_owned()));
    }
    if !batch_size.is_multiple_of(processes) || batch_size / processes < 2 {
        return Err(Error::Config(vec![format!(
            "train.batch_size = {batch_size} does not split into {processes} equal slices of at least 2 images \
             (one per process); use a multiple of {processes}"
        )]));
    }
    Ok(())
}

/// The collectives' backend asked for can carry the run's tensors: NCCL
/// needs the cuda build and CUDA tensors (a CPU run goes through Gloo).
pub fn check_backend(backend: Backend, cuda: bool) -> Result<()> {
    let nccl = "train.dist_backend = \"nccl\"";
    match backend {
        Backend::Nccl if !cfg!(feature = "cuda") => {
            Err(Error::Distributed(format!("{nccl} needs the cuda build (./x.sh build-cuda)")))
        }
        Backend::Nccl if !cuda => Err(Error::Distributed(format!(
            "{nccl} carries CUDA tensors only, and the run's device is the CPU (train.device); use \"gloo\" or \"auto\""
        ))),
        _ => Ok(()),
    }
}

/// The exit code of a process that stopped as asked, with a checkpoint
/// written (the shell's code for SIGINT): a stop every rank agreed on, not
/// a failure.
pub const STOPPED: i32 = 130;

/// How the local processes of [`spawn_local`] ended.
#[derive(Debug)]
pub enum Outcome {
    /// Every process exited with success.
    Finished,
    /// A stop was asked (a signal to the launcher or to any process) and
    /// every process exited.
    Stopped,
    /// `rank` failed first with `status`, and `cause` is the failure a
    /// rank left ([`ProcessGroup::explain`]), if any; the others were
    /// stopped. `stuck`: where `rank` timed out waiting for the others, and
    /// no rank left a cause, those still running a while after it ended.
    Failed { rank: usize, status: ExitStatus, cause: Option<(usize, String)>, stuck: Vec<usize> },
}

/// Runs `processes` copies of this executable with `args` on this machine,
/// rank i with torchrun's variables for a world of `processes` meeting at
/// a TCP store this launcher serves on 127.0.0.1 (as torchrun's agent
/// does; its waits end after `timeout`). When one fails, the others are
/// stopped (SIGTERM, then SIGKILL after `grace`); when `stop` is raised
/// (the launcher got SIGINT or SIGTERM), every process is sent SIGTERM, so
/// each writes its checkpoint and exits. A process that exits with
/// [`STOPPED`] stopped with all the others (they agree on every stop), so
/// the launcher waits for them rather than stopping them.
pub fn spawn_local(
    processes: usize,
    args: &[OsString],
    stop: &AtomicBool,
    grace: Duration,
    timeout: Duration,
) -> Result<Outcome> {
    if processes == 0 {
        return Err(Error::Distributed("--nproc-per-node 0: must be at least 1".to_owned()));
    }
    let executable = std::env::current_exe().map_err(|e| Error::Distributed(format!("finding this program: {e}")))?;
    let store = StoreServer::serve("127.0.0.1", timeout)?;
    let port = store.port().to_string();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / processes).max(1).to_string();
    let mut children: Vec<Option<Child>> = Vec::new();
    for rank in 0..processes {
        let mut command = Command::new(&executable);
        command
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", processes.to_string())
            .env("LOCAL_WORLD_SIZE", processes.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .env("TORCHELASTIC_USE_AGENT_STORE", "True")
            .env_remove(RESTART_COUNT);
        // The cores are shared out, as torchrun does, unless the user chose.
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            command.env("OMP_NUM_THREADS", &threads);
        }
        match command.spawn() {
            Ok(child) => children.push(Some(child)),
            Err(error) => {
                terminate(&mut children, grace);
                return Err(Error::Distributed(format!("starting rank {rank} ({}): {error}", executable.display())));
            }
        }
    }
    let (mut signalled, mut stopped) = (false, false);
    loop {
        if stop.load(Ordering::Relaxed) && !signalled {
            signalled = true;
            for child in children.iter().flatten() {
                signal(child, libc::SIGTERM);
            }
        }
        // The first failure seen, one killed by a signal before others: it
        // ended first, and its peers failed for it.
        let mut failed: Option<(usize, ExitStatus)> = None;
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            let status = child.try_wait().map_err(|e| Error::Distributed(format!("waiting for rank {rank}: {e}")))?;
            match status {
                Some(status) if status.success() || signalled => *slot = None,
                Some(status) if status.code() == Some(STOPPED) => {
                    stopped = true;
                    *slot = None;
                }
                Some(status) => {
                    *slot = None;
                    if failed.is_none_or(|(_, first)| first.signal().is_none() && status.signal().is_some()) {
                        failed = Some((rank, status));
                    }
                }
                None => {}
            }
        }
        if let Some((rank, status)) = failed {
            // A rank that failed alone left its cause before it left the
            // group, so before any other could fail for it.
            let cause = store.cause(processes);
            // One stuck: the others time out waiting for it, about together,
            // and it runs on.
            let stuck = match cause.is_none() && store.timed_out(rank) {
                true => still_running(&mut children, grace),
                false => Vec::new(),
            };
            // Killed: a stuck process has nothing to finish (rank 0 writes
            // the checkpoints), and on a SIGTERM it would report a timeout
            // of its own, as if another had stopped answering.
            for child in stuck.iter().filter_map(|&rank| children[rank].as_ref()) {
                signal(child, libc::SIGKILL);
            }
            terminate(&mut children, grace);
            return Ok(Outcome::Failed { rank, status, cause, stuck });
        }
        if children.iter().all(Option::is_none) {
            return Ok(if signalled || stopped { Outcome::Stopped } else { Outcome::Finished });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) on a child this process started and has not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
}

/// The ranks of `children` still running after `wait`, those that ended
/// within it reaped.
fn still_running(children: &mut [Option<Child>], wait: Duration) -> Vec<usize> {
    let deadline = Instant::now() + wait;
    loop {
        for slot in children.iter_mut() {
            if slot.as_mut().is_some_and(|child| !matches!(child.try_wait(), Ok(None))) {
                *slot = None;
            }
        }
        let running: Vec<usize> = (0..children.len()).filter(|&rank| children[rank].is_some()).collect();
        if running.is_empty() || Instant::now() >= deadline {
            return running;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM to every running process (continued, if a stop signal holds it),
/// then SIGKILL to those still running after `grace`.
fn terminate(children: &mut [Option<Child>], grace: Duration) {
    for child in children.iter().flatten() {
        signal(child, libc::SIGTERM);
        signal(child, libc::SIGCONT);
    }
    let deadline = Instant::now() + grace;
    for slot in children.iter_mut() {
        let Some(child) = slot else { continue };
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        *slot = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(pairs: &[(&str, &str)]) -> Result<Option<World>> {
        let lookup = |name: &str| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string());
        World::from_variables(&lookup)
    }

    #[test]
    fn torchrun_and_slurm_variables_give_the_world() {
        assert_eq!(world(&[]).unwrap(), None);
        let torchrun = [
            ("RANK", "9"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29400"),
        ];
        let expected = World {
            rank: 9,
            size: 16,
            local_rank: 1,
            host: "10.0.0.1".to_owned(),
            port: 29400,
            serves_store: false,
            local_size: None,
            attempt: 0,
        };
        assert_eq!(world(&torchrun).unwrap(), Some(expected));
        // A restart by torchrun's agent (--max-restarts).
        let restarted = [torchrun.as_slice(), &[("TORCHELASTIC_RESTART_COUNT", "2")]].concat();
        assert_eq!(world(&restarted).unwrap().unwrap().attempt, 2);
        // Rank 0 serves the store, unless torchrun's agent already does.
        let rank0 = [("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")];
        assert!(world(&rank0).unwrap().unwrap().serves_store);
        let agent = [rank0.as_slice(), &[("TORCHELASTIC_USE_AGENT_STORE", "True")]].concat();
        assert!(!world(&agent).unwrap().unwrap().serves_store);
        // SLURM in a task srun started, with torchrun's default port; one
        // task is no multi-process run.
        let slurm = [
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "3"),
            ("MASTER_ADDR", "n1"),
        ];
        let world_of_slurm = world(&slurm).unwrap().unwrap();
        assert_eq!((world_of_slurm.rank, world_of_slurm.size, world_of_slurm.port), (3, 8, DEFAULT_PORT));
        assert_eq!(world(&[("SLURM_STEP_ID", "0"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap(), None);
        // The step's tasks, where they are fewer than the job's.
        let step = [slurm.as_slice(), &[("SLURM_STEP_NUM_TASKS", "4")]].concat();
        assert_eq!(world(&step).unwrap().unwrap().size, 4);
        // A batch script of 8 tasks has rank 0 of 8, but no step: one process.
        assert_eq!(world(&slurm[1..]).unwrap(), None);
    }

    #[test]
    fn a_launchers_restart_is_told_from_a_first_start() {
        let restart = |pairs: &[(&str, &str)]| {
            Restart::from_variables(&|name| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string()))
        };
        assert_eq!(restart(&[]).unwrap(), None);
        assert_eq!(restart(&[("TORCHELASTIC_RESTART_COUNT", "0")]).unwrap(), None);
        let torchrun = Restart { counter: "TORCHELASTIC_RESTART_COUNT", count: 2 };
        assert_eq!(restart(&[("TORCHELASTIC_RESTART_COUNT", "2")]).unwrap(), Some(torchrun));
        let requeued = Restart { counter: "SLURM_RESTART_COUNT", count: 1 };
        assert_eq!(restart(&[("SLURM_RESTART_COUNT", "1")]).unwrap(), Some(requeued));
        let error = restart(&[("SLURM_RESTART_COUNT", "x")]).unwrap_err().to_string();
        assert!(error.contains("SLURM_RESTART_COUNT=x"), "{error}");
    }

    #[test]
    fn nproc_per_node_is_refused_where_a_launcher_started_other_processes() {
        let launched = |local: &str| {
            let pairs = [("RANK", "0"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")];
            world(&[pairs.as_slice(), &[("LOCAL_WORLD_SIZE", local)]].concat()).unwrap().unwrap()
        };
        // `--nproc-per-node 2`'s own processes carry the flag on.
        assert!(launched("2").check_nproc_per_node(2).is_ok());
        let error = launched("4").check_nproc_per_node(2).unwrap_err().to_string();
        assert!(
            error.contains("--nproc-per-node 2: this process is already rank 0 of 4, 4 on this machine"),
            "{error}"
        );
        let slurm = [("SLURM_STEP_ID", "0"), ("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("MASTER_ADDR", "n1")];
        let error = world(&slurm).unwrap().unwrap().check_nproc_per_node(2).unwrap_err().to_string();
        assert!(error.contains("already rank 1 of 2, started by torchrun or srun"), "{error}");
    }

    #[test]
    fn bad_variables_are_named() {
        let message = |pairs: &[(&str, &str)]| world(pairs).unwrap_err().to_string();
        assert!(message(&[("RANK", "0"), ("MASTER_PORT", "1")]).contains("WORLD_SIZE is not set"));
        assert!(message(&[("RANK", "x"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("RANK=x"));
        assert!(message(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")])
            .contains("rank 2 of a world of 2"));
        assert!(message(&[("SLURM_STEP_ID", "0"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")])
            .contains("MASTER_ADDR is not set"));
        assert!(check_divides(4, 3).unwrap_err().to_string().contains("train.batch_size = 4"));
        assert!(check_divides(4, 0).is_err() && check_divides(8, 4).is_ok() && check_divides(4, 4).is_err());
    }
}
