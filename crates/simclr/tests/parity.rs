//! Parity with PyTorch/torchvision 2.11 on fixtures written by
//! `tools/fixtures/make_fixtures.py` (run by hand; see its docstring).
//!
//! Tolerances: relative error ‖ours − ref‖∞ / ‖ref‖∞ below 1e-5 for NT-Xent
//! values and gradients (fp64 and fp32), 1e-4 for encoder features (also
//! with BatchNorm folded into the convolutions) and BatchNorm statistics,
//! 1e-6 for one optimiser update; for evaluation on the same features,
//! accuracy within 0.5 point of the reference's.
use std::collections::HashMap;
use std::path::PathBuf;

use simclr::eval::{knn_hits, linear_eval, KnnConfig, LinearConfig};
use simclr::loss::{dcl::dcl, nt_xent::nt_xent, Layout, Similarity};
use simclr::model::{Arch, ResNet, Stem};
use simclr::optim::{OptimConfig, Optimizer, OptimizerKind};
use simclr::tch::{nn, Device, Kind, Tensor};

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    Tensor::read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_iter().collect()
}

fn relative_error(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.size(), reference.size());
    let ours = ours.to_kind(Kind::Double);
    let reference = reference.to_kind(Kind::Double);
    let scale = reference.abs().max().double_value(&[]).max(1e-30);
    (ours - reference).abs().max().double_value(&[]) / scale
}

/// The closed-form weights of `formula_fill` in tools/fixtures/make_fixtures.py.
fn formula_fill(name: &str, index: usize, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let i = Tensor::arange(n, (Kind::Double, Device::Cpu));
    let wave = (i * 0.73 + index as f64 * 1.3).sin();
    let values = if name.ends_with("running_var") {
        wave * 0.25 + 0.75
    } else if name.ends_with("running_mean") || name.ends_with("bias") {
        wave * 0.1
    } else if shape.len() == 1 {
        wave * 0.2 + 1.0
    } else {
        let fan_in = (n / shape[0]) as f64;
        wave * (3.0f64.sqrt() * (2.0 / fan_in).sqrt())
    };
    values.reshape(shape).to_kind(Kind::Float)
}

fn filled_encoder(arch: Arch, stem: Stem) -> (nn::VarStore, ResNet) {
    let store = nn::VarStore::new(Device::Cpu);
    let encoder = ResNet::new(&store.root(), arch, 1.0, stem);
    let mut variables: Vec<(String, Tensor)> = store.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    for (index, (name, variable)) in variables.iter_mut().enumerate() {
        let value = formula_fill(name, index, &variable.size());
        simclr::tch::no_grad(|| variable.copy_(&value));
    }
    (store, encoder)
}

#[test]
fn resnet_features_match_torchvision() {
    for (arch, arch_name) in [(Arch::Resnet18, "resnet18"), (Arch::Resnet50, "resnet50")] {
        for (stem, stem_name) in [(Stem::Imagenet, "imagenet"), (Stem::Cifar, "cifar")] {
            let reference = fixture(&format!("{arch_name}_{stem_name}.safetensors"));
            let (_store, encoder) = filled_encoder(arch, stem);
            let h = simclr::tch::no_grad(|| encoder.forward_t(&reference["x"], false));
            let error = relative_error(&h, &reference["h"]);
            assert!(error < 1e-4, "{arch_name} {stem_name}: relative error {error:e}");
            // The folded encoder that embedding and evaluation run.
            let h = simclr::tch::no_grad(|| encoder.fold().forward(&reference["x"]));
            let error = relative_error(&h, &reference["h"]);
            assert!(error < 1e-4, "{arch_name} {stem_name} folded: relative error {error:e}");
        }
    }
}

#[test]
fn batch_norm_train_step_matches_torch() {
    let reference = fixture("resnet18_cifar_train_step.safetensors");
    let (store, encoder) = filled_encoder(Arch::Resnet18, Stem::Cifar);
    let h = simclr::tch::no_grad(|| encoder.forward_t(&reference["x"], true));
    let error = relative_error(&h, &reference["h"]);
    assert!(error < 1e-4, "train-mode output: relative error {error:e}");
    let variables = store.variables();
    let mut checked = 0;
    for (name, expected) in &reference {
        if name.ends_with("running_mean") || name.ends_with("running_var") {
            let error = relative_error(&variables[name], expected);
            assert!(error < 1e-4, "{name}: relative error {error:e}");
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * 20, "every BatchNorm of ResNet-18 has two running statistics");
}

#[test]
fn nt_xent_value_and_gradient_match_torch() {
    let reference = fixture("nt_xent.safetensors");
    for suffix in ["f64", "f32"] {
        for (similarity, kind, tau) in [(Similarity::Cosine, "cosine", 0.2), (Similarity::Dot, "dot", 4.0)] {
            let z = reference[&format!("z_{suffix}")].copy().set_requires_grad(true);
            let layout = Layout::of(&z, &z, 0).unwrap();
            let loss = nt_xent(&z, &z, layout, tau, similarity).unwrap();
            loss.backward();
            let value_error = relative_error(&loss.reshape([1]), &reference[&format!("loss_{kind}_{suffix}")]);
            let grad_error = relative_error(&z.grad(), &reference[&format!("grad_{kind}_{suffix}")]);
            assert!(value_error < 1e-5, "{kind} {suffix}: loss relative error {value_error:e}");
            assert!(grad_error < 1e-5, "{kind} {suffix}: gradient relative error {grad_error:e}");
        }
    }
}

#[test]
fn the_decoupled_loss_value_and_gradient_match_torch() {
    let reference = fixture("nt_xent.safetensors");
    for suffix in ["f64", "f32"] {
        let z = reference[&format!("z_{suffix}")].copy().set_requires_grad(true);
        let loss = dcl(&z, &z, Layout::of(&z, &z, 0).unwrap(), 0.2, Similarity::Cosine).unwrap();
        loss.backward();
        let value_error = relative_error(&loss.reshape([1]), &reference[&format!("loss_dcl_{suffix}")]);
        let grad_error = relative_error(&z.grad(), &reference[&format!("grad_dcl_{suffix}")]);
        assert!(value_error < 1e-5, "{suffix}: loss relative error {value_error:e}");
        assert!(grad_error < 1e-5, "{suffix}: gradient relative error {grad_error:e}");
        // Control: NT-Xent's gradient on the same projections is another.
        let coupled = reference[&format!("grad_cosine_{suffix}")].shallow_clone();
        assert!(relative_error(&coupled, &reference[&format!("grad_dcl_{suffix}")]) > 1e-2);
    }
}

#[test]
fn optimiser_updates_match_references() {
    let reference = fixture("optimizers.safetensors");
    for (kind, name, lr) in
        [(OptimizerKind::Lars, "lars", 0.5), (OptimizerKind::Sgd, "sgd", 0.5), (OptimizerKind::Adamw, "adamw", 0.005)]
    {
        let params: Vec<(String, Tensor)> = ["weight", "bias"]
            .iter()
            .map(|p| (p.to_string(), reference[&format!("initial.{p}")].copy().set_requires_grad(true)))
            .collect();
        let config = OptimConfig {
            optimizer: kind,
            weight_decay: 1e-2,
            momentum: 0.9,
            trust_coefficient: 0.001,
            ..Default::default()
        };
        let mut optimizer =
            Optimizer::new(&config, params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
        for step in 0..2 {
            // d/dp sum(p * g) = g: the fixture's gradient, through autograd.
            let objective = params
                .iter()
                .map(|(p, t)| (t * &reference[&format!("grad{step}.{p}")]).sum(Kind::Float))
                .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
            optimizer.backward(&objective).unwrap();
            optimizer.step(lr);
            for (p, tensor) in &params {
                let expected = &reference[&format!("{name}{step}.{p}")];
                let error = relative_error(tensor, expected);
                assert!(error < 1e-6, "{name} step {step} {p}: relative error {error:e}");
            }
        }
    }
}

#[test]
fn knn_and_linear_evaluation_match_references_on_the_same_features() {
    let reference = fixture("eval.safetensors");
    let scalar = |name: &str| reference[name].double_value(&[0]);
    let (train, test) = (&reference["train"], &reference["test"]);
    let (train_labels, test_labels) = (&reference["train_labels"], &reference["test_labels"]);

    // The weighted votes of every query, against PyTorch's, relative to the
    // query's largest vote: float rounding only (fp32 sums of exp(s/T)).
    let votes = simclr::eval::knn::knn_votes(train, train_labels, test, 10, KnnConfig::default());
    let expected = &reference["knn_votes"];
    let scale = expected.amax([1i64].as_slice(), true);
    let error = ((&votes - expected).abs() / &scale).max().double_value(&[]);
    assert!(error < 1e-5, "kNN votes: relative error {error:e}");
    // So the same predictions, except where PyTorch's two best classes are
    // closer than that rounding (one query of 1,000 comes within 1e-4).
    let best_two = expected.topk(2, 1, true, true).0;
    let margin = (best_two.select(1, 0) - best_two.select(1, 1)) / best_two.select(1, 0);
    let decided = margin.gt(2e-5);
    let (predicted, reference_predicted) = (votes.argmax(1, false), expected.argmax(1, false));
    let disagree = predicted.ne_tensor(&reference_predicted).logical_and(&decided).sum(Kind::Int64).int64_value(&[]);
    assert_eq!(disagree, 0, "{disagree} kNN predictions differ from PyTorch's");
    assert!(decided.sum(Kind::Int64).int64_value(&[]) >= 999);
    let knn = knn_hits(train, train_labels, test, test_labels, 10, KnnConfig::default()).accuracy();
    assert!((knn.top1 - scalar("knn_top1")).abs() <= 0.001, "kNN top-1 {} vs {}", knn.top1, scalar("knn_top1"));
    assert!((knn.top5 - scalar("knn_top5")).abs() <= 0.001, "kNN top-5 {} vs {}", knn.top5, scalar("knn_top5"));

    // scikit-learn's L-BFGS logistic regression reaches the optimum; SGD must get as close in accuracy.
    let linear = linear_eval(train, train_labels, test, test_labels, 10, &LinearConfig::default()).unwrap();
    let expected = scalar("linear_top1");
    assert!((linear.top1 - expected).abs() <= 0.005, "linear top-1 {} vs scikit-learn's {expected}", linear.top1);
}
