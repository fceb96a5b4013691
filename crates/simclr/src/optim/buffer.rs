//! The flat-buffer engine every optimiser updates through.
use tch::Tensor;

/// Every trainable tensor laid end to end, in name order, as one flat
/// buffer: values, gradients and each state slot alike.
///
/// An update is then a fixed handful of whole-buffer operations, about 20
/// kernels whatever the model, instead of a dozen per tensor (over 700 for a
/// ResNet-18 and its head). That is what `torch._foreach_*` and fused
/// optimisers buy PyTorch, which tch does not expose: on a GPU an eager step
/// is largely bound by the time spent launching kernels.
///
/// A `Layout` describes one `Chunk` of the buffers: all of them on a GPU,
/// a cache-sized run of tensors on the CPU.
#[derive(Debug)]
pub struct Layout {
    /// Elements of each tensor, `[P]` int64 on the device.
    pub(super) lengths: Tensor,
    /// Elements in all, N.
    pub(super) total: i64,
    /// Per element: 1 where weight decay and LARS adaptation apply (tensors
    /// of two or more dimensions), 0 for BatchNorm and biases. `[N]`, or
    /// `[1]` for a single tensor (see [`Layout::spread`]).
    pub(super) decayed: Tensor,
    /// Per tensor: whether LARS adapts its rate. `[P]` bool.
    pub(super) adapted: Tensor,
}

impl Layout {
    pub(super) fn new(tensors: &[Tensor]) -> Self {
        let numels: Vec<i64> = tensors.iter().map(|t| t.numel() as i64).collect();
        let device = tensors.first().map_or(tch::Device::Cpu, |t| t.device());
        let adapt: Vec<bool> = tensors.iter().map(|t| t.dim() > 1).collect();
        let lengths = Tensor::from_slice(&numels).to_device(device);
        let adapted = Tensor::from_slice(&adapt).to_device(device);
        let total = numels.iter().sum::<i64>();
        let decayed = Tensor::zeros([0], (tch::Kind::Float, device));
        let mut layout = Self { lengths, total, decayed, adapted };
        layout.decayed = layout.spread(&layout.adapted.to_kind(tch::Kind::Float));
        layout
    }

    /// Whether the layout holds one tensor (P = 1).
    pub(super) fn is_single(&self) -> bool {
        self.lengths.numel() == 1
    }

    /// The Euclidean norm of each tensor's part of `flat`, `[P]`.
    pub(super) fn norms(&self, flat: &Tensor) -> Tensor {
        if self.is_single() {
            // On the CPU, 8x faster than the segmented sum (0.5 vs 4 ms on
            // 2.4M floats).
            return flat.norm().reshape([1]);
        }
        let squares = flat * flat;
        // `unsafe = true` skips libtorch's check of the lengths, which reads
        // their minimum and sum back to the host (two `.item()` calls, each
        // waiting for the GPU to finish everything queued, twice per LARS
        // step). The lengths are the tensors' element counts, made in
        // `Layout::new`: none negative, and they sum to the buffer's length.
        Tensor::segment_reduce(&squares, "sum", Some(&self.lengths), None, None, 0, true, 0.0).sqrt()
    }

    /// A per-tensor value `[P]` spread over that tensor's elements, `[N]`;
    /// for a single tensor, the value as it is, `[1]`, which broadcasts
    /// (`repeat_interleave` took 8 ms to write 2.4M floats on the CPU, where
    /// a multiplication takes 0.9 ms).
    pub(super) fn spread(&self, per_tensor: &Tensor) -> Tensor {
        if self.is_single() {
            return per_tensor.shallow_clone();
        }
        per_tensor.repeat_interleave_self_tensor(&self.lengths, 0, self.total)
    }
}

/// A run of consecutive tensors that one call of an update function covers:
/// where it starts in the flat buffers, and its [`Layout`].
#[derive(Debug)]
pub(super) struct Chunk {
    pub(super) offset: i64,
    pub(super) layout: Layout,
}

impl Chunk {
    /// This chunk's part of a flat buffer (a view: updates write through).
    pub(super) fn of(&self, flat: &Tensor) -> Tensor {
        flat.narrow(0, self.offset, self.layout.total)
    }
}

/// How an update is carried out on a device; the same arithmetic either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Execution {
    /// Elements per chunk the update aims at; `None`: the whole buffers at once.
    pub(super) chunk_elements: Option<i64>,
    /// Whether [`Optimizer::step_if_finite`](super::Optimizer::step_if_finite) reads its verdict on the host
    /// and skips a bad step, or shuts the update on the device (see [`Amounts`](super::gate::Amounts)).
    pub(super) host_verdict: bool,
}

impl Execution {
    /// On a GPU, whole buffers (few kernel launches) and no host read. On
    /// the CPU, as PyTorch's CPU default does (a per-tensor loop rather
    /// than foreach): chunks of about 256 KiB per buffer, so that one
    /// chunk's dozen passes find weights, gradient and state in the
    /// 1.25 MiB per-core L2 cache of this project's machines; tensors larger
    /// than that form a chunk of their own, small ones (BatchNorm, biases)
    /// share. Measured on ResNet-18 with 2 threads, each phase of a step
    /// timed in a scratch program beside the same loop in PyTorch (whose
    /// LARS step took 40 ms): a whole-buffer LARS step took 190-210 ms, the
    /// chunked one 28-50 ms. And CPU kernels run synchronously, so a host
    /// read of the verdict waits for nothing.
    pub(super) fn for_device(device: tch::Device) -> Self {
        match device {
            tch::Device::Cpu => Self { chunk_elements: Some(1 << 16), host_verdict: true },
            _ => Self { chunk_elements: None, host_verdict: false },
        }
    }
}

/// Groups `tensors` (in buffer order) into chunks of at most `target`
/// elements, but never splits a tensor; `None` is one chunk for all.
pub(super) fn chunks(tensors: &[Tensor], target: Option<i64>) -> Vec<Chunk> {
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
    let mut elements = 0;
    for (index, tensor) in tensors.iter().enumerate() {
        let numel = tensor.numel() as i64;
        match groups.last_mut() {
            Some(group) if target.is_none_or(|target| elements + numel <= target) => {
                group.end = index + 1;
                elements += numel;
            }
            _ => {
                groups.push(index..index + 1);
                elements = numel;
            }
        }
    }
    let mut offset = 0;
    groups
        .into_iter()
        .map(|group| {
            let layout = Layout::new(&tensors[group]);
            let chunk = Chunk { offset, layout };
            offset += chunk.layout.total;
            chunk
        })
        .collect()
}

/// The dimensions of a dense tensor from its outermost to its innermost in
/// memory: `[0, 1, 2, 3]` for NCHW, `[0, 2, 3, 1]` for channels-last. A
/// parameter's part of a flat buffer follows this order, so it keeps its
/// memory layout (see `device::use_channels_last`).
pub(super) fn memory_order(tensor: &Tensor) -> Vec<i64> {
    let (size, stride) = (tensor.size(), tensor.stride());
    let mut order: Vec<i64> = (0..size.len() as i64).collect();
    // Dimensions of size 1 can carry any stride: they keep their place.
    order.sort_by_key(|&d| std::cmp::Reverse(if size[d as usize] == 1 { i64::MAX } else { stride[d as usize] }));
    order
}

/// `tensor`'s elements in `order`, flat (a view when that is its layout).
pub(super) fn flatten_in(tensor: &Tensor, order: &[i64]) -> Tensor {
    tensor.permute(order).reshape([-1])
}

/// ∇w + λw on decayed elements, ∇w elsewhere, for flat buffers.
pub(super) fn decayed_gradient(weights: &Tensor, grad: &Tensor, layout: &Layout, weight_decay: f64) -> Tensor {
    if weight_decay != 0.0 {
        grad.addcmul(weights, &(&layout.decayed * weight_decay))
    } else {
        grad.shallow_clone()
    }
}
