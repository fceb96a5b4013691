//! `FinishedRun::initial` against the network a run's training started
//! from. Both come from torch's global generator seeded with the run's
//! seed, which any test in the same process could draw from at the same
//! time; this test is alone in its binary so that none does.
use simclr::config::RunConfig;
use simclr::device::DeviceChoice;
use simclr::model::Stem;
use simclr::train::FinishedRun;
use tch::Tensor;

/// The weights training starts from are not saved; at a rate of 1e-30
/// a step moves no weight by more than about 1e-30 (a weight at zero, a
/// BatchNorm shift, does move by that), so the finished run's trainable
/// variables are its initial network's to 1e-20, where another seed's
/// weights differ by far more.
#[test]
fn a_finished_run_rebuilds_the_network_its_training_started_from() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = RunConfig::default();
    (config.data.synthetic_images, config.data.synthetic_classes, config.data.image_size) = (16, 2, 16);
    (config.model.width_multiplier, config.model.stem) = (0.125, Stem::Cifar);
    config.optim.learning_rate = Some(1e-30);
    (config.train.batch_size, config.train.epochs, config.train.knn_k) = (8, 1, 3);
    config.train.device = DeviceChoice::Cpu;
    config.train.output_dir = dir.path().to_path_buf();
    simclr::train::train(config.validate().unwrap(), false, &mut ()).unwrap();
    let run = FinishedRun::open(dir.path()).unwrap();
    let (store, _) = run.initial().unwrap();
    let trainable: Vec<(String, Tensor)> =
        store.variables().into_iter().filter(|(_, tensor)| tensor.requires_grad()).collect();
    assert!(trainable.iter().any(|(name, _)| name.starts_with("projection_head.")), "the head too");
    let difference = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    for (name, initial) in &trainable {
        let moved = difference(&run.variable(name).unwrap(), initial);
        assert!(moved < 1e-20, "{name}: {moved}");
    }
    // Negative control: the network of the next seed is another.
    tch::manual_seed(run.config.train.seed as i64 + 1);
    let store = tch::nn::VarStore::new(tch::Device::Cpu);
    let _model = simclr::model::SimClr::new(&store.root(), &run.config.model);
    for name in ["encoder.conv1.weight", "projection_head.layers.0.weight"] {
        let moved = difference(&store.variables()[name], &run.variable(name).unwrap());
        assert!(moved > 1e-3, "{name}: {moved}");
    }
}
