//! Optimisers and the learning-rate schedule (section 2.2 and appendix B).
//!
//! Updates are written out here rather than taken from `tch::nn::Optimizer`
//! because LARS is not in libtorch, and because every optimiser's state
//! (momentum and moment buffers) must go into checkpoints by name.
//!
//! BatchNorm and bias parameters, the one-dimensional ones, are excluded
//! from weight decay and from LARS adaptation, as in the paper's code
//! (`exclude_from_weight_decay=['batch_normalization', 'bias']`).
pub mod adamw;
mod buffer;
mod config;
mod gate;
pub mod lars;
pub mod scale;
pub mod schedule;
pub mod sgd;

use std::collections::HashMap;

use tch::Tensor;

pub use config::{LrScaling, OptimConfig, OptimizerKind};
pub use scale::LossScale;
pub use schedule::Schedule;

use buffer::{chunks, decayed_gradient, flatten_in, memory_order, Chunk, Execution, Layout};
use gate::Amounts;

use crate::dist::{GradientBuckets, ProcessGroup, ReduceOp};
use crate::{Error, Result};

/// The hyper-parameters every update needs, besides the learning rate.
#[derive(Debug, Clone, Copy)]
pub struct Hyper {
    pub weight_decay: f64,
    pub momentum: f64,
    pub trust_coefficient: f64,
}

/// An optimiser over named parameters with named state buffers.
///
/// The parameters' data is moved into one flat buffer (each tensor becomes
/// a view of its part, see `Layout`); gradients are taken by
/// [`Optimizer::backward`] straight into a flat buffer too, so nothing is
/// zeroed or accumulated between steps.
#[derive(Debug)]
pub struct Optimizer {
    kind: OptimizerKind,
    hyper: Hyper,
    names: Vec<String>,
    /// The parameters, in name order: views of `weights` after `new`.
    params: Vec<Tensor>,
    /// Each parameter's [`memory_order`].
    orders: Vec<Vec<i64>>,
    weights: Tensor,
    /// The parts of the buffers the update functions take one at a time.
    chunks: Vec<Chunk>,
    /// See [`Execution::host_verdict`].
    host_verdict: bool,
    /// The last backward pass's gradients, flat; `None` before the first.
    gradient: Option<Tensor>,
    /// In a multi-process run, the gradient's all-reduce in buckets sent
    /// during the backward pass ([`Optimizer::reduce_in_buckets`]); the
    /// gradients then land in its buffer.
    buckets: Option<GradientBuckets>,
    /// Momentum (LARS, SGD) or first and second moments (AdamW), flat.
    state: Vec<Tensor>,
    /// Updates taken so far (a skipped one does not count, as
    /// `torch.optim.AdamW` under `GradScaler`, whose skipped steps never
    /// reach the optimiser: AdamW's bias correction reads the count), and
    /// the rate the next update takes: 0-d tensors on the
    /// parameters' device, changed there in place, so that an update
    /// captured in a CUDA graph counts and reads them when replayed (a
    /// number passed to a kernel is fixed at capture). The rate is f64, as
    /// a number passed to a kernel is: an fp32 tensor times it rounds it to
    /// fp32 as before, and AdamW's factors are f64 products as on the host.
    steps: Tensor,
    learning_rate: Tensor,
    /// fp16's loss scale ([`Optimizer::scale_losses`]).
    loss_scale: Option<LossScale>,
}

impl Optimizer {
    /// Takes over `named` parameters: their values move into one flat
    /// buffer, which they then view. All must share one device and dtype.
    pub fn new(config: &OptimConfig, named: Vec<(String, Tensor)>) -> Self {
        let device = named.first().map_or(tch::Device::Cpu, |(_, t)| t.device());
        Self::with_execution(config, named, Execution::for_device(device))
    }

    fn with_execution(config: &OptimConfig, mut named: Vec<(String, Tensor)>, execution: Execution) -> Self {
        let kind = config.optimizer;
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let (names, params): (Vec<String>, Vec<Tensor>) = named.into_iter().unzip();
        let options = params.first().map_or((tch::Kind::Float, tch::Device::Cpu), |p| (p.kind(), p.device()));
        assert!(
            params.iter().all(|p| (p.kind(), p.device()) == options),
            "the optimiser's parameters must share one dtype and device"
        );
        let orders: Vec<Vec<i64>> = params.iter().map(memory_order).collect();
        let flat: Vec<Tensor> = params.iter().zip(&orders).map(|(p, order)| flatten_in(&p.detach(), order)).collect();
        let weights =
            if flat.is_empty() { Tensor::zeros([0], options) } else { tch::no_grad(|| Tensor::cat(&flat, 0)) };
        let chunks = chunks(&params, execution.chunk_elements);
        let slots = if kind == OptimizerKind::Adamw { 2 } else { 1 };
        let state = (0..slots).map(|_| weights.zeros_like()).collect();
        let hyper = Hyper {
            weight_decay: config.weight_decay,
            momentum: config.momentum,
            trust_coefficient: config.trust_coefficient,
        };
        let optimizer = Self {
            kind,
            hyper,
            names,
            params,
            orders,
            weights,
            chunks,
            host_verdict: execution.host_verdict,
            gradient: None,
            buckets: None,
            state,
            steps: Tensor::zeros([], (tch::Kind::Int64, options.1)),
            learning_rate: Tensor::zeros([], (tch::Kind::Double, options.1)),
            loss_scale: None,
        };
        for (param, (_, view)) in optimizer.params.iter().zip(optimizer.views(&optimizer.weights)) {
            tch::no_grad(|| param.shallow_clone().set_data(&view));
        }
        optimizer
    }

    /// From now on, every loss is scaled before its backward pass and every
    /// gradient unscaled before its update, the scale adjusted to the
    /// gradients' range (fp16 training; see [`LossScale`]). The scale is
    /// part of the state ([`Optimizer::state_tensors`]).
    pub fn scale_losses(&mut self) {
        self.loss_scale = Some(LossScale::new(self.weights.device()));
    }

    /// The loss scale, where losses are scaled.
    pub fn loss_scale(&self) -> Option<&LossScale> {
        self.loss_scale.as_ref()
    }

    /// Divides the last backward pass's gradient by the loss scale, where
    /// losses are scaled (before anything reads it).
    fn unscale_gradient(&mut self) {
        if let (Some(scale), Some(gradient)) = (&self.loss_scale, &mut self.gradient) {
            scale.unscale(gradient);
        }
    }

    /// Back-propagates `loss` to the parameters, keeping their gradients
    /// (flat) for [`Optimizer::step`]; a parameter `loss` does not reach gets 0.
    pub fn backward(&mut self, loss: &Tensor) -> Result<()> {
        self.backward_each(std::iter::once(Ok(loss.shallow_clone())))
    }

    /// [`Optimizer::backward`] for the sum of `losses`, back-propagated one
    /// at a time as they come (each graph is freed before the next is
    /// built): the gradient of a batch computed in chunks.
    pub fn backward_each(&mut self, losses: impl ExactSizeIterator<Item = Result<Tensor>>) -> Result<()> {
        let scale = self.loss_scale.as_ref();
        let losses = losses.map(|loss| loss.map(|loss| scale.map_or(loss.shallow_clone(), |s| s.scaled(&loss))));
        if let Some(buckets) = &mut self.buckets {
            // The hooks fill the buckets' buffer; the last pass sends them.
            let passes = losses.len();
            for (pass, loss) in losses.enumerate() {
                // The loss taken inside the pass: a failed forward drops the step too.
                let backward = || Ok(Tensor::f_run_backward(&[&loss?], &self.params, false, false)?);
                buckets.pass(pass + 1 == passes, backward)?;
            }
            self.gradient = Some(buckets.flat().shallow_clone());
            return Ok(());
        }
        let mut sum: Option<Tensor> = None;
        for loss in losses {
            let gradient = self.gradient_of(&loss?)?;
            sum = Some(match sum {
                Some(mut sum) => {
                    let _ = sum.g_add_(&gradient);
                    sum
                }
                None => gradient,
            });
        }
        self.gradient = Some(sum.unwrap_or_else(|| self.weights.zeros_like()));
        Ok(())
    }

    fn gradient_of(&self, loss: &Tensor) -> Result<Tensor> {
        let grads = Tensor::f_run_backward(&[loss], &self.params, false, false)?;
        let flat: Vec<Tensor> = grads
            .iter()
            .zip(&self.params)
            .zip(&self.orders)
            .map(
                |((g, p), order)| {
                    if g.defined() {
                        flatten_in(g, order)
                    } else {
                        p.detach().reshape([-1]).zeros_like()
                    }
                },
            )
            .collect();
        Ok(if flat.is_empty() { self.weights.zeros_like() } else { Tensor::cat(&flat, 0) })
    }

    /// The last backward pass's gradients, flat in name order (`None` before the first).
    pub fn gradient(&self) -> Option<&Tensor> {
        self.gradient.as_ref()
    }

    /// Averages the last backward pass's gradients over `group`'s ranks
    /// (a sum all-reduce of the flat buffer, then / W): with every rank's
    /// loss back-propagated through the gathered projections, that is the
    /// gradient of the global batch's loss (see [`crate::dist`]). With
    /// buckets, most of it was sent during the backward pass; this waits.
    pub fn average_gradient(&mut self, group: &ProcessGroup) -> Result<()> {
        if let Some(buckets) = &mut self.buckets {
            buckets.finish()?;
            return Ok(());
        }
        let Some(gradient) = &mut self.gradient else { return Ok(()) };
        if group.size() > 1 {
            group.all_reduce(gradient, ReduceOp::Sum)?;
            let _ = gradient.g_div_scalar_(group.size() as f64);
        }
        Ok(())
    }

    /// From now on, [`Optimizer::average_gradient`] over `group` goes in
    /// buckets of about `cap_bytes` of the flat gradient, each all-reduced
    /// while the backward pass computes the layers below it (as DDP does),
    /// so that communication hides behind computation. Every rank must
    /// follow each backward pass by [`Optimizer::average_gradient`].
    /// With `bf16`, each bucket travels rounded to bf16.
    pub fn reduce_in_buckets(&mut self, group: &ProcessGroup, cap_bytes: usize, bf16: bool) -> Result<()> {
        self.buckets = None;
        let flat = self.weights.zeros_like();
        self.buckets = Some(GradientBuckets::new(group, &self.params, &self.orders, &flat, cap_bytes, bf16)?);
        Ok(())
    }

    /// Makes every rank's weights (and optimiser state, the step count
    /// included: AdamW's bias correction reads it) rank `root`'s.
    pub fn broadcast(&mut self, group: &ProcessGroup, root: usize) -> Result<()> {
        tch::no_grad(|| {
            group.broadcast(&mut self.weights, root)?;
            group.broadcast(&mut self.steps.view([1]), root)?;
            if let Some(scale) = &mut self.loss_scale {
                for (_, tensor) in scale.tensors_mut() {
                    group.broadcast(&mut tensor.view([1]), root)?;
                }
            }
            self.state.iter_mut().try_for_each(|state| group.broadcast(state, root))
        })
    }

    /// The parameters as one flat tensor (a view: read, do not keep).
    pub fn flat_weights(&self) -> &Tensor {
        &self.weights
    }

    /// Sets the learning rate of the updates that follow. On a GPU, a
    /// fill queued on the device like any other kernel.
    pub fn set_learning_rate(&mut self, lr: f64) {
        let _ = self.learning_rate.fill_(lr);
    }

    /// Applies one update with learning rate `lr` from the last backward
    /// pass's gradients (none yet: nothing happens). With a loss scale,
    /// [`Optimizer::step_if_finite`] is the step to take (it adjusts the
    /// scale); this one only unscales the gradient.
    pub fn step(&mut self, lr: f64) {
        self.unscale_gradient();
        self.set_learning_rate(lr);
        self.update(None);
    }

    /// One update at the rate set, shut where `open` (a 0-d bool on the device) is false.
    fn update(&mut self, open: Option<Tensor>) {
        let Some(grad) = &self.gradient else { return };
        let (hyper, lr) = (self.hyper, &self.learning_rate);
        tch::no_grad(|| {
            // The update is t = steps + 1, counted once it is taken.
            let taken = open.as_ref().map(|open| open.to_kind(tch::Kind::Int64));
            let adamw = (self.kind == OptimizerKind::Adamw).then(|| adamw::Factors::new(lr, &(&self.steps + 1), hyper));
            let amounts = Amounts { open, device: self.weights.device() };
            for chunk in &self.chunks {
                let (mut weights, grad, layout) = (chunk.of(&self.weights), chunk.of(grad), &chunk.layout);
                let mut state: Vec<Tensor> = self.state.iter().map(|s| chunk.of(s)).collect();
                let [first, rest @ ..] = state.as_mut_slice() else { unreachable!("every optimiser keeps state") };
                match self.kind {
                    OptimizerKind::Lars => lars::update(&mut weights, &grad, first, layout, lr, hyper, &amounts),
                    OptimizerKind::Sgd => sgd::update(&mut weights, &grad, first, layout, lr, hyper, &amounts),
                    OptimizerKind::Adamw => {
                        let [second] = rest else { unreachable!("AdamW keeps exactly two moments") };
                        let factors = adamw.as_ref().expect("made for AdamW above");
                        adamw::update(&mut weights, &grad, [first, second], layout, factors, &amounts)
                    }
                }
            }
            let _ = match &taken {
                Some(taken) => self.steps.g_add_(taken),
                None => self.steps.g_add_scalar_(1),
            };
        });
    }

    /// [`Optimizer::step`], taking effect only if `loss` and every gradient
    /// are finite; returns that verdict as a 0-d bool tensor on the device.
    ///
    /// On a GPU nothing is read by the host, so the device never waits for
    /// it: the verdict shuts the update on the device (see `Amounts`). A
    /// step skipped leaves the optimiser as it was, its step count included.
    pub fn step_if_finite(&mut self, lr: f64, loss: &Tensor) -> Tensor {
        self.set_learning_rate(lr);
        self.step_if_finite_at_set_rate(loss)
    }

    /// [`Optimizer::step_if_finite`] at the rate last set by
    /// [`Optimizer::set_learning_rate`]: on a GPU, work a CUDA graph can
    /// capture, as it neither reads from the device nor takes a number
    /// that changes between steps.
    ///
    /// With a loss scale, the gradient is unscaled first, and the verdict
    /// returned is [`LossScale::update`]'s (an overflow the scale will fix
    /// is no divergence), while the update is taken only if finite.
    pub fn step_if_finite_at_set_rate(&mut self, loss: &Tensor) -> Tensor {
        self.unscale_gradient();
        let finite = match &self.gradient {
            // min g and max g are both finite exactly when every gradient is
            // (the reductions propagate NaN). One pass, no temporary: on 11M
            // floats on the CPU, 2.7 ms, where max |g| took 15 and
            // isfinite().all() 50.
            Some(grad) if grad.numel() > 0 => {
                let (low, high) = grad.aminmax(None::<i64>, false);
                loss.isfinite().logical_and(&low.isfinite()).logical_and(&high.isfinite())
            }
            _ => loss.isfinite(),
        };
        let verdict = match &mut self.loss_scale {
            Some(scale) => scale.update(loss, &finite),
            None => finite.shallow_clone(),
        };
        if self.host_verdict {
            // Spares the gated update's sanitising pass over the gradient.
            if bool::try_from(&finite).unwrap_or(false) {
                self.update(None);
            }
            return verdict;
        }
        self.update(Some(finite));
        verdict
    }

    /// Per parameter, in name order: its name and its part of `flat`, shaped
    /// (and laid out in memory) like it.
    fn views<'a>(&'a self, flat: &'a Tensor) -> impl Iterator<Item = (&'a str, Tensor)> + 'a {
        let mut offset = 0;
        self.names.iter().zip(&self.params).zip(&self.orders).map(move |((name, param), order)| {
            let (size, numel) = (param.size(), param.numel() as i64);
            let permuted: Vec<i64> = order.iter().map(|&d| size[d as usize]).collect();
            let mut inverse = vec![0i64; order.len()];
            for (position, &d) in order.iter().enumerate() {
                inverse[d as usize] = position as i64;
            }
            let view = flat.narrow(0, offset, numel).view(permuted.as_slice()).permute(&inverse);
            offset += numel;
            (name.as_str(), view)
        })
    }

    /// The state to checkpoint: `{slot}.{parameter name}` plus the step
    /// count, and the loss scale where losses are scaled.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("steps".to_owned(), self.steps.to_device(tch::Device::Cpu).copy())];
        if let Some(scale) = &self.loss_scale {
            out.extend(scale.tensors().map(|(name, t)| (name.to_owned(), t.to_device(tch::Device::Cpu).copy())));
        }
        for (slot, flat) in self.state.iter().enumerate() {
            out.extend(self.views(flat).map(|(name, view)| (format!("{slot}.{name}"), view)));
        }
        out
    }

    /// Restores what [`Optimizer::state_tensors`] gave, checking every name and shape.
    pub fn load_state(&mut self, mut saved: HashMap<String, Tensor>) -> Result<()> {
        let missing = |name: &str| Error::InvalidArgument(format!("optimiser state '{name}' is missing"));
        let steps = saved.remove("steps").ok_or_else(|| missing("steps"))?.int64_value(&[]);
        let _ = tch::no_grad(|| self.steps.fill_(steps));
        // A loss scale saved by a run in fp16, taken where losses are scaled
        // (a run saved in another precision leaves the scale fresh).
        for (name, tensor) in self.loss_scale.iter_mut().flat_map(LossScale::tensors_mut) {
            if let Some(value) = saved.remove(name) {
                tch::no_grad(|| tensor.copy_(&value));
            }
        }
        for (slot, flat) in self.state.iter().enumerate() {
            for (name, mut view) in self.views(flat) {
                let name = format!("{slot}.{name}");
                let value = saved.remove(&name).ok_or_else(|| missing(&name))?;
                if value.size() != view.size() {
                    return Err(Error::InvalidArgument(format!(
                        "optimiser state '{name}' has shape {:?}, expected {:?}",
                        value.size(),
                        view.size()
                    )));
                }
                tch::no_grad(|| view.copy_(&value));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn parameters() -> Vec<(String, Tensor)> {
        let options = (Kind::Float, Device::Cpu);
        [("conv", vec![4, 3, 3, 3]), ("bias", vec![4]), ("fc", vec![5, 4]), ("zero", vec![2, 2])]
            .into_iter()
            .map(|(name, shape)| {
                let value = if name == "zero" { Tensor::zeros(shape, options) } else { Tensor::randn(shape, options) };
                (name.to_owned(), value.set_requires_grad(true))
            })
            .collect()
    }

    #[test]
    fn flat_lars_matches_the_update_written_per_tensor() {
        let params = parameters();
        let hyper = Hyper { weight_decay: 1e-2, momentum: 0.9, trust_coefficient: 0.001 };
        let expected: Vec<(Tensor, Tensor)> = params.iter().map(|(_, w)| (w.detach().copy(), w.zeros_like())).collect();
        let config = OptimConfig { weight_decay: hyper.weight_decay, ..Default::default() };
        let mut optimizer =
            Optimizer::new(&config, params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
        for step in 0..3 {
            let gradients: Vec<Tensor> = params.iter().map(|(_, w)| Tensor::randn_like(w)).collect();
            let objective = params
                .iter()
                .zip(&gradients)
                .map(|((_, w), g)| (w * g).sum(Kind::Float))
                .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
            optimizer.backward(&objective).unwrap();
            optimizer.step(0.5);
            for (((name, w), g), (reference, velocity)) in params.iter().zip(&gradients).zip(&expected) {
                // The paper's LARS for one tensor, as lars.rs's header states it.
                let adapted = w.dim() > 1;
                let g = if adapted { g + reference * hyper.weight_decay } else { g.shallow_clone() };
                let (w_norm, g_norm) = (reference.norm().double_value(&[]), g.norm().double_value(&[]));
                let trust = if adapted && w_norm > 0.0 && g_norm > 0.0 {
                    hyper.trust_coefficient * w_norm / g_norm
                } else {
                    1.0
                };
                tch::no_grad(|| {
                    let _ = velocity.shallow_clone().g_mul_scalar_(hyper.momentum).g_add_(&(g * (trust * 0.5)));
                    let _ = reference.shallow_clone().g_sub_(velocity);
                });
                let error = (w - reference).abs().max().double_value(&[]);
                assert!(error < 1e-6, "step {step}, {name}: {error:e}");
            }
        }
        // The state reads back per tensor, by name.
        let state = optimizer.state_tensors();
        assert_eq!(state.len(), 1 + params.len());
        let velocity = &state.iter().find(|(n, _)| n == "0.fc").unwrap().1;
        assert!(velocity.allclose(&expected[2].1, 1e-6, 1e-6, false));
    }

    #[test]
    fn channels_last_parameters_keep_their_layout_and_their_updates() {
        // The same SGD steps on a convolution kernel stored NCHW and one
        // stored channels-last give the same values.
        let options = (Kind::Float, Device::Cpu);
        let start = Tensor::randn([4, 3, 3, 3], options);
        let gradient = Tensor::randn([4, 3, 3, 3], options);
        let config = OptimConfig { optimizer: OptimizerKind::Sgd, ..Default::default() };
        let results: Vec<Tensor> = [false, true]
            .into_iter()
            .map(|last| {
                let w = if last { crate::device::channels_last(&start) } else { start.copy() }.set_requires_grad(true);
                let mut optimizer = Optimizer::new(&config, vec![("w".to_owned(), w.shallow_clone())]);
                assert_eq!(w.stride(), if last { vec![27, 1, 9, 3] } else { vec![27, 9, 3, 1] });
                for _ in 0..2 {
                    optimizer.backward(&(&w * &gradient).sum(Kind::Float)).unwrap();
                    optimizer.step(0.1);
                }
                let state = optimizer.state_tensors().pop().unwrap().1;
                assert!(state.allclose(&(&gradient * 1.9), 1e-5, 1e-5, false), "momentum, read back per tensor");
                w.detach().copy()
            })
            .collect();
        assert!(results[0].allclose(&results[1], 1e-6, 1e-6, false));
        assert!(results[0].allclose(&(&start - &gradient * 0.29), 1e-5, 1e-5, false));
    }

    #[test]
    fn parameters_view_the_flat_buffer_and_keep_their_gradients_apart() {
        let params = parameters();
        let before: Vec<Tensor> = params.iter().map(|(_, t)| t.detach().copy()).collect();
        let mut optimizer = Optimizer::new(
            &OptimConfig { optimizer: OptimizerKind::Sgd, weight_decay: 0.0, ..Default::default() },
            params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
        );
        for ((_, t), value) in params.iter().zip(&before) {
            assert!(t.equal(value), "values are kept when moved into the flat buffer");
        }
        // Only `fc` takes part: the others get no update, however often.
        for _ in 0..2 {
            let loss = params[2].1.sum(Kind::Float);
            optimizer.backward(&loss).unwrap();
            assert!(bool::try_from(optimizer.step_if_finite(0.1, &loss)).unwrap());
        }
        for ((name, t), value) in params.iter().zip(&before) {
            let moved = !t.equal(value);
            assert_eq!(moved, name == "fc", "{name}");
        }
        // SGD with momentum 0.9: w - 0.1·1 - 0.1·1.9.
        assert!(params[2].1.allclose(&(&before[2] - 0.29), 1e-5, 1e-5, false));
        let loss = params[2].1.sum(Kind::Float);
        optimizer.backward(&(&params[0].1.sum(Kind::Float) * f64::NAN)).unwrap();
        assert!(!bool::try_from(optimizer.step_if_finite(0.1, &loss)).unwrap(), "a NaN gradient with a finite loss");
    }

    #[test]
    fn a_scaled_loss_steps_as_the_unscaled_one_skips_its_overflows_and_keeps_its_scale() {
        for optimizer in [OptimizerKind::Lars, OptimizerKind::Adamw] {
            scaled_and_unscaled_agree(OptimConfig { optimizer, weight_decay: 1e-4, ..Default::default() });
        }
    }

    fn scaled_and_unscaled_agree(config: OptimConfig) {
        // One optimiser scales its losses, the other does not: the scale is
        // a power of two, so their gradients and steps agree bit for bit.
        let (params, scaled_params) = (parameters(), parameters());
        for ((_, a), (_, b)) in params.iter().zip(&scaled_params) {
            tch::no_grad(|| b.shallow_clone().copy_(a));
        }
        let own = |params: &[(String, Tensor)]| params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        let (mut plain, mut scaled) =
            (Optimizer::new(&config, own(&params)), Optimizer::new(&config, own(&scaled_params)));
        scaled.scale_losses();
        let loss_of =
            |params: &[(String, Tensor)]| (&params[1].1 * &params[1].1).sum(Kind::Float) + params[2].1.sum(Kind::Float);
        let both_step = |plain: &mut Optimizer, scaled: &mut Optimizer| {
            for (optimizer, params) in [(plain, &params), (scaled, &scaled_params)] {
                let loss = loss_of(params);
                optimizer.backward(&loss).unwrap();
                assert!(bool::try_from(optimizer.step_if_finite(0.1, &loss)).unwrap());
            }
        };
        for _ in 0..3 {
            both_step(&mut plain, &mut scaled);
        }
        let kind = config.optimizer;
        assert!(plain.flat_weights().equal(scaled.flat_weights()), "{kind:?}: scaled steps differ from plain ones");
        assert_eq!(scaled.loss_scale().unwrap().value(), scale::INITIAL_SCALE);
        // An overflow: skipped without counting as divergence, the scale
        // halved, and the optimiser left as if it never came (its step count
        // too, as GradScaler never calls a skipped step): the next step is
        // the plain one's.
        let before = scaled.flat_weights().copy();
        let loss = loss_of(&scaled_params);
        scaled.backward(&(&loss * 1e36)).unwrap();
        assert!(bool::try_from(scaled.step_if_finite(0.1, &loss)).unwrap(), "an overflow is the scale's");
        assert!(scaled.flat_weights().equal(&before), "{kind:?}: the overflowing step was taken");
        assert_eq!(scaled.loss_scale().unwrap().value(), scale::INITIAL_SCALE / 2.0);
        both_step(&mut plain, &mut scaled);
        assert!(plain.flat_weights().equal(scaled.flat_weights()), "{kind:?}: the overflow changed the next step");
        // The scale travels with the state; a fresh optimiser's is the initial one.
        let state = || -> HashMap<String, Tensor> { scaled.state_tensors().into_iter().collect() };
        let mut resumed = Optimizer::new(&config, own(&parameters()));
        resumed.scale_losses();
        assert_eq!(resumed.loss_scale().unwrap().value(), scale::INITIAL_SCALE, "the control");
        resumed.load_state(state()).unwrap();
        assert_eq!(resumed.loss_scale().unwrap().value(), scale::INITIAL_SCALE / 2.0);
        // Without a loss scale, the saved one is left aside.
        plain.load_state(state()).unwrap();
        assert!(plain.loss_scale().is_none());
    }

    /// The GPU's execution (whole buffers, verdicts applied on the device),
    /// the CPU's, and chunks that split the test parameters every way:
    /// bias | conv | fc, zero (a single tensor and a shared chunk).
    const EXECUTIONS: [Execution; 4] = [
        Execution { chunk_elements: None, host_verdict: false },
        Execution { chunk_elements: Some(1 << 16), host_verdict: true },
        Execution { chunk_elements: Some(1), host_verdict: false },
        Execution { chunk_elements: Some(40), host_verdict: true },
    ];

    #[test]
    fn every_execution_gives_the_same_updates() {
        for kind in OptimizerKind::ALL {
            let config = OptimConfig { optimizer: kind, weight_decay: 1e-2, ..Default::default() };
            let start = parameters();
            let gradients: Vec<Vec<Tensor>> =
                (0..3).map(|_| start.iter().map(|(_, w)| Tensor::randn_like(w)).collect()).collect();
            let results: Vec<Vec<Tensor>> = EXECUTIONS
                .iter()
                .map(|&execution| {
                    let params: Vec<(String, Tensor)> =
                        start.iter().map(|(n, w)| (n.clone(), w.detach().copy().set_requires_grad(true))).collect();
                    let mut optimizer = Optimizer::with_execution(
                        &config,
                        params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
                        execution,
                    );
                    for step in &gradients {
                        let objective = params
                            .iter()
                            .zip(step)
                            .map(|((_, w), g)| (w * g).sum(Kind::Float))
                            .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
                        optimizer.backward(&objective).unwrap();
                        assert!(bool::try_from(optimizer.step_if_finite(0.5, &objective)).unwrap());
                    }
                    let state = optimizer.state_tensors().into_iter().skip(1).map(|(_, t)| t.copy());
                    params.iter().map(|(_, t)| t.detach().copy()).chain(state).collect()
                })
                .collect();
            for (execution, result) in EXECUTIONS.iter().zip(&results).skip(1) {
                for (a, b) in result.iter().zip(&results[0]) {
                    let error = (a - b).abs().max().double_value(&[]);
                    assert!(error < 1e-6, "{kind:?}, {execution:?}: {error:e}");
                }
            }
        }
    }

    #[test]
    fn a_step_with_a_non_finite_loss_or_gradient_changes_nothing() {
        let params = parameters();
        for kind in OptimizerKind::ALL {
            let config = OptimConfig { optimizer: kind, weight_decay: 0.1, ..Default::default() };
            for execution in EXECUTIONS {
                let params: Vec<(String, Tensor)> =
                    params.iter().map(|(n, w)| (n.clone(), w.detach().copy().set_requires_grad(true))).collect();
                let named = params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
                a_bad_step_changes_nothing(Optimizer::with_execution(&config, named, execution), &params);
            }
        }
    }

    fn a_bad_step_changes_nothing(mut optimizer: Optimizer, params: &[(String, Tensor)]) {
        let objective = |scale: f64| (&params[2].1 * &params[2].1).sum(Kind::Float) * scale;
        let loss = objective(1.0);
        optimizer.backward(&loss).unwrap();
        assert!(bool::try_from(optimizer.step_if_finite(0.1, &loss)).unwrap());
        let snapshot = |o: &Optimizer| -> Vec<Tensor> {
            o.state_tensors()
                .into_iter()
                .map(|(_, t)| t.copy())
                .chain(params.iter().map(|(_, t)| t.detach().copy()))
                .collect()
        };
        let before = snapshot(&optimizer);
        // A NaN loss (and so NaN gradients), then an infinite gradient alone.
        let loss = objective(f64::NAN);
        optimizer.backward(&loss).unwrap();
        assert!(!bool::try_from(optimizer.step_if_finite(0.1, &loss)).unwrap());
        // Then, with a finite loss, gradients of +inf, -inf or NaN alone.
        let loss = objective(1.0);
        for bad in [f64::INFINITY, f64::NEG_INFINITY, f64::NAN] {
            optimizer.backward(&(&params[0].1.sum(Kind::Float) * bad)).unwrap();
            assert!(!bool::try_from(optimizer.step_if_finite(0.1, &loss)).unwrap(), "{bad}");
        }
        for (now, then) in snapshot(&optimizer).iter().zip(&before) {
            assert!(now.equal(then));
        }
        optimizer.backward(&loss).unwrap();
        assert!(bool::try_from(optimizer.step_if_finite(0.1, &loss)).unwrap());
        assert!(!params[2].1.detach().equal(&before[before.len() - 2]));
        assert_eq!(optimizer.steps.int64_value(&[]), 2, "skipped steps do not count in AdamW's bias correction");
    }
}
