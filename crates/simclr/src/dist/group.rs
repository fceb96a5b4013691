//! A c10d process group, through the shim in `c10d.cpp`: the same engine
//! PyTorch's DDP uses (Gloo for CPU tensors, NCCL for CUDA ones).
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use tch::Tensor;

use crate::{Error, Result};

extern "C" {
    fn simclr_dist_last_error() -> *const c_char;
    #[allow(clippy::too_many_arguments)]
    fn simclr_dist_new_group(
        kind: *const c_char,
        address: *const c_char,
        port: c_int,
        server: c_int,
        prefix: *const c_char,
        rank: c_int,
        size: c_int,
        timeout_ms: i64,
        device_host: *const c_char,
        interface: *const c_char,
        nccl: c_int,
        out: *mut *mut c_void,
    ) -> c_int;
    fn simclr_dist_serve_store(
        address: *const c_char,
        timeout_ms: i64,
        out: *mut *mut c_void,
        port: *mut c_int,
    ) -> c_int;
    fn simclr_dist_served_lookup(
        store: *mut c_void,
        key: *const c_char,
        out: *mut *mut u8,
        length: *mut usize,
        found: *mut c_int,
    ) -> c_int;
    fn simclr_dist_free_store(store: *mut c_void);
    fn simclr_dist_free(group: *mut c_void);
    fn simclr_dist_all_reduce(group: *mut c_void, tensor: *mut c_void, op: c_int) -> c_int;
    fn simclr_dist_broadcast(group: *mut c_void, tensor: *mut c_void, root: c_int) -> c_int;
    fn simclr_dist_all_gather(group: *mut c_void, output: *mut c_void, input: *mut c_void) -> c_int;
    fn simclr_dist_reduce_scatter(group: *mut c_void, output: *mut c_void, input: *mut c_void) -> c_int;
    fn simclr_dist_all_reduce_sum_grad(group: *mut c_void, input: *mut c_void, out: *mut *mut c_void) -> c_int;
    fn simclr_dist_all_gather_grad(group: *mut c_void, input: *mut c_void, out: *mut *mut c_void) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn simclr_dist_batch_norm(
        group: *mut c_void,
        input: *mut c_void,
        weight: *mut c_void,
        bias: *mut c_void,
        running_mean: *mut c_void,
        running_var: *mut c_void,
        momentum: f64,
        eps: f64,
        images: *const i64,
        out: *mut *mut c_void,
    ) -> c_int;
    fn simclr_dist_store_set(group: *mut c_void, key: *const c_char, data: *const u8, length: usize) -> c_int;
    fn simclr_dist_store_get(group: *mut c_void, key: *const c_char, out: *mut *mut u8, length: *mut usize) -> c_int;
    fn simclr_dist_store_lookup(
        group: *mut c_void,
        key: *const c_char,
        out: *mut *mut u8,
        length: *mut usize,
        found: *mut c_int,
    ) -> c_int;
    fn simclr_dist_store_add(group: *mut c_void, key: *const c_char, amount: i64, value: *mut i64) -> c_int;
    fn simclr_dist_free_bytes(bytes: *mut u8);
    #[allow(clippy::too_many_arguments)]
    fn simclr_dist_buckets_new(
        group: *mut c_void,
        params: *const *mut c_void,
        dims: *const i64,
        ranks: *const i64,
        count: usize,
        flat: *mut c_void,
        cap_bytes: i64,
        bf16: c_int,
        out: *mut *mut c_void,
    ) -> c_int;
    fn simclr_dist_buckets_arm(buckets: *mut c_void, last: c_int) -> c_int;
    fn simclr_dist_buckets_finish(buckets: *mut c_void) -> c_int;
    fn simclr_dist_buckets_sent(buckets: *mut c_void, sent: *mut usize, count: *mut usize);
    fn simclr_dist_buckets_clear(buckets: *mut c_void);
    fn simclr_dist_buckets_free(buckets: *mut c_void);
}

/// Where the ranks meet to exchange addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendezvous {
    /// A file every rank can reach (one machine, or a shared file system).
    File(PathBuf),
    /// A TCP store at `host:port`; the rank with `server` serves it.
    Tcp { host: String, port: u16, server: bool },
}

#[derive(Debug, Clone)]
pub struct GroupOptions {
    pub rendezvous: Rendezvous,
    pub rank: usize,
    pub size: usize,
    /// How long any collective or store wait may take before every rank
    /// gives up with an error.
    pub timeout: Duration,
    /// The address Gloo's connections bind to; `None`: the host's own
    /// name, falling back to loopback, as torch does.
    pub device_host: Option<String>,
    /// A network interface for Gloo instead (torch's `GLOO_SOCKET_IFNAME`).
    pub interface: Option<String>,
    /// NCCL for CUDA tensors (the `cuda` build); otherwise Gloo serves both.
    pub nccl: bool,
    /// Which start of the run this is, 0 the first (torchrun's
    /// `TORCHELASTIC_RESTART_COUNT`): each start's keys are kept apart in a
    /// store that outlives starts (torchrun's agent's), so that a restart
    /// reads none of its predecessor's Gloo addresses, say.
    pub attempt: usize,
}

/// Where the keys of a group of `attempt` go in its store.
fn namespace(attempt: usize) -> String {
    format!("simclr/attempt_{attempt}")
}

/// Where a rank that failed leaves its cause, in its group's namespace.
fn cause_key(rank: usize) -> String {
    format!("cause/{rank}")
}

/// Where a rank says that a collective of its timed out, waiting for others.
fn waited_key(rank: usize) -> String {
    format!("waited/{rank}")
}

/// Whether `error` broke off a collective rather than failing its rank
/// alone: the group's own, or libtorch's from a collective that autograd
/// ran (the backward of the gather, say: Gloo's or c10d's message).
fn from_the_group(error: &Error) -> bool {
    match error {
        Error::Distributed(_) => true,
        Error::Torch(error) => {
            let message = error.to_string();
            message.contains("gloo") || message.contains("c10d")
        }
        _ => false,
    }
}

/// Where a rank records the machine it runs on, for others to name it by.
fn host_key(rank: usize) -> String {
    format!("host/{rank}")
}

/// The counter of ranks whose collective timed out: the first to add to it
/// looks for the ranks that did not, and leaves them at [`STUCK_KEY`].
const WAITING_KEY: &str = "waiting";
const STUCK_KEY: &str = "stuck";

/// How long the first rank whose collective timed out waits for the
/// others' to time out too, at most: they entered the collective at about
/// the same time, a step apart at most. A quarter of a shorter timeout.
const STUCK_GRACE: Duration = Duration::from_secs(10);

/// This machine's name, as `gethostname(2)` gives it.
fn host_name() -> String {
    let mut name = [0u8; 256];
    // SAFETY: the buffer is valid for its length; the name is NUL-terminated
    // where it fits, and the last byte stays 0 where it does not.
    let code = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len() - 1) };
    match code {
        0 => CStr::from_bytes_until_nul(&name).map(|name| name.to_string_lossy().into_owned()).unwrap_or_default(),
        _ => String::new(),
    }
}

/// Whether a collective's error is its timeout (Gloo's "Operation timed out!",
/// "Timed out waiting ...").
fn timed_out(error: &Error) -> bool {
    from_the_group(error) && error.to_string().to_lowercase().contains("timed out")
}

/// Whether a collective's error is its connection to a peer broken off
/// (Gloo's "Connection closed by peer", "Connection reset by peer", "Broken
/// pipe", "Connection refused"; NCCL's ncclRemoteError, "a network error or
/// a remote process exiting prematurely", as libtorch_cuda words it): the
/// peer's process is gone.
fn broke_off(error: &Error) -> bool {
    const GONE: [&str; 4] = ["by peer", "broken pipe", "connection refused", "remote process exiting"];
    let message = error.to_string().to_lowercase();
    from_the_group(error) && GONE.iter().any(|gone| message.contains(gone))
}

/// A collective's error in a line, for a message of the group's own: its
/// first (libtorch's go on with a C++ stack), less the variant's prefix and
/// libtorch's, with Gloo's source location (`[.../pair.cc:547] `) left out.
fn first_line(error: &Error) -> String {
    let message = error.to_string();
    let line = message.lines().next().unwrap_or_default();
    let line = ["distributed: ", "libtorch: ", "Internal torch error: "]
        .iter()
        .fold(line, |line, prefix| line.strip_prefix(prefix).unwrap_or(line));
    match (line.find('['), line.find("] ")) {
        (Some(open), Some(close)) if open < close && line[open..close].contains(".cc:") => {
            format!("{}{}", &line[..open], &line[close + 2..])
        }
        _ => line.to_owned(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum = 0,
    Max = 1,
    Min = 2,
}

/// One rank's membership of a group of `size` processes. Collectives must
/// be called in the same order on every rank. Dropping it shuts the
/// backends down.
#[derive(Debug)]
pub struct ProcessGroup {
    raw: NonNull<c_void>,
    rank: usize,
    size: usize,
    /// Calls of [`ProcessGroup::agree`] so far: keeps its store keys apart.
    agreements: std::cell::Cell<u64>,
    /// How long a collective waits for the others.
    timeout: Duration,
}

// SAFETY: the group is a heap object of the shim, used by one thread at a
// time (`&mut self` is not needed because c10d serialises the collectives
// of a backend itself); moving it to another thread is fine.
unsafe impl Send for ProcessGroup {}

fn c_string(what: &str, value: &str) -> Result<CString> {
    CString::new(value).map_err(|_| Error::Distributed(format!("{what} '{value}' holds a NUL byte")))
}

fn check(code: c_int, what: &str) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: the shim returns a NUL-terminated string owned by this thread.
    let message = unsafe { CStr::from_ptr(simclr_dist_last_error()) }.to_string_lossy().into_owned();
    Err(Error::Distributed(format!("{what}: {message}")))
}

/// The `length` bytes of a buffer the shim malloc'ed and handed over, which
/// this frees.
///
/// # Safety
/// `bytes` holds `length` initialised bytes and is not used after the call.
unsafe fn handed_over(bytes: *mut u8, length: usize) -> Vec<u8> {
    // SAFETY: as the caller promises.
    let value = unsafe { std::slice::from_raw_parts(bytes, length) }.to_vec();
    unsafe { simclr_dist_free_bytes(bytes) };
    value
}

/// `key`'s value, if set, from `look_up` (the shim's store_lookup or
/// served_lookup: no wait); an error where the store cannot be asked.
fn looked_up(
    key: &str,
    look_up: impl FnOnce(*const c_char, *mut *mut u8, *mut usize, *mut c_int) -> c_int,
) -> Result<Option<Vec<u8>>> {
    let c_key = c_string("store key", key)?;
    let (mut bytes, mut length, mut found) = (std::ptr::null_mut(), 0usize, 0);
    check(look_up(c_key.as_ptr(), &mut bytes, &mut length, &mut found), &format!("store lookup {key}"))?;
    // SAFETY: where found, the shim handed a buffer of `length` bytes over.
    Ok((found != 0).then(|| unsafe { handed_over(bytes, length) }))
}

/// A tensor's `at::Tensor*`, as the shim takes it.
fn raw(tensor: &Tensor) -> *mut c_void {
    tensor.as_ptr() as *mut c_void
}

impl ProcessGroup {
    /// Joins the group: returns once all `size` ranks have met at the
    /// rendezvous (or fails after the timeout, naming what it waited for).
    pub fn new(options: &GroupOptions) -> Result<Self> {
        let GroupOptions { rendezvous, rank, size, timeout, device_host, interface, nccl, attempt } = options;
        if *size == 0 || rank >= size {
            return Err(Error::Distributed(format!("rank {rank} of a group of {size}: expected 0 <= rank < size")));
        }
        let (kind, address, port, server) = match rendezvous {
            Rendezvous::File(path) => ("file", path.to_string_lossy().into_owned(), 0, false),
            Rendezvous::Tcp { host, port, server } => ("tcp", host.clone(), *port, *server),
        };
        let kind = c_string("store kind", kind)?;
        let address = c_string("rendezvous address", &address)?;
        let prefix = c_string("store prefix", &namespace(*attempt))?;
        let device_host = c_string("device host", device_host.as_deref().unwrap_or(""))?;
        let interface = c_string("network interface", interface.as_deref().unwrap_or(""))?;
        let mut out = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; `out` is written on success.
        let code = unsafe {
            simclr_dist_new_group(
                kind.as_ptr(),
                address.as_ptr(),
                c_int::from(port),
                c_int::from(server),
                prefix.as_ptr(),
                *rank as c_int,
                *size as c_int,
                timeout.as_millis() as i64,
                device_host.as_ptr(),
                interface.as_ptr(),
                c_int::from(*nccl),
                &mut out,
            )
        };
        let place = match rendezvous {
            Rendezvous::File(path) => format!("file store {}", path.display()),
            Rendezvous::Tcp { host, port, .. } => format!("TCP store {host}:{port}"),
        };
        check(code, &format!("rank {rank} of {size} joining at the {place}")).map_err(|error| {
            let hint = "every process must reach it, with the same address and port, within the timeout";
            Error::Distributed(format!("{} ({hint})", error.to_string().trim_start_matches("distributed: ")))
        })?;
        let raw = NonNull::new(out).ok_or_else(|| Error::Distributed("the shim returned no group".to_owned()))?;
        let group = Self { raw, rank: *rank, size: *size, agreements: std::cell::Cell::new(0), timeout: *timeout };
        if *size > 1 {
            if let Err(unset) = group.store_set(&host_key(*rank), host_name().as_bytes()) {
                tracing::debug!("recording this rank's machine: {unset}");
            }
        }
        Ok(group)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Reduces `tensor` (contiguous) over the ranks, in place.
    pub fn all_reduce(&self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        // SAFETY: the group and tensor are live; the shim catches every exception.
        check(unsafe { simclr_dist_all_reduce(self.raw.as_ptr(), raw(tensor), op as c_int) }, "all-reduce")
    }

    /// Copies rank `root`'s `tensor` into every rank's, in place.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        // SAFETY: as in all_reduce.
        check(unsafe { simclr_dist_broadcast(self.raw.as_ptr(), raw(tensor), root as c_int) }, "broadcast")
    }

    /// Every rank's `input`, one after another along dim 0 (no gradient).
    pub fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        let input = input.contiguous();
        let mut shape = input.size();
        shape[0] *= self.size as i64;
        let output = Tensor::empty(shape, (input.kind(), input.device()));
        // SAFETY: as in all_reduce; `output` has room for every rank's input.
        check(unsafe { simclr_dist_all_gather(self.raw.as_ptr(), raw(&output), raw(&input)) }, "all-gather")?;
        Ok(output)
    }

    /// Every rank's `rows` (`[n, ...]`; the rest of the shape, the kind and
    /// the device the same on every rank, `n` not: a rank may have none),
    /// one after another in rank order. The rows are padded to the longest
    /// rank's for one all-gather, and cut back.
    pub fn all_gather_rows(&self, rows: &Tensor) -> Result<Tensor> {
        let counts = self.all_gather(&Tensor::from_slice(&[rows.size()[0]]))?;
        let counts = Vec::<i64>::try_from(&counts).map_err(|e: tch::TchError| Error::Distributed(e.to_string()))?;
        let longest = counts.iter().copied().max().unwrap_or(0);
        if longest == 0 {
            return Ok(rows.shallow_clone());
        }
        // constant_pad_nd's padding runs from the last dimension back.
        let mut padding = vec![0; 2 * rows.dim()];
        padding[2 * rows.dim() - 1] = longest - rows.size()[0];
        let all = self.all_gather(&rows.constant_pad_nd(padding))?;
        let parts: Vec<Tensor> =
            counts.iter().enumerate().map(|(rank, &count)| all.narrow(0, rank as i64 * longest, count)).collect();
        Ok(Tensor::cat(&parts, 0))
    }

    /// Every rank's `lines` (names of files, messages), one rank's after
    /// another; a line holds no NUL (each travels NUL-terminated), and an
    /// empty line is dropped.
    pub fn all_gather_lines(&self, lines: &[String]) -> Result<Vec<String>> {
        let mine: Vec<u8> = lines.iter().flat_map(|line| line.bytes().chain([0])).collect();
        let all = Vec::<u8>::try_from(&self.all_gather_rows(&Tensor::from_slice(&mine))?)?;
        let lines = all.split(|&byte| byte == 0).filter(|line| !line.is_empty());
        Ok(lines.map(|line| String::from_utf8_lossy(line).into_owned()).collect())
    }

    /// This rank's block (dim 0 split in `size`) of the sum over ranks of `input`.
    pub fn reduce_scatter(&self, input: &Tensor) -> Result<Tensor> {
        let input = input.contiguous();
        let mut shape = input.size();
        if shape.first().is_none_or(|rows| rows % self.size as i64 != 0) {
            return Err(Error::Distributed(format!("reduce-scatter of {shape:?} over {} ranks", self.size)));
        }
        shape[0] /= self.size as i64;
        let output = Tensor::empty(shape, (input.kind(), input.device()));
        // SAFETY: as in all_gather.
        check(unsafe { simclr_dist_reduce_scatter(self.raw.as_ptr(), raw(&output), raw(&input)) }, "reduce-scatter")?;
        Ok(output)
    }

    /// The sum over ranks of `input`, differentiable: its backward sums
    /// the gradients of every rank's loss (an all-reduce).
    pub fn all_reduce_sum_grad(&self, input: &Tensor) -> Result<Tensor> {
        let mut out = std::ptr::null_mut();
        // SAFETY: as in all_reduce; on success `out` is a new at::Tensor the Tensor owns.
        check(unsafe { simclr_dist_all_reduce_sum_grad(self.raw.as_ptr(), raw(input), &mut out) }, "all-reduce")?;
        Ok(unsafe { Tensor::from_ptr(out as *mut _) })
    }

    /// Every rank's `input` along dim 0, differentiable: its backward is a
    /// sum reduce-scatter, so each rank's rows get the gradient of every
    /// rank's loss, not only its own.
    pub fn all_gather_grad(&self, input: &Tensor) -> Result<Tensor> {
        let mut out = std::ptr::null_mut();
        // SAFETY: as in all_reduce_sum_grad.
        check(unsafe { simclr_dist_all_gather_grad(self.raw.as_ptr(), raw(input), &mut out) }, "all-gather")?;
        Ok(unsafe { Tensor::from_ptr(out as *mut _) })
    }

    /// `bn` (weight, bias and running statistics of a BatchNorm) applied in
    /// training to `x` (`[N, C, ...]`, this rank's slice) with the mean and
    /// variance of every rank's slice together, differentiable (SyncBN's
    /// backward); the running statistics move with the global mean and
    /// unbiased variance. See `GlobalBatchNorm` in `c10d.cpp`. `images`
    /// gives every rank's number of images where the slices differ in size
    /// (each at least one); `None`, every rank's is this one's.
    pub fn batch_norm(
        &self,
        x: &Tensor,
        bn: &tch::nn::BatchNorm,
        momentum: f64,
        eps: f64,
        images: Option<&[i64]>,
    ) -> Result<Tensor> {
        if images.is_some_and(|images| images.len() != self.size) {
            return Err(Error::Distributed(format!("BatchNorm given {images:?} images for {} ranks", self.size)));
        }
        let optional = |tensor: Option<&Tensor>| tensor.map_or(std::ptr::null_mut(), raw);
        let mut out = std::ptr::null_mut();
        // SAFETY: as in all_reduce_sum_grad; null weight or bias means none.
        check(
            unsafe {
                simclr_dist_batch_norm(
                    self.raw.as_ptr(),
                    raw(x),
                    optional(bn.ws.as_ref()),
                    optional(bn.bs.as_ref()),
                    raw(&bn.running_mean),
                    raw(&bn.running_var),
                    momentum,
                    eps,
                    images.map_or(std::ptr::null(), <[i64]>::as_ptr),
                    &mut out,
                )
            },
            "BatchNorm's statistics",
        )?;
        Ok(unsafe { Tensor::from_ptr(out as *mut _) })
    }

    /// Every rank calls it at the same point with its own outcome: all go
    /// on, or all stop, each with an error naming the first rank that failed
    /// and its message (so no rank waits for a peer that has given up); a
    /// rank's own failure is left as its cause for the launcher to name.
    pub fn agree<T>(&self, outcome: Result<T>) -> Result<T> {
        let round = self.agreements.get();
        self.agreements.set(round + 1);
        if let Err(error) = &outcome {
            self.store_set(&format!("error/{round}/{}", self.rank), error.to_string().as_bytes())?;
            self.leave_cause(error);
        }
        let mut failed = Tensor::zeros([self.size as i64], (tch::Kind::Int64, tch::Device::Cpu));
        let _ = failed.get(self.rank as i64).fill_(i64::from(outcome.is_err()));
        self.all_reduce(&mut failed, ReduceOp::Sum)?;
        let first = (0..self.size).find(|&rank| failed.int64_value(&[rank as i64]) != 0);
        match (first, outcome) {
            (None, outcome) | (Some(_), outcome @ Err(_)) => outcome,
            (Some(rank), Ok(_)) => {
                let message = String::from_utf8_lossy(&self.store_get(&format!("error/{round}/{rank}"))?).into_owned();
                Err(Error::Distributed(format!("rank {rank} failed: {message}")))
            }
        }
    }

    /// Whether `flag` is true on any rank.
    pub fn any(&self, flag: bool) -> Result<bool> {
        self.any_of([flag]).map(|[any]| any)
    }

    /// Whether each of `flags` is true on any rank, in one collective.
    pub fn any_of<const N: usize>(&self, flags: [bool; N]) -> Result<[bool; N]> {
        let mut values = Tensor::from_slice(&flags.map(i64::from));
        self.all_reduce(&mut values, ReduceOp::Max)?;
        Ok(std::array::from_fn(|i| values.int64_value(&[i as i64]) != 0))
    }

    /// Checks that every rank holds the same `value` (a resolved config, say);
    /// the error names the ranks that differ from rank 0 and what differs.
    pub fn check_same(&self, what: &str, value: &str) -> Result<()> {
        let hash = i64::from(crc32fast::hash(value.as_bytes()));
        let hashes = self.all_gather(&Tensor::from_slice(&[hash]))?;
        let hashes = Vec::<i64>::try_from(&hashes).map_err(|e: tch::TchError| Error::Distributed(e.to_string()))?;
        let differ: Vec<String> = (1..self.size)
            .filter(|&rank| hashes[rank] != hashes[0])
            .map(|rank| format!("rank {rank} ({:08x})", hashes[rank]))
            .collect();
        if differ.is_empty() {
            return Ok(());
        }
        let verb = if differ.len() == 1 { "differs" } else { "differ" };
        Err(Error::Distributed(format!(
            "the processes were started with different {what}: {} {verb} from rank 0 ({:08x}); \
             start every process with the same command and files",
            differ.join(", "),
            hashes[0]
        )))
    }

    /// Checks that every rank holds the same `tensor`, bit for bit as far as
    /// two fp64 sums (of the values and their squares) can tell; the error
    /// names `what` and the ranks that differ from rank 0.
    pub fn check_identical(&self, what: &str, tensor: &Tensor) -> Result<()> {
        let sums =
            tch::no_grad(|| Tensor::stack(&[tensor.sum(tch::Kind::Double), tensor.square().sum(tch::Kind::Double)], 0));
        let gathered = self.all_gather(&sums.to_device(tch::Device::Cpu))?;
        let values = Vec::<f64>::try_from(&gathered).map_err(|e: tch::TchError| Error::Distributed(e.to_string()))?;
        let differ: Vec<String> = (1..self.size)
            .filter(|&rank| values[2 * rank..2 * rank + 2] != values[..2])
            .map(|rank| format!("rank {rank} (sums {:?})", &values[2 * rank..2 * rank + 2]))
            .collect();
        if differ.is_empty() {
            return Ok(());
        }
        Err(Error::Distributed(format!(
            "{what} differ between the processes: {} against rank 0 (sums {:?}); they no longer train one model",
            differ.join(", "),
            &values[..2]
        )))
    }

    /// Sets `key` in the group's store.
    pub fn store_set(&self, key: &str, value: &[u8]) -> Result<()> {
        let c_key = c_string("store key", key)?;
        // SAFETY: key and value are valid for the call.
        let code = unsafe { simclr_dist_store_set(self.raw.as_ptr(), c_key.as_ptr(), value.as_ptr(), value.len()) };
        check(code, &format!("store set {key}"))
    }

    /// `key`'s value in the group's store, if it is set now (no wait); an
    /// error where the store cannot be asked (its server gone).
    fn store_lookup(&self, key: &str) -> Result<Option<Vec<u8>>> {
        // SAFETY: the group is live, the key valid for the call, and the
        // out-pointers written only on success.
        looked_up(key, |key, out, length, found| unsafe {
            simclr_dist_store_lookup(self.raw.as_ptr(), key, out, length, found)
        })
    }

    /// `error`, which ends this rank's part in the run, as the run should
    /// report it. A rank that fails alone (its data, its disk, its memory)
    /// reports its own error, whatever the others did, and leaves it as its
    /// cause in the store before it leaves the group, so the others, whose
    /// collectives then break off (`Connection closed by peer`, a timeout),
    /// name that rank and its cause instead, as [`ProcessGroup::agree`]
    /// does; so does the local launcher. Where no rank left one and the
    /// connection broke off, a process was killed (or its machine lost): the
    /// error says so, and whether the store's server went too. A failure of
    /// the group itself ([`Error::Distributed`], or a collective of
    /// autograd's) is no rank's cause and is not left. A collective that
    /// timed out, with no cause left, waited for a process that is stuck (or
    /// far slower): the error names the ranks that did not time out too
    /// (`stuck_ranks`) with their machines, and the store tells the
    /// launcher, which names the processes still running.
    pub fn explain(&self, error: Error) -> Error {
        // A rank's own error is its own to report, whatever the others did.
        if !from_the_group(&error) {
            self.leave_cause(&error);
            return error;
        }
        let store_gone = match self.others_cause() {
            Ok(Some(cause)) => return cause,
            Ok(None) => false,
            // A store that cannot be asked has lost its server: the process
            // that served it is gone.
            Err(_) => true,
        };
        if timed_out(&error) {
            if let Err(unset) = self.store_set(&waited_key(self.rank), b"") {
                tracing::debug!("saying that this rank timed out: {unset}");
            }
            let stuck = self.stuck_ranks();
            // One failed meanwhile, its cause left late.
            if let Ok(Some(cause)) = self.others_cause() {
                return cause;
            }
            let (line, timeout) = (first_line(&error), self.timeout.as_secs_f64());
            let slower = "stuck, or far slower (if so, raise the timeout: train.dist_timeout_seconds, or \
                          --dist-timeout-seconds outside training)";
            return Error::Distributed(match stuck {
                Some(stuck) if stuck.is_empty() => format!(
                    "{line}; every process timed out waiting, and none failed: they waited in collectives that \
                     others did not come to, or could not reach each other"
                ),
                Some(stuck) => format!(
                    "{line}; {} within the timeout ({timeout} s), and no process failed: {} {slower}",
                    self.named(&stuck),
                    if stuck.len() == 1 { "it is" } else { "they are" }
                ),
                None => format!(
                    "{line}; no other process came to it within the timeout ({timeout} s) and none failed: \
                     one is {slower}"
                ),
            });
        }
        if broke_off(&error) && !matches!(self.store_lookup(&cause_key(self.rank)), Ok(Some(_))) {
            // A peer went without a word: killed (by a signal, the kernel's
            // out-of-memory killer) or its machine lost.
            let store =
                if store_gone { ", and the store cannot be reached: the process serving it is gone too" } else { "" };
            return Error::Distributed(format!(
                "{}: a process ended without leaving a cause (killed by a signal, as the kernel's out-of-memory \
                 killer kills, or its machine lost){store}; the launcher names it",
                first_line(&error)
            ));
        }
        error
    }

    /// The failure of the lowest other rank that left its cause, named so;
    /// an error where the store cannot be asked.
    fn others_cause(&self) -> Result<Option<Error>> {
        for rank in (0..self.size).filter(|&rank| rank != self.rank) {
            if let Some(cause) = self.store_lookup(&cause_key(rank))? {
                let cause = String::from_utf8_lossy(&cause);
                return Ok(Some(Error::Distributed(format!("rank {rank} failed: {cause}"))));
            }
        }
        Ok(None)
    }

    /// The ranks that a collective of this rank's, timed out, waited for:
    /// those that neither timed out too nor failed within a grace. The
    /// first rank to time out looks and leaves the list for the others (so
    /// the store is asked 2 N times, however many timed out), who wait for
    /// it; `None` where the store cannot say.
    fn stuck_ranks(&self) -> Option<Vec<usize>> {
        let grace = (self.timeout / 4).min(STUCK_GRACE);
        let (deadline, poll) = (Instant::now() + grace, grace / 50);
        if self.store_add(WAITING_KEY, 1).ok()? == 1 {
            // All but one timing out is what a stuck one looks like; all,
            // that none is.
            while Instant::now() < deadline && self.store_add(WAITING_KEY, 0).ok()? < self.size as i64 {
                std::thread::sleep(poll);
            }
            let mut stuck = Vec::new();
            for rank in (0..self.size).filter(|&rank| rank != self.rank) {
                let said = |key: String| self.store_lookup(&key).map(|value| value.is_some());
                if !said(waited_key(rank)).ok()? && !said(cause_key(rank)).ok()? {
                    stuck.push(rank);
                }
            }
            let list = stuck.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
            self.store_set(STUCK_KEY, list.as_bytes()).ok()?;
            return Some(stuck);
        }
        // The first began its grace before this rank timed out.
        while Instant::now() < deadline + grace {
            if let Some(list) = self.store_lookup(STUCK_KEY).ok()? {
                let list = String::from_utf8_lossy(&list);
                return list.split(',').filter(|rank| !rank.is_empty()).map(|rank| rank.parse().ok()).collect();
            }
            std::thread::sleep(poll);
        }
        None
    }

    /// `ranks` (not empty) as a message names them, each with its machine
    /// where it said: "rank 1 (on node-b) did not come to it", "ranks 1 (on
    /// node-b) and 3 (...) did not ...".
    fn named(&self, ranks: &[usize]) -> String {
        let each = |rank: usize| match self.store_lookup(&host_key(rank)) {
            Ok(Some(host)) if !host.is_empty() => format!("{rank} (on {})", String::from_utf8_lossy(&host)),
            _ => rank.to_string(),
        };
        format!("{} did not come to it", super::ranks_said(ranks, each))
    }

    /// Adds `amount` to the counter at `key` in the group's store (0 reads
    /// it, no wait); returns its sum.
    fn store_add(&self, key: &str, amount: i64) -> Result<i64> {
        let c_key = c_string("store key", key)?;
        let mut value = 0;
        // SAFETY: the group is live, the key valid for the call, `value` a live i64.
        let code = unsafe { simclr_dist_store_add(self.raw.as_ptr(), c_key.as_ptr(), amount, &mut value) };
        check(code, &format!("store add {key}"))?;
        Ok(value)
    }

    /// Leaves `error` in the store as this rank's cause of failure, for the
    /// others and the launcher to name, unless it is the group's own.
    fn leave_cause(&self, error: &Error) {
        if !from_the_group(error) {
            if let Err(unset) = self.store_set(&cause_key(self.rank), error.to_string().as_bytes()) {
                tracing::debug!("leaving this rank's cause for the others: {unset}");
            }
        }
    }

    /// Waits (up to the timeout) for `key` in the group's store.
    pub fn store_get(&self, key: &str) -> Result<Vec<u8>> {
        let c_key = c_string("store key", key)?;
        let (mut bytes, mut length) = (std::ptr::null_mut(), 0usize);
        // SAFETY: on success the shim hands over a malloc'ed buffer of `length` bytes.
        let code = unsafe { simclr_dist_store_get(self.raw.as_ptr(), c_key.as_ptr(), &mut bytes, &mut length) };
        check(code, &format!("store get {key}"))?;
        // SAFETY: the shim handed the buffer over.
        Ok(unsafe { handed_over(bytes, length) })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from simclr_dist_new_group and is freed once.
        unsafe { simclr_dist_free(self.raw.as_ptr()) }
    }
}

/// The gradient all-reduce in buckets, each sent while the backward pass
/// goes on (as DDP's reducer does; `Buckets` in `c10d.cpp`): hooks on the
/// parameters copy each gradient into its place in a flat buffer as autograd
/// computes it, and a bucket of about `cap_bytes` is all-reduced as soon as
/// its gradients are all in. Every rank sends the buckets in the same fixed
/// order. Dropping it removes the hooks.
#[derive(Debug)]
pub struct GradientBuckets {
    raw: NonNull<c_void>,
    /// The buffer the gradients land in, averaged by [`GradientBuckets::finish`].
    flat: Tensor,
}

// SAFETY: as for ProcessGroup: used by one thread at a time (the hooks run
// inside that thread's backward pass, or on autograd's device thread while
// it waits), moved between threads whole.
unsafe impl Send for GradientBuckets {}

impl GradientBuckets {
    /// Buckets for `params`, whose gradients fill `flat` one after another,
    /// each permuted by its `orders` entry (its dims in memory order, as the
    /// optimiser lays its flat buffers out). Every rank makes them at the same
    /// point: they connect a backend of their own (see `Buckets` in the shim).
    /// With `bf16` each bucket travels rounded to bf16 (and is summed so).
    pub fn new(
        group: &ProcessGroup,
        params: &[Tensor],
        orders: &[Vec<i64>],
        flat: &Tensor,
        cap_bytes: usize,
        bf16: bool,
    ) -> Result<Self> {
        let pointers: Vec<*mut c_void> = params.iter().map(raw).collect();
        let dims: Vec<i64> = orders.iter().flatten().copied().collect();
        let ranks: Vec<i64> = orders.iter().map(|order| order.len() as i64).collect();
        let mut out = std::ptr::null_mut();
        // SAFETY: the group and tensors are live; the arrays hold `params.len()` entries
        // (and the dims the ranks add up to); `out` is written on success.
        let code = unsafe {
            simclr_dist_buckets_new(
                group.raw.as_ptr(),
                pointers.as_ptr(),
                dims.as_ptr(),
                ranks.as_ptr(),
                params.len(),
                raw(flat),
                i64::try_from(cap_bytes).unwrap_or(i64::MAX),
                c_int::from(bf16),
                &mut out,
            )
        };
        check(code, "gradient buckets")?;
        let raw = NonNull::new(out).ok_or_else(|| Error::Distributed("the shim returned no buckets".to_owned()))?;
        Ok(Self { raw, flat: flat.shallow_clone() })
    }

    /// Runs `backward` (a pass of autograd over the parameters) with the
    /// hooks armed: the step's `last` pass sends the buckets as they fill;
    /// an earlier one (gradient caching's chunks) only adds its gradients.
    /// On an error the step is dropped, ready for the next.
    pub fn pass<T>(&mut self, last: bool, backward: impl FnOnce() -> Result<T>) -> Result<T> {
        // SAFETY: `raw` is live; the shim catches every exception.
        check(unsafe { simclr_dist_buckets_arm(self.raw.as_ptr(), c_int::from(last)) }, "gradient buckets")?;
        backward().inspect_err(|_| self.clear())
    }

    /// The step's gradient, averaged over the ranks: sends the buckets no
    /// pass has sent (zeros for parameters no pass reached) and waits for all.
    pub fn finish(&mut self) -> Result<&Tensor> {
        // SAFETY: as in pass.
        check(unsafe { simclr_dist_buckets_finish(self.raw.as_ptr()) }, "gradient all-reduce")?;
        Ok(&self.flat)
    }

    /// The buffer the gradients land in.
    pub fn flat(&self) -> &Tensor {
        &self.flat
    }

    /// How many buckets this step has sent so far, and how many there are.
    pub fn sent(&self) -> (usize, usize) {
        let (mut sent, mut count) = (0, 0);
        // SAFETY: `raw` is live; the shim writes both counts.
        unsafe { simclr_dist_buckets_sent(self.raw.as_ptr(), &mut sent, &mut count) };
        (sent, count)
    }

    fn clear(&mut self) {
        // SAFETY: as in pass.
        unsafe { simclr_dist_buckets_clear(self.raw.as_ptr()) }
    }
}

impl Drop for GradientBuckets {
    fn drop(&mut self) {
        // SAFETY: `raw` came from simclr_dist_buckets_new and is freed once.
        unsafe { simclr_dist_buckets_free(self.raw.as_ptr()) }
    }
}

/// A TCP store this process serves for others, on a port the OS picked
/// and this process holds from the start (a port found free and released
/// for another process to bind can be taken in between: by another run's
/// store, or as the source port of any connection). The local launcher
/// serves its workers' store so, as torchrun's agent does.
#[derive(Debug)]
pub struct StoreServer {
    raw: NonNull<c_void>,
    port: u16,
}

// SAFETY: the store's server runs on threads of its own; the handle is only
// dropped, from whichever thread holds it.
unsafe impl Send for StoreServer {}

impl StoreServer {
    /// Serves a store on `host` at a free port; its waits end after `timeout`.
    pub fn serve(host: &str, timeout: Duration) -> Result<Self> {
        let address = c_string("store address", host)?;
        let (mut out, mut port) = (std::ptr::null_mut(), 0);
        // SAFETY: `address` is valid for the call; `out` and `port` are written on success.
        let code =
            unsafe { simclr_dist_serve_store(address.as_ptr(), timeout.as_millis() as i64, &mut out, &mut port) };
        check(code, &format!("serving a TCP store on {host}"))?;
        let raw = NonNull::new(out).ok_or_else(|| Error::Distributed("the shim returned no store".to_owned()))?;
        let port = u16::try_from(port).map_err(|_| Error::Distributed(format!("the store reports port {port}")))?;
        Ok(Self { raw, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cause a rank of a group of `size` (its first start) left of its
    /// failure ([`ProcessGroup::explain`]), the lowest such rank's, if any.
    pub fn cause(&self, size: usize) -> Option<(usize, String)> {
        (0..size).find_map(|rank| Some((rank, String::from_utf8_lossy(&self.lookup(&cause_key(rank))?).into_owned())))
    }

    /// Whether `rank` of a group (its first start) failed as a collective
    /// of its timed out ([`ProcessGroup::explain`]).
    pub fn timed_out(&self, rank: usize) -> bool {
        self.lookup(&waited_key(rank)).is_some()
    }

    /// `key`'s value in a group's namespace (its first start), if set.
    fn lookup(&self, key: &str) -> Option<Vec<u8>> {
        // SAFETY: the store is live, the key valid for the call, and the
        // out-pointers written only on success.
        looked_up(&format!("{}/{key}", namespace(0)), |key, out, length, found| unsafe {
            simclr_dist_served_lookup(self.raw.as_ptr(), key, out, length, found)
        })
        .ok()
        .flatten()
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        // SAFETY: `raw` came from simclr_dist_serve_store and is freed once.
        unsafe { simclr_dist_free_store(self.raw.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_connection_is_told_from_other_failures_and_said_in_a_line() {
        let group = |message: &str| Error::Distributed(message.to_owned());
        let gloo = "all-reduce: [/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:547] Connection closed by peer [127.0.0.1]:5278";
        // libtorch_cuda's words (its strings), the first line's end made up.
        let nccl = "all-reduce: NCCL error in: ProcessGroupNCCL.cpp:3381, remote error\nncclRemoteError: A call \
                    failed possibly due to a network error or a remote process exiting prematurely.";
        for broken in [gloo, nccl, "gradient all-reduce: Read error [127.0.0.1]:56023: Connection reset by peer"] {
            assert!(broke_off(&group(broken)), "{broken}");
        }
        // A rank's own error, a timeout and the group's other failures are not.
        let image = Error::Image { path: "x.jpg".into(), message: "Connection closed by peer".to_owned() };
        for other in
            [image, group("all-reduce: Operation timed out!"), group("model parameters differ between the processes")]
        {
            assert!(!broke_off(&other), "{other}");
        }
        assert_eq!(first_line(&group(gloo)), "all-reduce: Connection closed by peer [127.0.0.1]:5278");
        assert_eq!(first_line(&group(nccl)), "all-reduce: NCCL error in: ProcessGroupNCCL.cpp:3381, remote error");
        // Brackets that are no source location stay.
        assert_eq!(first_line(&group("gather [rank 1] of 2")), "gather [rank 1] of 2");
    }
}
