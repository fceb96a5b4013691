//! One training step's forward and backward pass: the contrastive loss of a
//! batch of 2N views and its gradient, in one pass or in chunks with the
//! gradient cached at z.
//!
//! Gradient caching (Gao, Zhang, Han and Callan, "Scaling Deep Contrastive
//! Learning Batch Size under Memory Limited Setup", arXiv 2101.06983) gives
//! the whole batch's gradient at a chunk's activation memory. The loss
//! L(z_1..z_2N) couples every view with every other, so gradient
//! accumulation over parts of the batch would drop the negatives between
//! parts; but the parameters θ reach L only through z, so
//!
//! ```text
//! ∂L/∂θ = Σ_c (∂z_c/∂θ)ᵀ · ∂L/∂z_c        (c: chunks of the batch)
//! ```
//!
//! 1. forward every chunk without an autograd graph: z = [z_1; ...; z_C];
//! 2. L and g = ∂L/∂z for the whole batch, the graph cut at z, the loss
//!    taken over one chunk's 2m anchors at a time (against all 2N keys), so
//!    that its [2N, 2N] matrices are never held whole;
//! 3. per chunk, forward again with a graph and back-propagate g_c (as the
//!    scalar Σ z_c ⊙ g_c, whose gradient in z_c is g_c exactly), summing the
//!    parameter gradients.
//!
//! Step 3 is one forward pass more than a plain step, about a third of it.
//! Both passes see the same views and parameters, so z is the same; the
//! chunk is the unit of BatchNorm in training mode (each chunk normalised
//! by its own statistics, as per-device BatchNorm does with devices), so
//! the result equals a plain step's only where BatchNorm is frozen. Step 1
//! must not move BatchNorm's running statistics: they are put back after
//! it, so each chunk moves them once, in step 3. A chunk holds both views
//! of its images, as one device does in a multi-process run; there every
//! rank computes its slice in chunks and z is still gathered from all ranks.
use tch::{nn, Device, Kind, Tensor};

use crate::device::Precision;
use crate::dist::Parallel;
use crate::loss::{Layout, LossConfig};
use crate::model::SimClr;
use crate::optim::Optimizer;
use crate::{Error, Result};

/// What a step minimises, and how its forward pass runs.
#[derive(Debug, Clone, Copy)]
pub struct Objective<'a> {
    pub loss: &'a LossConfig,
    pub precision: Precision,
    /// This rank's part in a multi-process run (`None`: one process).
    pub parallel: Option<Parallel<'a>>,
    /// BatchNorm in training mode (batch statistics); the equivalence tests
    /// freeze it, since chunks then compute exactly what the batch does.
    batch_norm_training: bool,
    /// Supervised training (`train.supervised`): the class of each of this
    /// rank's images, `[n]` int64; z is then the classifier's logits and
    /// the loss their cross-entropy over both views.
    labels: Option<&'a Tensor>,
}

impl<'a> Objective<'a> {
    pub fn new(loss: &'a LossConfig, precision: Precision, parallel: Option<Parallel<'a>>) -> Self {
        Self { loss, precision, parallel, batch_norm_training: true, labels: None }
    }

    /// The supervised objective on images of these classes.
    pub fn with_labels(self, labels: Option<&'a Tensor>) -> Self {
        Self { labels, ..self }
    }

    /// z = g(f(x)) for a batch of views, in this step's precision.
    fn project(&self, model: &SimClr, views: &Tensor) -> Tensor {
        let forward = || model.forward_t(views, self.batch_norm_training).1;
        self.precision.run(views.device(), || match self.parallel {
            Some(parallel) if parallel.global_batch_norm => {
                crate::dist::with_global_batch_norm(parallel.group, forward)
            }
            _ => forward(),
        })
    }

    /// The loss of this rank's projections `z` ([2n, d], [first views;
    /// second views]): against the projections of every rank, gathered
    /// with a gradient, in a multi-process run.
    ///
    /// Taken outside autocast, so in fp32: under autocast the similarity
    /// matrix z zᵀ would be a bf16 product, whose 8-bit mantissa blurs
    /// cosine similarities by about 0.004, 0.02 in the logits at τ = 0.2;
    /// the PyTorch references likewise take the loss of `z.float()` outside
    /// autocast.
    fn loss_of(&self, z: &Tensor) -> Result<Tensor> {
        if let Some(labels) = self.labels {
            // Each rank's mean over its views; the ranks' equal slices make
            // the mean of those means the global batch's.
            let targets = Tensor::cat(&[labels, labels], 0);
            return Ok(z.to_kind(Kind::Float).cross_entropy_for_logits(&targets));
        }
        match self.parallel {
            Some(Parallel { group, .. }) if group.size() > 1 => {
                let keys = group.all_gather_grad(z)?;
                self.loss.compute_against(z, &keys, group.rank() as i64 * z.size()[0])
            }
            _ => self.loss.compute(z),
        }
    }

    /// The loss of this rank's projections `z` (without a graph) and its
    /// gradient in them, the loss taken `block` anchors at a time, so that
    /// its memory grows with the batch as a chunk's does, not with its square
    /// (see [`LossConfig::gradient_in_blocks`]). The blocks meet the keys in
    /// fp32 (fp64 stays fp64), as the whole loss does.
    fn loss_and_gradient(&self, z: &Tensor, block: i64) -> Result<(Tensor, Tensor)> {
        let anchors = z.size()[0];
        if self.labels.is_some() || block >= anchors {
            let z = z.set_requires_grad(true);
            let loss = self.loss_of(&z)?;
            let gradient = Tensor::f_run_backward(&[&loss], &[&z], false, false)?.remove(0);
            return Ok((loss.detach(), gradient));
        }
        let kind = if z.kind() == Kind::Double { Kind::Double } else { Kind::Float };
        match self.parallel {
            Some(Parallel { group, .. }) if group.size() > 1 => {
                // The blocks' gradient in the gathered keys, then sent back
                // to the ranks by the gather's own backward pass (the sum of
                // every rank's part for this rank's rows).
                let z = z.set_requires_grad(true);
                let keys = group.all_gather_grad(&z)?;
                let leaf = keys.detach().to_kind(kind).set_requires_grad(true);
                let layout = Layout::of(&z, &leaf, group.rank() as i64 * anchors)?;
                let (loss, key_gradient) = self.loss.gradient_in_blocks(&leaf, layout, block)?;
                let sent = (keys * key_gradient).sum(kind);
                Ok((loss, Tensor::f_run_backward(&[&sent], &[&z], false, false)?.remove(0)))
            }
            _ => {
                let leaf = z.to_kind(kind).set_requires_grad(true);
                self.loss.gradient_in_blocks(&leaf, Layout::of(&leaf, &leaf, 0)?, block)
            }
        }
    }

    /// The loss of a batch of 2N views (or, with `parallel`, of this rank's
    /// slice of the global batch: its anchors meet the projections of every
    /// rank, and BatchNorm normalises over the global batch where asked;
    /// see [`crate::dist`]), with its autograd graph.
    pub fn loss(&self, model: &SimClr, views: &Tensor) -> Result<Tensor> {
        self.loss_of(&self.project(model, views))
    }
}

/// Computes a step's batch in chunks of `micro_batch_size` images
/// (`train.micro_batch_size`), with the gradient of the whole batch's loss.
#[derive(Debug)]
pub struct GradientCache {
    micro_batch_size: usize,
    /// BatchNorm's running statistics (every buffer of the store), put back
    /// after the pass without a graph.
    statistics: Vec<Tensor>,
}

impl GradientCache {
    /// Chunks of `micro_batch_size` images of the model in `store`.
    pub fn new(store: &nn::VarStore, micro_batch_size: usize) -> Self {
        let mut buffers: Vec<(String, Tensor)> =
            store.variables().into_iter().filter(|(_, tensor)| !tensor.requires_grad()).collect();
        buffers.sort_by(|a, b| a.0.cmp(&b.0));
        Self { micro_batch_size: micro_batch_size.max(1), statistics: buffers.into_iter().map(|(_, t)| t).collect() }
    }

    /// Each chunk's first image and its number of images, over `images`.
    fn chunks(&self, images: i64) -> Vec<(i64, i64)> {
        let size = self.micro_batch_size as i64;
        (0..images).step_by(self.micro_batch_size).map(|start| (start, size.min(images - start))).collect()
    }

    /// The loss of `views` ([2n, ...]) with its gradient left in `optimizer`,
    /// by steps 1-3 of the module's documentation.
    fn backward(
        &self,
        model: &SimClr,
        views: &Tensor,
        objective: &Objective,
        optimizer: &mut Optimizer,
    ) -> Result<Tensor> {
        let images = views.size()[0] / 2;
        let chunks = self.chunks(images);
        // Both views of a chunk's images, [first views; second views].
        let rows = |(start, count): (i64, i64), of: &Tensor| {
            Tensor::cat(&[of.narrow(0, start, count), of.narrow(0, images + start, count)], 0)
        };
        let saved: Vec<Tensor> = self.statistics.iter().map(Tensor::copy).collect();
        let projections: Vec<Tensor> =
            tch::no_grad(|| chunks.iter().map(|&chunk| objective.project(model, &rows(chunk, views))).collect());
        tch::no_grad(|| {
            for (statistic, value) in self.statistics.iter().zip(&saved) {
                statistic.shallow_clone().copy_(value);
            }
        });
        let part =
            |view: i64| chunks.iter().zip(&projections).map(move |(&(_, count), z)| z.narrow(0, view * count, count));
        let z = Tensor::cat(&part(0).chain(part(1)).collect::<Vec<_>>(), 0);
        let (loss, gradient) = objective.loss_and_gradient(&z, 2 * self.micro_batch_size as i64)?;
        let sum_kind = if z.kind() == Kind::Double { Kind::Double } else { Kind::Float };
        optimizer.backward_each(chunks.iter().map(|&chunk| {
            let z = objective.project(model, &rows(chunk, views));
            Ok((z * rows(chunk, &gradient)).sum(sum_kind))
        }))?;
        Ok(loss)
    }
}

/// One step's loss on a batch of 2N views (this rank's slice in a
/// multi-process run), with the parameters' gradient left in `optimizer`:
/// in one pass, or in chunks where `cache` splits the batch. The returned
/// loss is detached.
pub fn backward(
    model: &SimClr,
    views: &Tensor,
    objective: &Objective,
    cache: Option<&GradientCache>,
    optimizer: &mut Optimizer,
) -> Result<Tensor> {
    match cache {
        Some(cache) if cache.chunks(views.size()[0] / 2).len() > 1 => {
            cache.backward(model, views, objective, optimizer)
        }
        _ => {
            let loss = objective.loss(model, views)?;
            optimizer.backward(&loss)?;
            Ok(loss.detach())
        }
    }
}

/// Runs a training step; libtorch's out-of-memory failures (raised as
/// panics by tch's infallible ops) become [`Error::OutOfMemory`] naming the
/// batch size, and any other panic carries on.
pub(crate) fn out_of_memory_as_error<T>(
    step: impl FnOnce() -> Result<T>,
    device: Device,
    batch_size: usize,
) -> Result<T> {
    // A failed collective inside the forward pass (global BatchNorm) is its error.
    let step = || crate::dist::collectives_as_errors(step);
    let message = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)) {
        // Fallible calls (the backward pass) report it as an error...
        Ok(Err(Error::Torch(error))) if crate::device::is_out_of_memory(&error.to_string()) => error.to_string(),
        Ok(result) => return result,
        // ...the others, through tch, as a panic.
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            if !crate::device::is_out_of_memory(&message) {
                std::panic::resume_unwind(payload);
            }
            message
        }
    };
    Err(Error::OutOfMemory {
        device: format!("{device:?}"),
        batch_size,
        views: 2 * batch_size,
        message: allocation_failure(&message).to_owned(),
    })
}

/// The sentence of a libtorch error that says what failed to allocate,
/// without tch's wrapping or the C++ stack trace.
fn allocation_failure(message: &str) -> &str {
    let line = message.split('\n').flat_map(|l| l.split("\\n")).find(|l| crate::device::is_out_of_memory(l));
    let line = line.unwrap_or(message);
    ["DefaultCPUAllocator", "CUDA out of memory", "CUDA error: out of memory"]
        .iter()
        .find_map(|start| line.find(start))
        .map_or(line, |at| &line[at..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::Objective as LossObjective;
    use crate::model::{Arch, ModelConfig, Stem};
    use crate::optim::OptimConfig;

    const IMAGES: i64 = 12;

    /// `size` filled from a closed-form formula of the element index, so
    /// every call gives the same values without the global generator
    /// (which the crate's tests share across threads).
    fn formula(size: &[i64], salt: f64, scale: f64, offset: f64) -> Tensor {
        let count = size.iter().product::<i64>();
        ((Tensor::arange(count, (Kind::Float, Device::Cpu)) * 0.618 + salt).sin() * scale + offset).reshape(size)
    }

    /// A narrow ResNet-18 with a BatchNorm head (so the head's statistics
    /// are tested too), its optimiser, and a batch of views, all from
    /// formulas: the same on every call.
    fn setup() -> (nn::VarStore, SimClr, Optimizer, Tensor) {
        let store = nn::VarStore::new(Device::Cpu);
        let mut config =
            ModelConfig { arch: Arch::Resnet18, stem: Stem::Cifar, width_multiplier: 0.25, ..Default::default() };
        config.head.batch_norm = true;
        let model = SimClr::new(&store.root(), &config);
        let mut variables: Vec<(String, Tensor)> = store.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        tch::no_grad(|| {
            for (index, (name, tensor)) in variables.iter().enumerate() {
                let size = tensor.size();
                let salt = index as f64;
                // Running statistics away from (0, 1), so eval mode is not the identity.
                let value = if name.ends_with("running_mean") || name.ends_with("bias") {
                    formula(&size, salt, 0.2, 0.0)
                } else if name.ends_with("running_var") || size.len() == 1 {
                    formula(&size, salt, 0.4, 1.0)
                } else {
                    let fan_in = size[1..].iter().product::<i64>() as f64;
                    formula(&size, salt, (4.0 / fan_in).sqrt(), 0.0)
                };
                tensor.shallow_clone().copy_(&value);
            }
        });
        let named = variables.into_iter().filter(|(_, t)| t.requires_grad()).collect();
        let optimizer = Optimizer::new(&OptimConfig::default(), named);
        let views = formula(&[2 * IMAGES, 3, 16, 16], 0.5, 1.0, 0.0);
        (store, model, optimizer, views)
    }

    /// The loss and flat gradient of one step in `kind`, whole or in chunks of `micro`.
    fn step(objective: LossObjective, micro: Option<usize>, batch_norm_training: bool, kind: Kind) -> (f64, Tensor) {
        let (mut store, model, optimizer, views) = setup();
        let (mut optimizer, views) = if kind == Kind::Double {
            store.double();
            let named = store.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
            (Optimizer::new(&OptimConfig::default(), named), views.to_kind(kind))
        } else {
            (optimizer, views)
        };
        let loss_config = LossConfig { objective, temperature: 0.2, ..Default::default() };
        let mut step_objective = Objective::new(&loss_config, Precision::Fp32, None);
        step_objective.batch_norm_training = batch_norm_training;
        let cache = micro.map(|micro| GradientCache::new(&store, micro));
        let loss = backward(&model, &views, &step_objective, cache.as_ref(), &mut optimizer).unwrap();
        (loss.double_value(&[]), optimizer.gradient().expect("a backward pass ran").copy())
    }

    /// The largest difference relative to the largest magnitude.
    fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
    }

    #[test]
    fn chunks_with_frozen_batch_norm_give_the_whole_batchs_loss_and_gradient() {
        // fp32 rounds differently in chunks, by how much depending on the
        // CPU's kernels: measured 3.1-5.8e-6 on an AVX2 machine, 4.3e-6 to
        // 1.2e-5 (NT-Logistic; 8.8e-6 by norm) on one with AVX-512 and AMX.
        // fp64 shows the two are the same computation (measured 2e-15 to 1.1e-14).
        for (kind, tolerance) in [(Kind::Float, 2e-5), (Kind::Double, 1e-12)] {
            for objective in LossObjective::ALL {
                let (loss, gradient) = step(objective, None, false, kind);
                // 12 images in chunks of 5, 5 and 2.
                let (chunked_loss, chunked_gradient) = step(objective, Some(5), false, kind);
                let what = format!("{objective:?} in {kind:?}");
                assert!((chunked_loss - loss).abs() <= tolerance * loss.abs(), "{what}: {chunked_loss} against {loss}");
                let difference = relative_difference(&chunked_gradient, &gradient);
                let norm = (&chunked_gradient - &gradient).norm().double_value(&[]) / gradient.norm().double_value(&[]);
                eprintln!("{what}: chunked gradient differs by {difference:e} (by norm {norm:e})");
                assert!(difference < tolerance, "{what}: gradients differ by {difference:e}");
                assert!(gradient.abs().max().double_value(&[]) > 0.0);
                // Negative control: in training mode the chunks' BatchNorm
                // statistics are not the batch's, and the comparison sees it.
                let (_, per_chunk) = step(objective, Some(5), true, kind);
                let (_, whole) = step(objective, None, true, kind);
                let difference = relative_difference(&per_chunk, &whole);
                assert!(difference > 1e-3, "{what}: per-chunk BatchNorm went unnoticed ({difference:e})");
            }
        }
    }

    #[test]
    fn the_supervised_loss_is_the_cross_entropy_of_both_views_in_chunks_too() {
        let loss_config = LossConfig::default();
        let labels = Tensor::from_slice(&(0..IMAGES).map(|i| i % 3).collect::<Vec<i64>>());
        let supervised = |micro: Option<usize>, labels: &Tensor| {
            let (store, model, mut optimizer, views) = setup();
            let mut objective = Objective::new(&loss_config, Precision::Fp32, None).with_labels(Some(labels));
            objective.batch_norm_training = false;
            let cache = micro.map(|micro| GradientCache::new(&store, micro));
            let loss = backward(&model, &views, &objective, cache.as_ref(), &mut optimizer).unwrap();
            let z = tch::no_grad(|| model.forward_t(&views, false).1);
            (loss.double_value(&[]), optimizer.gradient().unwrap().copy(), z)
        };
        let (loss, gradient, z) = supervised(None, &labels);
        // By hand: -log softmax(z)[class], averaged over the 2N views, each
        // view of image i labelled as image i.
        let targets = Tensor::cat(&[&labels, &labels], 0);
        let by_hand = -z.log_softmax(1, Kind::Float).gather(1, &targets.unsqueeze(1), false).mean(Kind::Float);
        assert!((loss - by_hand.double_value(&[])).abs() < 1e-6, "{loss} against {by_hand}");
        // In chunks (BatchNorm frozen): the same loss and gradient.
        let (chunked, chunked_gradient, _) = supervised(Some(5), &labels);
        assert!((chunked - loss).abs() < 1e-5 * loss.abs(), "{chunked} against {loss}");
        assert!(relative_difference(&chunked_gradient, &gradient) < 1e-5);
        // Negative control: other labels, another loss and gradient.
        let (shifted, shifted_gradient, _) = supervised(None, &(&labels + 1).remainder(3));
        eprintln!("loss {loss}, with other labels {shifted}");
        assert!(shifted != loss, "the labels went unnoticed");
        assert!(relative_difference(&shifted_gradient, &gradient) > 1e-3, "the labels went unnoticed");
    }

    #[test]
    fn the_loss_is_taken_in_fp32_outside_autocast() {
        // bf16 autocast on the CPU stands in for CUDA's: the same casts.
        let (store, model, _, views) = setup();
        let loss_config = LossConfig::default();
        let loss = Objective::new(&loss_config, Precision::Bf16, None).loss(&model, &views).unwrap();
        assert_eq!(loss.kind(), Kind::Float);
        loss.backward();
        let (_, z) = Precision::Bf16.run(Device::Cpu, || model.forward_t(&views, true));
        assert_eq!(z.kind(), Kind::BFloat16, "the forward ran in bf16");
        let fp32 = loss_config.compute(&z).unwrap();
        assert_eq!(loss.double_value(&[]), fp32.double_value(&[]));
        // Master weights and their gradients stay fp32.
        for (name, weight) in store.variables() {
            assert_eq!(weight.kind(), Kind::Float, "{name}");
            if weight.requires_grad() {
                assert_eq!(weight.grad().kind(), Kind::Float, "{name}");
            }
        }
    }

    #[test]
    fn a_chunk_as_large_as_the_batch_is_a_plain_step() {
        let (loss, gradient) = step(LossObjective::NtXent, None, true, Kind::Float);
        let (same_loss, same_gradient) = step(LossObjective::NtXent, Some(IMAGES as usize), true, Kind::Float);
        assert_eq!(loss, same_loss);
        assert!(same_gradient.equal(&gradient));
    }

    /// The store's running statistics, in name order, as one vector.
    fn statistics(store: &nn::VarStore) -> Tensor {
        let mut named: Vec<(String, Tensor)> =
            store.variables().into_iter().filter(|(name, _)| name.contains("running_")).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Tensor::cat(&named.iter().map(|(_, t)| t.reshape([-1])).collect::<Vec<_>>(), 0)
    }

    #[test]
    fn each_chunk_moves_the_running_statistics_once() {
        let loss_config = LossConfig::default();
        let objective = Objective::new(&loss_config, Precision::Fp32, None);
        let (store, model, mut optimizer, views) = setup();
        let cache = GradientCache::new(&store, 4);
        let _loss = backward(&model, &views, &objective, Some(&cache), &mut optimizer).unwrap();
        let cached = statistics(&store);

        // The same chunks through BatchNorm in training mode, once each.
        let chunks = cache.chunks(IMAGES);
        let rows = |(start, count): (i64, i64)| {
            Tensor::cat(&[views.narrow(0, start, count), views.narrow(0, IMAGES + start, count)], 0)
        };
        let (store, model, _, _) = setup();
        let forward_chunks = || {
            tch::no_grad(|| {
                for &chunk in &chunks {
                    let _ = model.forward_t(&rows(chunk), true);
                }
            })
        };
        let initial = statistics(&store);
        forward_chunks();
        let once = statistics(&store);
        assert_eq!(relative_difference(&cached, &once), 0.0, "the cached step's statistics differ from one pass");
        // Negative controls: the statistics moved, and a second pass (as an
        // unrestored first pass would make) moves them further.
        assert!(relative_difference(&once, &initial) > 1e-3);
        forward_chunks();
        assert!(relative_difference(&statistics(&store), &cached) > 1e-3, "a second pass went unnoticed");
    }

    #[test]
    fn chunks_work_under_bf16_autocast() {
        // bf16 autocast on the CPU stands in for CUDA's: the same casts.
        let loss_config = LossConfig::default();
        let mut frozen = Objective::new(&loss_config, Precision::Bf16, None);
        frozen.batch_norm_training = false;
        let (_, model, mut optimizer, views) = setup();
        let loss = backward(&model, &views, &frozen, None, &mut optimizer).unwrap();
        let gradient = optimizer.gradient().unwrap().copy();
        let (store, model, mut optimizer, views) = setup();
        let cache = GradientCache::new(&store, 4);
        let chunked = backward(&model, &views, &frozen, Some(&cache), &mut optimizer).unwrap();
        assert_eq!(chunked.kind(), Kind::Float, "the loss is taken in fp32");
        let chunked_gradient = optimizer.gradient().unwrap();
        assert_eq!(chunked_gradient.kind(), Kind::Float, "master gradients stay fp32");
        // bf16 rounds each chunk's products differently from the batch's,
        // and how depends on the CPU's kernels (measured: gradients 4.8e-3
        // apart on one machine, 2.2e-2 on an AMD EPYC), so the bound is four
        // of bf16's epsilons (7.8e-3 each).
        let (loss, chunked) = (loss.double_value(&[]), chunked.double_value(&[]));
        assert!((chunked - loss).abs() < 1e-3 * loss.abs(), "{chunked} against {loss}");
        let difference = relative_difference(chunked_gradient, &gradient);
        assert!(difference < 3.2e-2, "bf16 gradients differ by {difference:e}");
        // Negative control: other pairs (view 1 of the batch reversed) give a
        // gradient far outside that bound (measured: 2.0 apart).
        let (_, model, mut optimizer, views) = setup();
        let n = views.size()[0] / 2;
        let unpaired = Tensor::cat(&[views.narrow(0, 0, n).flip([0]), views.narrow(0, n, n)], 0);
        let _ = backward(&model, &unpaired, &frozen, None, &mut optimizer).unwrap();
        let other = relative_difference(optimizer.gradient().unwrap(), &gradient);
        assert!(other > 0.2, "other pairs' gradient is only {other:e} away");
    }

    #[test]
    fn allocation_failures_are_cut_to_their_sentence() {
        let cpu = "called `Result::unwrap()` on an `Err` value: Torch(\"[enforce fail at alloc_cpu.cpp:127] err == 0. \
                   DefaultCPUAllocator: can't allocate memory: you tried to allocate 838860800 bytes.\\nframe #0: c10::x\")";
        assert_eq!(
            allocation_failure(cpu),
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 838860800 bytes."
        );
        let cuda = "Torch(\"CUDA out of memory. Tried to allocate 2.00 GiB.\\nframe #0\")";
        assert_eq!(allocation_failure(cuda), "CUDA out of memory. Tried to allocate 2.00 GiB.");
    }

    #[test]
    fn other_panics_are_not_swallowed() {
        let caught = std::panic::catch_unwind(|| {
            out_of_memory_as_error(|| -> Result<()> { panic!("shape mismatch") }, Device::Cpu, 4)
        });
        assert!(caught.is_err());
        let oom = out_of_memory_as_error(|| -> Result<()> { panic!("CUDA out of memory. Tried") }, Device::Cpu, 4);
        assert!(matches!(oom, Err(Error::OutOfMemory { batch_size: 4, views: 8, .. })));
    }
}
