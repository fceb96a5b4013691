//! SimCLR on real CIFAR-10 (the JPEG ImageFolder copy), sized for CI's two
//! cores: a 0.25x ResNet-18 trained for 4 epochs on 5,000 training images
//! must lift kNN top-1 (bank: 2,000 training images; queries: 2,000 test
//! images) clearly above the same encoder at random init, in the training
//! run's monitor and through `simclr eval knn`. (Linear evaluation at this
//! budget gained only 31.00% -> 32.15%: not asserted here; see issue 4.)
//!
//! Runs only when `SIMCLR_CIFAR10_DIR` names a folder with `train/` and
//! `test/` (`.ci/run` sets it); elsewhere it says it was skipped.
//! Measured on the project's 2-core machine: 2 min 37 s; random init
//! 26.95% -> 33.80% top-1 (τ = 0.5 gave 26.95% -> 33.30%).
use std::path::PathBuf;
use std::process::Command;

/// Points of kNN top-1 the trained encoder must gain over random init. The
/// measured gain is about twice this; 2,000 queries put one standard error
/// of each accuracy near one point.
const REQUIRED_GAIN: f64 = 0.03;

#[test]
fn short_pretraining_beats_random_init_on_cifar10() {
    let Some(root) = std::env::var_os("SIMCLR_CIFAR10_DIR").map(PathBuf::from) else {
        eprintln!("skipped: SIMCLR_CIFAR10_DIR is not set");
        return;
    };
    let (train, test) = (root.join("train"), root.join("test"));
    assert!(train.is_dir() && test.is_dir(), "{} must hold train/ and test/", root.display());
    let output = tempfile::tempdir().unwrap();
    let run = output.path().join("run");
    let quoted = |p: &PathBuf| format!("{:?}", p.display().to_string());
    let overrides = [
        "data.limit=5000".to_owned(),
        format!("data.knn_train_path={}", quoted(&train)),
        format!("data.knn_test_path={}", quoted(&test)),
        "data.knn_limit=2000".to_owned(),
        "model.arch=\"resnet18\"".to_owned(),
        "model.width_multiplier=0.25".to_owned(),
        "optim.warmup_epochs=0.5".to_owned(),
        "loss.temperature=0.2".to_owned(),
        "train.knn_k=20".to_owned(),
        "train.knn_every=4".to_owned(),
        "train.device=\"cpu\"".to_owned(),
    ];
    let mut command = Command::new(env!("CARGO_BIN_EXE_simclr"));
    command.args(["train", "--preset", "cifar10", "--epochs", "4", "--batch-size", "128", "--seed", "0"]);
    command.arg("--data").arg(&train).arg("--output").arg(&run);
    for item in &overrides {
        command.args(["--set", item]);
    }
    let result = command.output().expect("runs the binary");
    assert!(result.status.success(), "training failed:\n{}", String::from_utf8_lossy(&result.stderr));

    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let before = summary["initial_knn_top1"].as_f64().expect("random-init kNN was measured");
    let after = summary["final_knn_top1"].as_f64().expect("final kNN was measured");
    assert_gain("training monitor kNN", before, after);

    // The same comparison through `simclr eval knn`.
    let evaluate = |protocol: &str, encoder: &[&str]| -> f64 {
        let report = output.path().join(format!("{protocol}-{}.json", encoder[0].trim_start_matches('-')));
        let mut command = Command::new(env!("CARGO_BIN_EXE_simclr"));
        command.args(["eval", protocol]).args(encoder);
        command.args(["--arch", "resnet18", "--width", "0.25", "--stem", "cifar", "--image-size", "32"]);
        command.args(["--limit", "2000", "--device", "cpu"]).arg("--train").arg(&train).arg("--test").arg(&test);
        command.arg("--output").arg(&report);
        command.args(["--k", "20"]);
        let result = command.output().expect("runs the binary");
        assert!(result.status.success(), "eval failed:\n{}", String::from_utf8_lossy(&result.stderr));
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
        report["top1"].as_f64().unwrap()
    };
    // The checkpoint's config carries the CIFAR-10 normalisation; --weights
    // with the flags above uses ImageNet's, the same for both encoders.
    let encoder = run.join("encoder.safetensors");
    let encoder = encoder.to_str().unwrap();
    let random = evaluate("knn", &["--random-init"]);
    let trained = evaluate("knn", &["--weights", encoder]);
    assert_gain("simclr eval knn", random, trained);
}

fn assert_gain(what: &str, before: f64, after: f64) {
    eprintln!("{what}: random init {:.2}% -> trained {:.2}%", 100.0 * before, 100.0 * after);
    assert!(
        after >= before + REQUIRED_GAIN,
        "{what}: top-1 {:.2}% after training is not {:.0} points above random init's {:.2}%",
        100.0 * after,
        100.0 * REQUIRED_GAIN,
        100.0 * before
    );
}

#[test]
fn augment_preview_shows_cifar10_test_pairs() {
    let Some(root) = std::env::var_os("SIMCLR_CIFAR10_DIR").map(PathBuf::from) else {
        eprintln!("skipped: SIMCLR_CIFAR10_DIR is not set");
        return;
    };
    let output = tempfile::tempdir().unwrap();
    let png = output.path().join("preview.png");
    let result = Command::new(env!("CARGO_BIN_EXE_simclr"))
        .args(["augment-preview", "--preset", "cifar10", "--images", "6", "--pairs", "4", "--data"])
        .arg(root.join("test"))
        .arg("--output")
        .arg(&png)
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    // 6 rows; each row the original and 4 pairs of 32 px views shown at 3x.
    let sheet = image::open(&png).unwrap().to_rgb8();
    assert_eq!(sheet.dimensions(), (4 + 96 + 14 + 4 * (2 * 96 + 4 + 14), 4 + 6 * (96 + 4)));
    // Real photographs, not blank cells: the views' pixels vary.
    let first_view = image::imageops::crop_imm(&sheet, 4 + 96 + 14, 4, 96, 96).to_image();
    let values: Vec<u8> = first_view.pixels().map(|p| p[1]).collect();
    assert!(values.iter().max().unwrap() - values.iter().min().unwrap() > 30);
}
