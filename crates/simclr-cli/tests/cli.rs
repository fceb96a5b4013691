//! Drives the real `simclr` binary on small generated fixtures: a whole
//! train -> resume -> embed round, and every kind of bad input, each of
//! which must give one clear error naming the file or value, a non-zero
//! exit, and leave an earlier checkpoint as it was.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

use image::{Rgb, RgbImage};

/// One invocation of the `simclr` binary, built up argument by argument:
/// every test launches the binary through it.
#[derive(Debug, Clone)]
struct Simclr {
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    /// `ulimit` settings applied first (the run goes through bash).
    limits: Option<String>,
}

/// `simclr` with these first arguments (a subcommand's words, usually).
fn simclr<S: AsRef<str>>(args: impl IntoIterator<Item = S>) -> Simclr {
    Simclr { args: Vec::new(), env: vec![("RUST_LOG", "warn".to_owned())], limits: None }.args(args)
}

impl Simclr {
    fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    fn env(mut self, name: &'static str, value: impl ToString) -> Self {
        self.env.retain(|(n, _)| *n != name);
        self.env.push((name, value.to_string()));
        self
    }

    fn limits(mut self, limits: &str) -> Self {
        self.limits = Some(limits.to_owned());
        self
    }

    fn command(&self) -> Command {
        let binary = env!("CARGO_BIN_EXE_simclr");
        let mut command = match &self.limits {
            None => Command::new(binary),
            Some(limits) => {
                let quoted: Vec<String> = self.args.iter().map(|a| format!("'{}'", a.replace('\'', r"'\''"))).collect();
                // SIGXFSZ ignored, so an over-limit write fails with EFBIG as a full disk would.
                let script = format!("trap '' XFSZ; {limits}; exec '{binary}' {}", quoted.join(" "));
                let mut bash = Command::new("bash");
                bash.args(["-c", &script]);
                bash
            }
        };
        if self.limits.is_none() {
            command.args(&self.args);
        }
        command.envs(self.env.iter().map(|(name, value)| (name, value)));
        command
    }

    fn run(&self) -> Output {
        self.command().output().expect("runs the binary")
    }

    /// Starts the run with its output sent as `configure` says.
    fn spawn(&self, configure: impl FnOnce(&mut Command)) -> Child {
        let mut command = self.command();
        configure(&mut command);
        command.spawn().expect("starts the binary")
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Fails with the command's output unless it failed and its error says each of `needles`.
fn assert_fails_with(output: &Output, needles: &[&str]) {
    let message = stderr(output);
    assert!(!output.status.success(), "expected failure, got success:\n{message}");
    for needle in needles {
        assert!(message.contains(needle), "error should mention '{needle}':\n{message}");
    }
    assert!(!message.contains("panicked"), "a panic is not a clear error:\n{message}");
}

/// Fails unless the 2 processes of `output`'s launcher failed, and its
/// error lines, each process's and the launcher's, all name `cause`, the
/// launcher's the rank that failed (not whichever ended first).
fn assert_every_process_names(output: &Output, cause: &str) {
    let printed = stderr(output);
    let errors: Vec<&str> = printed.lines().filter(|line| line.starts_with("error:")).collect();
    let named = errors.iter().all(|line| line.contains(cause));
    assert!(!output.status.success() && errors.len() == 3 && named, "{printed}");
    let launcher = errors[2];
    let ranks = ["rank 0 of 2 failed: image ", "rank 1 of 2 failed: image "];
    assert!(ranks.iter().any(|said| launcher.contains(said)), "{printed}");
}

fn assert_succeeds(output: &Output) {
    assert!(output.status.success(), "command failed:\n{}", stderr(output));
}

/// An ImageFolder of `per_class` images in each of two visibly different classes.
fn image_folder(root: &Path, per_class: usize, size: u32) {
    for (class, name) in ["bars", "blocks"].iter().enumerate() {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let image = RgbImage::from_fn(size, size, |x, y| {
                let on = if class == 0 { (x / 2) % 2 == 0 } else { (x / 4 + y / 4) % 2 == 0 };
                let shade = (i * 20 % 120) as u8;
                if on {
                    Rgb([200 - shade, 180, 60 + shade])
                } else {
                    Rgb([20 + shade, 40, 90])
                }
            });
            image.save(dir.join(format!("{i:03}.png"))).unwrap();
        }
    }
}

/// A training run that takes a second or two on the CPU, without the kNN monitor.
fn tiny_training(data: &Path, output: &Path) -> Simclr {
    simclr(["train"]).args(tiny_flags(data, output))
}

/// The flags of [`tiny_training`] after its subcommand.
fn tiny_flags(data: &Path, output: &Path) -> Vec<String> {
    let (data, output) = (data.display().to_string(), output.display().to_string());
    let flags = ["--data", &data, "--output", &output, "--epochs", "1", "--batch-size", "4", "--device", "cpu"];
    let settings = [
        "data.image_size=16",
        "model.arch=resnet18",
        "model.stem=cifar",
        "model.width_multiplier=0.125",
        "optim.warmup_epochs=0",
        "train.knn_k=3",
        "train.knn_every=1",
        // Every step's loss in the events and every epoch's encoder, which
        // `assert_same_run` compares.
        "train.log_every_steps=1",
        "train.encoder_every=1",
    ];
    let mut all: Vec<String> = flags.map(String::from).to_vec();
    all.extend(settings.iter().flat_map(|s| ["--set".to_owned(), s.to_string()]));
    all
}

/// The kNN monitor on `data` itself.
fn monitor_flags(data: &Path) -> Vec<String> {
    let data = data.display().to_string();
    ["--set", &format!("data.knn_train_path={data:?}"), "--set", &format!("data.knn_test_path={data:?}")]
        .map(String::from)
        .to_vec()
}

/// [`tiny_training`] with the kNN monitor.
fn tiny_run(data: &Path, output: &Path) -> Simclr {
    tiny_training(data, output).args(monitor_flags(data))
}

/// The study `args` of tiny runs on `data` into `output`, each scored by
/// the kNN monitor on `data` itself, logging its progress.
fn tiny_study<S: AsRef<str>>(args: impl IntoIterator<Item = S>, data: &Path, output: &Path) -> Simclr {
    simclr(args).args(tiny_flags(data, output)).args(monitor_flags(data)).env("RUST_LOG", "info")
}

/// `--weights` and the flags of the tiny runs' encoder (CIFAR stem, on the CPU).
fn encoder_flags(weights: &Path, arch: &str, width: &str) -> Vec<String> {
    let weights = weights.display().to_string();
    ["--weights", &weights, "--arch", arch, "--width", width, "--stem", "cifar", "--device", "cpu"]
        .map(String::from)
        .to_vec()
}

/// The shape in a .npy file's header.
fn npy_shape(path: &Path) -> Vec<usize> {
    let bytes = std::fs::read(path).unwrap();
    let header = String::from_utf8_lossy(&bytes[10..bytes.len().min(128)]).into_owned();
    let start = header.find("'shape': (").expect("npy header has a shape") + 10;
    let shape = &header[start..start + header[start..].find(')').unwrap()];
    shape.split(',').map(str::trim).filter(|d| !d.is_empty()).map(|d| d.parse().unwrap()).collect()
}

/// A run's `summary.json`.
fn run_summary(run: &Path) -> serde_json::Value {
    let path = run.join("summary.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The README's first command, as shipped: the demo preset learns its
/// shapes. Measured with its seed: kNN 49% at random init -> 91.75-95.75%
/// (fp32, bf16, 1 or 2 threads; 89.5-95.75% over 8 seeds). The bar is
/// far below that, so neither hardware nor summation order fails it, and
/// above what the former recipe (LARS, the paper's crops of 0.08) reached
/// with this seed, 53.75-64.25%: a demo that stops learning fails it.
#[test]
fn demo_preset_learns_its_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let output = simclr(["train", "--preset", "demo", "--device", "cpu", "--output", &out.display().to_string()]).run();
    assert_succeeds(&output);
    let summary = run_summary(&out);
    assert_eq!(summary["epochs"], 15, "{summary}");
    let before = summary["initial_knn_top1"].as_f64().expect("random-init kNN was measured");
    let after = summary["final_knn_top1"].as_f64().expect("final kNN was measured");
    assert!(after >= 0.8 && after - before >= 0.25, "the demo's kNN went from {before} at random init to {after}");
}

#[test]
fn train_resume_and_embed_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("run");
    image_folder(&data, 6, 16);

    assert_succeeds(&tiny_run(&data, &out).run());
    let files = ["checkpoint.safetensors", "encoder.safetensors", "metrics.jsonl", "metrics.tfevents", "config.toml"];
    for file in files.iter().chain(&["summary.json"]) {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let summary = run_summary(&out);
    assert_eq!(summary["epochs"], 1);
    assert!(summary["final_knn_top1"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)));

    // A second fresh run must not overwrite the first.
    assert_fails_with(&tiny_run(&data, &out).run(), &["--resume", "checkpoint.safetensors"]);
    // The run folder is checked before the data is read: with no data at
    // all, a run already there, or a file where the folder goes, is what
    // the error names.
    let no_data = dir.path().join("no-data");
    assert_fails_with(&tiny_run(&no_data, &out).run(), &["--resume", "checkpoint.safetensors"]);
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    assert_fails_with(&tiny_run(&no_data, &file).run(), &["a-file", "a file, where a folder is needed"]);
    // A resume where no run was: the folder named, and what to do.
    let empty = dir.path().join("no-run").display().to_string();
    assert_fails_with(
        &simclr(["train", "--resume", "--output", &empty]).run(),
        &[&format!("checkpoint {empty}: nothing to resume"), "leave out --resume"],
    );

    // Another optimiser cannot continue the saved one's state: refused, the
    // checkpoint untouched.
    let out_arg = out.display().to_string();
    let saved = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    let other = simclr(["train", "--resume", "--output", &out_arg, "--epochs", "2"])
        .args(["--set", "optim.optimizer=\"adamw\"", "--set", "optim.learning_rate=0.001"])
        .run();
    assert_fails_with(&other, &["trained with optim.optimizer = \"lars\"", "resume with \"lars\""]);
    assert_eq!(std::fs::read(out.join("checkpoint.safetensors")).unwrap(), saved);

    // Resuming continues from epoch 1 to epoch 2, with the saved config.
    let resumed = simclr(["train", "--resume", "--output", &out_arg, "--epochs", "2"]).env("RUST_LOG", "info").run();
    assert_succeeds(&resumed);
    assert!(!stderr(&resumed).contains("the run was trained on"), "the same images: nothing to say");
    // Logged to a pipe, as to a file or a SLURM job's output: no colour codes.
    assert!(stderr(&resumed).contains("INFO") && !stderr(&resumed).contains('\x1b'), "{:?}", stderr(&resumed));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let epochs: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, vec![1, 2]);
    // A finished run resumed as it is has nothing to train, and says so.
    let again = simclr(["train", "--resume", "--output", &out_arg]).run();
    assert_succeeds(&again);
    assert!(stderr(&again).contains("the run has trained 2 epochs and train.epochs = 2: nothing to train"));

    // Evaluation through the run's checkpoint (architecture from its config)
    // and through the exported weights, kNN and linear, with a JSON report.
    let data_arg = data.display().to_string();
    let report_path = dir.path().join("knn.json");
    let checkpoint = out.join("checkpoint.safetensors").display().to_string();
    let knn = simclr([
        "eval",
        "knn",
        "--k",
        "3",
        "--checkpoint",
        &checkpoint,
        "--train",
        &data_arg,
        "--test",
        &data_arg,
        "--device",
        "cpu",
        "--output",
        &report_path.display().to_string(),
    ])
    .run();
    assert_succeeds(&knn);
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!((report["protocol"].as_str(), report["test_images"].as_u64()), (Some("knn"), Some(12)));
    assert!(report["top1"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)));
    let encoder = out.join("encoder.safetensors").display().to_string();
    for source in [["--weights", encoder.as_str()], ["--random-init", "--seed=3"]] {
        let linear = simclr([
            "eval",
            "linear",
            "--epochs",
            "5",
            source[0],
            source[1],
            "--arch",
            "resnet18",
            "--width",
            "0.125",
            "--stem",
            "cifar",
            "--image-size",
            "16",
            "--train",
            &data_arg,
            "--test",
            &data_arg,
            "--device",
            "cpu",
        ])
        .run();
        assert_succeeds(&linear);
        assert!(String::from_utf8_lossy(&linear.stdout).contains("top-1"));
    }

    // Fine-tuning on half the labels: 3 of each class's 6, listed in the subset file.
    let subset = dir.path().join("subset.txt");
    let finetune = simclr([
        "eval",
        "finetune",
        "--fraction",
        "0.5",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--checkpoint",
        &checkpoint,
        "--train",
        &data_arg,
        "--test",
        &data_arg,
        "--device",
        "cpu",
        "--subset-file",
        &subset.display().to_string(),
    ])
    .run();
    assert_succeeds(&finetune);
    let said = String::from_utf8_lossy(&finetune.stdout);
    assert!(said.contains("6 labelled of 12"), "{said}");
    // Trained in bf16 where pretraining would be.
    assert_eq!(said.starts_with("finetune in bf16 |"), simclr::device::cpu_computes_bf16(), "{said}");
    let chosen = std::fs::read_to_string(&subset).unwrap();
    for class in ["bars", "blocks"] {
        assert_eq!(chosen.lines().filter(|l| l.contains(&format!("/{class}/"))).count(), 3, "{chosen}");
    }
    // kNN and linear on half the labels: the images fine-tuning labelled with
    // the same seed (another seed draws others: the control), kNN's bank
    // of those 6 alone.
    let low_shot = |protocol: &str, seed: &str, extra: &[&str]| {
        let listing = dir.path().join(format!("{protocol}-{seed}.txt"));
        let output = simclr(["eval", protocol, "--fraction", "0.5", "--seed", seed, "--checkpoint", &checkpoint])
            .args(["--train", &data_arg, "--test", &data_arg, "--device", "cpu"])
            .args(["--subset-file", listing.to_str().unwrap()])
            .args(extra)
            .run();
        assert_succeeds(&output);
        let said = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(said.contains(&format!("{protocol} | ")) && said.contains("6 labelled of 12"), "{said}");
        (std::fs::read_to_string(listing).unwrap(), stderr(&output))
    };
    let (listed, warned) = low_shot("knn", "0", &["--k", "8"]);
    assert_eq!(listed, chosen);
    assert!(warned.contains("--k 8 is more than the 6 training images"), "{warned}");
    assert_eq!(low_shot("linear", "0", &["--epochs", "2"]).0, chosen);
    let other = low_shot("knn", "1", &["--k", "3"]).0;
    assert_ne!(other, chosen, "another seed, the same images");
    // The images listed, whatever the seed: by path (what --subset-file
    // wrote) or by path under --train (the paper's lists give file names).
    let under: String =
        other.lines().map(|line| line.strip_prefix(&format!("{data_arg}/")).unwrap()).collect::<Vec<_>>().join("\n");
    let (by_path, by_name) = (dir.path().join("other.txt"), dir.path().join("under.txt"));
    std::fs::write(&by_path, &other).unwrap();
    std::fs::write(&by_name, format!("# seed 1's\n{under}\n")).unwrap();
    for (protocol, list) in [("knn", &by_path), ("finetune", &by_name)] {
        let listing = dir.path().join(format!("{protocol}-listed.txt"));
        let output =
            simclr(["eval", protocol, "--labelled-images", list.to_str().unwrap(), "--checkpoint", &checkpoint])
                .args(["--train", &data_arg, "--test", &data_arg, "--device", "cpu"])
                .args(["--subset-file", listing.to_str().unwrap()])
                .args(if protocol == "knn" { &["--k", "3"][..] } else { &["--epochs", "1", "--batch-size", "4"] })
                .run();
        assert_succeeds(&output);
        assert!(String::from_utf8_lossy(&output.stdout).contains("6 labelled of 12"), "{protocol}");
        assert_eq!(std::fs::read_to_string(listing).unwrap(), other, "{protocol}");
    }
    std::fs::write(&by_name, "bars/nope.png\n").unwrap();
    let listed = |extra: &[&str]| {
        simclr(["eval", "knn", "--labelled-images", by_name.to_str().unwrap(), "--checkpoint", &checkpoint])
            .args(["--train", &data_arg, "--test", &data_arg, "--device", "cpu"])
            .args(extra)
            .run()
    };
    assert_fails_with(
        &listed(&[]),
        &["under.txt: 1 of its 1 entries name no image of the 12 images", "'bars/nope.png'"],
    );
    assert_fails_with(&listed(&["--fraction", "0.5"]), &["'--labelled-images <LIST>' cannot be used with '--fraction"]);

    // The run's figures, drawn into its folder.
    let report = simclr(["report", &out.display().to_string()]).run();
    assert_succeeds(&report);
    for figure in ["curves.png", "embedding.png", "tsne.png", "confusion.png"] {
        let (width, height) = image::image_dimensions(out.join(figure)).unwrap();
        assert!(width >= 800 && height >= 400, "{figure}: {width}x{height}");
    }

    let features = dir.path().join("features.npy");
    let embed = simclr(["embed"])
        .args(encoder_flags(&out.join("encoder.safetensors"), "resnet18", "0.125"))
        .args(["--input", &data_arg, "--output", &features.display().to_string(), "--image-size", "16"])
        .run();
    assert_succeeds(&embed);
    // 12 images, h of 512 x 0.125 = 64 features.
    assert_eq!(npy_shape(&features), vec![12, 64]);
    let paths = std::fs::read_to_string(dir.path().join("features.paths.txt")).unwrap();
    let listed: Vec<&str> = paths.lines().collect();
    assert_eq!(listed.len(), 12);
    assert!(listed.windows(2).all(|w| w[0] < w[1]), "paths are sorted");
    assert!(listed[0].ends_with("bars/000.png"));
    // In bf16 where this CPU computes it (eval::features tests the values).
    let bf16 = dir.path().join("bf16.npy");
    let embed = simclr(["embed", "--precision", "bf16"])
        .args(encoder_flags(&out.join("encoder.safetensors"), "resnet18", "0.125"))
        .args(["--input", &data_arg, "--output", &bf16.display().to_string(), "--image-size", "16"])
        .run();
    assert_succeeds(&embed);
    assert_eq!(npy_shape(&bf16), vec![12, 64]);
    let said = String::from_utf8_lossy(&embed.stdout);
    assert_eq!(said.trim_end().ends_with("images/s in bf16"), simclr::device::cpu_computes_bf16(), "{said}");

    // An image added since: the resume goes on, saying what no longer matches.
    std::fs::copy(data.join("bars/000.png"), data.join("bars/added.png")).unwrap();
    let grown = simclr(["train", "--resume", "--output", &out_arg, "--epochs", "3"]).run();
    assert_succeeds(&grown);
    assert!(stderr(&grown).contains("the run was trained on 12 images and its training set now has 13"));
    assert!(!stderr(&grown).contains("the run was trained in"), "the same precision: nothing to say");
    // In another precision (on a CPU with bf16 instructions, where the run
    // trained in bf16; fp32 throughout elsewhere, with nothing to say).
    let fp32 = simclr(["train", "--resume", "--output", &out_arg, "--epochs", "4"])
        .args(["--set", "train.mixed_precision=false"])
        .run();
    assert_succeeds(&fp32);
    let told =
        stderr(&fp32).contains("the run was trained in bf16 and resumes in fp32 (train.mixed_precision = false)");
    assert_eq!(told, simclr::device::cpu_computes_bf16(), "{}", stderr(&fp32));
}

#[test]
fn the_encoder_of_every_nth_epoch_is_kept_and_read_as_the_final_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("run");
    image_folder(&data, 6, 16);
    let four_epochs = ["--epochs", "4", "--set", "train.encoder_every=2", "--set", "train.checkpoint_every=1"];
    assert_succeeds(&tiny_run(&data, &out).args(four_epochs).run());
    let kept = |epoch: usize| out.join("encoders").join(format!("epoch-{epoch:04}.safetensors"));
    let present: Vec<bool> = (1..=4).map(|epoch| kept(epoch).is_file()).collect();
    assert_eq!(present, [false, true, false, true], "every second epoch's encoder");
    // The last is the run's encoder; epoch 2's is not (the control of the
    // comparison).
    assert!(same_tensors(&kept(4), &out.join("encoder.safetensors")));
    assert!(!same_tensors(&kept(2), &out.join("encoder.safetensors")));
    // eval reads one as it reads encoder.safetensors: no flags about the
    // network; given their folder, it scores each, in the order of their
    // epochs, as it scores each alone.
    let data_arg = data.display().to_string();
    let knn = |weights: &Path, name: &str| {
        let json = dir.path().join(name);
        let output = simclr(["eval", "knn", "--k", "3", "--train", &data_arg, "--test", &data_arg, "--device", "cpu"])
            .args(["--weights", &weights.display().to_string(), "--output", &json.display().to_string()])
            .run();
        assert_succeeds(&output);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        (text, serde_json::from_slice::<serde_json::Value>(&std::fs::read(&json).unwrap()).unwrap())
    };
    let (_, second) = knn(&kept(2), "second.json");
    let (_, last) = knn(&out.join("encoder.safetensors"), "last.json");
    let (lines, curve) = knn(&out.join("encoders"), "curve.json");
    let curve = curve.as_array().expect("a score for each encoder");
    let epochs: Vec<_> = curve.iter().map(|score| score["epoch"].as_u64()).collect();
    assert_eq!(epochs, [Some(2), Some(4)]);
    for (score, (alone, file)) in curve.iter().zip([(&second, "epoch-0002"), (&last, "epoch-0004")]) {
        assert!(score["encoder"].as_str().unwrap().ends_with(&format!("{file}.safetensors")), "{score}");
        assert_eq!((&score["top1"], &score["top5"]), (&alone["top1"], &alone["top5"]), "{file}");
    }
    assert_eq!(lines.lines().filter(|line| line.starts_with("knn |")).count(), 2, "{lines}");
    assert!(lines.contains("\nbest: "), "{lines}");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let none = simclr(["eval", "knn", "--train", &data_arg, "--test", &data_arg, "--device", "cpu", "--weights"])
        .args([empty.display().to_string()])
        .run();
    assert!(!none.status.success() && stderr(&none).contains("holds no .safetensors files"), "{}", stderr(&none));

    // Resumed from epoch 3's checkpoint, the run writes epoch 4's encoder
    // again, the same tensors bit for bit, and removes one left from a run
    // that went further.
    let (second, fourth) = (dir.path().join("second.safetensors"), dir.path().join("fourth.safetensors"));
    std::fs::copy(kept(2), &second).unwrap();
    std::fs::copy(kept(4), &fourth).unwrap();
    std::fs::copy(out.join("checkpoint.prev.safetensors"), out.join("checkpoint.safetensors")).unwrap();
    std::fs::write(kept(4), b"damaged").unwrap();
    std::fs::write(kept(6), b"from a longer run").unwrap();
    let resumed = simclr(["train", "--resume", "--output", &out.display().to_string()]).env("RUST_LOG", "info").run();
    assert_succeeds(&resumed);
    assert!(stderr(&resumed).contains("epoch=3"), "{}", stderr(&resumed));
    assert!(std::fs::read(kept(2)).unwrap() == std::fs::read(&second).unwrap(), "epoch 2's encoder was touched");
    assert_same_tensors(&kept(4), &fourth, "a resume");
    assert!(!kept(6).exists());
}
#[test]
fn trains_on_cifar_binary_batches() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cifar");
    std::fs::create_dir_all(&data).unwrap();
    let records: Vec<u8> = (0..8u8)
        .flat_map(|i| std::iter::once(i % 2).chain((0..3072).map(move |p| ((p as u32 * (i as u32 + 3)) % 251) as u8)))
        .collect();
    std::fs::write(data.join("data_batch_1.bin"), records).unwrap();
    // No kNN monitor: CIFAR batches of two classes are the training data alone.
    let output = tiny_training(&data, &dir.path().join("run")).args(["--set", "data.image_size=32"]).run();
    assert_succeeds(&output);
}

/// A run of one epoch in `dir`: its image folder and its run folder.
fn trained_run(dir: &Path) -> (PathBuf, PathBuf) {
    let data = dir.join("data");
    let out = dir.join("run");
    image_folder(&data, 4, 16);
    assert_succeeds(&tiny_run(&data, &out).run());
    (data, out)
}

#[test]
fn a_runs_encoder_is_used_with_no_other_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = trained_run(dir.path());
    let weights = out.join("encoder.safetensors");
    let embed = |weights: &Path, name: &str| {
        let output = dir.path().join(name);
        let (weights, input) = (weights.display().to_string(), data.display().to_string());
        (simclr(["embed", "--weights", &weights, "--input", &input, "--output", &output.display().to_string()]), output)
    };
    // The file alone: it records resnet18 at 0.125x, the CIFAR stem, 16 px
    // and the run's normalisation.
    let (bare, bare_npy) = embed(&weights, "bare.npy");
    assert_succeeds(&bare.run());
    // The same features as with every flag spelled out.
    let (flagged, flagged_npy) = embed(&weights, "flagged.npy");
    assert_succeeds(
        &flagged.args(["--arch", "resnet18", "--width", "0.125", "--stem", "cifar", "--image-size", "16"]).run(),
    );
    assert_eq!(std::fs::read(&bare_npy).unwrap(), std::fs::read(&flagged_npy).unwrap());
    // Flags override the record; weights that cannot be that model say what the file records.
    let (wider, _) = embed(&weights, "wider.npy");
    assert_fails_with(
        &wider.args(["--width", "0.25"]).run(),
        &["encoder.safetensors", "the model expects", "the file records resnet18 at 0.125x with the cifar stem"],
    );
    // The run's checkpoint (the same encoder) is described by the
    // configuration it holds, flags or not...
    let checkpoint = out.join("checkpoint.safetensors");
    for (flags, name) in [(&["--arch", "resnet18", "--width", "0.125"][..], "described.npy"), (&[], "own.npy")] {
        let (described, described_npy) = embed(&checkpoint, name);
        assert_succeeds(&described.args(flags).run());
        assert_eq!(std::fs::read(&bare_npy).unwrap(), std::fs::read(&described_npy).unwrap());
    }
    // ...while flags that contradict it are named with the weights.
    let (contradicted, _) = embed(&checkpoint, "contradicted.npy");
    let output = contradicted.args(["--arch", "resnet34"]).run();
    assert_fails_with(&output, &["checkpoint.safetensors", "is --arch/--width/--stem that of the weights?"]);
    // The run's folder stands for its checkpoint, for embed, export and
    // eval (one score, where a folder of weights gets one per file: here
    // two, the control); a run folder without weights is named.
    let (folder, folder_npy) = embed(&out, "folder.npy");
    assert_succeeds(&folder.run());
    assert_eq!(std::fs::read(&bare_npy).unwrap(), std::fs::read(&folder_npy).unwrap());
    let module = dir.path().join("encoder.pt");
    assert_succeeds(
        &simclr(["export", "--weights", out.to_str().unwrap(), "--output", module.to_str().unwrap()]).run(),
    );
    let data_arg = data.display().to_string();
    let splits = ["--train", data_arg.as_str(), "--test", data_arg.as_str()];
    let weights_folder = dir.path().join("weights");
    std::fs::create_dir(&weights_folder).unwrap();
    for file in ["checkpoint.safetensors", "encoder.safetensors"] {
        std::fs::copy(out.join(file), weights_folder.join(file)).unwrap();
    }
    for (flag, folder, scores) in [("--weights", &out, 1), ("--checkpoint", &out, 1), ("--weights", &weights_folder, 2)]
    {
        let knn = simclr(["eval", "knn", "--k", "3", flag, folder.to_str().unwrap()]).args(splits).run();
        assert_succeeds(&knn);
        let stdout = String::from_utf8_lossy(&knn.stdout).into_owned();
        assert_eq!(stdout.matches("top-1").count(), scores + usize::from(scores > 1), "{flag} {folder:?}: {stdout}");
        assert_eq!(scores == 1, stdout.contains("run/checkpoint.safetensors"), "{stdout}");
    }
    let unfinished = dir.path().join("unfinished");
    std::fs::create_dir(&unfinished).unwrap();
    std::fs::copy(out.join("config.toml"), unfinished.join("config.toml")).unwrap();
    let (empty, _) = embed(&unfinished, "unfinished.npy");
    assert_fails_with(&empty.run(), &["unfinished: a run folder with neither checkpoint.safetensors nor encoder"]);
    // eval and neighbors read the record too.
    let knn = simclr(["eval", "knn", "--k", "3", "--weights", &weights.display().to_string()]).args(splits).run();
    assert_succeeds(&knn);
    // The same folder as both splits scores seen images, and is said to;
    // a folder of other images is not.
    assert!(stderr(&knn).contains("--train and --test are both"), "{}", stderr(&knn));
    let held_out = dir.path().join("held-out");
    image_folder(&held_out, 2, 16);
    let splits = ["--train", data_arg.as_str(), "--test", held_out.to_str().unwrap()];
    let knn = simclr(["eval", "knn", "--k", "50", "--weights", &weights.display().to_string()]).args(splits).run();
    assert_succeeds(&knn);
    assert!(!stderr(&knn).contains("--train and --test are both"), "{}", stderr(&knn));
    // More neighbours than training images: all of them vote, and it is said.
    assert!(stderr(&knn).contains("--k 50 is more than the 8 training images"), "{}", stderr(&knn));
}

#[test]
fn bad_images_are_named_and_leave_the_checkpoint_intact() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (dir.path().join("data"), dir.path().join("run"));
    image_folder(&data, 4, 16);
    assert_succeeds(&tiny_run(&data, &out).args(["--set", "train.batch_size=3"]).run());
    let checkpoint = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    let out_arg = out.display().to_string();
    // A resume continues the run's network and batch size: another is
    // refused by name, the checkpoint untouched.
    let changed = simclr(["train", "--resume", "--output", &out_arg, "--epochs", "2", "--batch-size", "4"])
        .args(["--set", "model.width_multiplier=0.25"])
        .run();
    assert_fails_with(&changed, &["model.width_multiplier = 0.25 (before: 0.125)", "train.batch_size = 4 (before: 3)"]);
    assert_eq!(std::fs::read(out.join("checkpoint.safetensors")).unwrap(), checkpoint);
    // 8 good images and 1 bad in batches of 3: no batch is dropped, so the
    // bad image is always read.
    let resume = ["train", "--resume", "--output", &out_arg, "--epochs", "2"];

    let mut png = Vec::new();
    RgbImage::new(16, 16).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Jpeg).unwrap();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("truncated.jpg", png[..png.len() / 2].to_vec(), "cannot decode"),
        ("notes.jpg", b"these are notes, not pixels".to_vec(), "not an image"),
        (
            "tiny.png",
            {
                let mut bytes = Vec::new();
                RgbImage::new(1, 1).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
                bytes
            },
            "1x1",
        ),
    ];
    for (name, bytes, expected) in cases {
        let path = data.join("bars").join(name);
        std::fs::write(&path, bytes).unwrap();
        assert_fails_with(&simclr(resume).run(), &[name, expected]);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            std::fs::read(out.join("checkpoint.safetensors")).unwrap(),
            checkpoint,
            "{name}: checkpoint changed"
        );
    }
}

#[test]
fn bad_values_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 4, 16);
    let base = tiny_run(&data, &dir.path().join("run"));
    let cases: [(&[&str], &[&str]); 5] = [
        (&["--set", "train.batch_size=1"], &["train.batch_size = 1", "negatives"]),
        (&["--set", "loss.temperature=0"], &["loss.temperature = 0"]),
        (&["--set", "loss.temperature=-0.5"], &["loss.temperature = -0.5"]),
        (&["--set", "model.arch=resnet19"], &["unknown architecture 'resnet19'", "resnet18, resnet34"]),
        (&["--set", "augment.preset=simclr-tiny"], &["unknown augmentation preset 'simclr-tiny'", "simclr-cifar"]),
    ];
    for (extra, needles) in cases {
        assert_fails_with(&base.clone().args(extra).run(), needles);
    }
    assert!(!dir.path().join("run").exists(), "a rejected config must not create the run folder");

    // A run folder among the images it reads: its figures would be read as
    // images of a class, or as a class of their own.
    for (inside, class) in [("bars/run", "(as images of class 'bars')"), ("runs/a", "(as a class 'runs')")] {
        let output = data.join(inside);
        assert_fails_with(&tiny_run(&data, &output).run(), &["is inside data.path", "put the run outside it", class]);
        assert!(!output.exists(), "a refused run must not make its folder");
    }
    // By another spelling of the path; and inside the kNN monitor's images.
    let spelled = data.join("bars/../runs/a");
    assert_fails_with(&tiny_run(&data, &spelled).run(), &["is inside data.path"]);
    let other = dir.path().join("other");
    image_folder(&other, 4, 16);
    let monitored = tiny_training(&other, &data.join("runs/b")).args(monitor_flags(&data));
    assert_fails_with(&monitored.run(), &["is inside data.knn_train_path"]);
    // Control: a folder whose name only begins as the data's does is beside it.
    assert_succeeds(&tiny_run(&data, &dir.path().join("data-run")).run());

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_fails_with(&tiny_run(&empty, &dir.path().join("run2")).run(), &["empty", "no images found"]);
    assert_fails_with(
        &simclr(["bench", "--arch", "resnet19", "--device", "cpu"]).run(),
        &["unknown architecture 'resnet19'"],
    );
    assert_fails_with(
        &simclr(["bench", "--optimizer", "adam", "--device", "cpu"]).run(),
        &["unknown optimizer 'adam'", "lars, sgd, adamw"],
    );
    // report given the images, or a folder that is not there, in place of a run's.
    let report = |folder: &Path| simclr(["report", &folder.display().to_string()]).run();
    assert_fails_with(&report(&data), &["not a run's folder: it holds no metrics.jsonl", "--output of train"]);
    assert_fails_with(&report(&dir.path().join("gone")), &["gone: not a run's folder: it is not a folder"]);
}

#[test]
fn bench_reports_the_step_it_timed() {
    let args = ["--arch", "resnet18", "--width", "0.25", "--stem", "cifar", "--batch-size", "4", "--image-size", "16"];
    let args = [&["bench"][..], &args, &["--steps", "1", "--warmup", "0", "--device", "cpu", "--json"]].concat();
    for optimizer in ["lars", "sgd", "adamw"] {
        let output = simclr([&args[..], &["--optimizer", optimizer]].concat()).run();
        assert_succeeds(&output);
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(report["optimizer"], optimizer);
        assert_eq!(report["batch_size"], 4);
        for key in ["train_images_per_second", "forward_images_per_second", "train_issue_ms"] {
            assert!(report[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {report}");
        }
        assert!(report.get("graph_ms_per_step").is_none(), "no CUDA graph was asked for: {report}");
        assert!(report.get("micro_batch_size").is_none(), "no chunks were asked for: {report}");
    }
    // In chunks, with the peak memory of the steps.
    let output = simclr([&args[..], &["--micro-batch-size", "2"]].concat()).run();
    assert_succeeds(&output);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["micro_batch_size"], 2);
    assert_eq!(report["peak_memory"], "host-resident");
    assert!(report["peak_memory_bytes"].as_u64().is_some_and(|bytes| bytes > 1 << 20), "{report}");
    let output = simclr([&args[..], &["--micro-batch-size", "0"]].concat()).run();
    assert_fails_with(&output, &["--micro-batch-size 0: must be at least 1"]);
    // A CUDA graph is refused off CUDA before anything is timed.
    let output = simclr([&args[..], &["--cuda-graph", "device/libsimclr_graph.so"]].concat()).run();
    assert_fails_with(&output, &["--cuda-graph needs a CUDA device, not Cpu"]);
}

#[test]
fn bad_augmentation_configs_are_named_at_load_time() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 4, 16);
    let base = tiny_run(&data, &dir.path().join("run"));
    let ops = |list: &str| format!("augment.ops=[{list}]");
    let cases = [
        (ops(r#"{op = "grayscale", probability = 1.5}"#), vec!["augment.ops[0] (grayscale): probability = 1.5"]),
        (
            ops(r#"{op = "color-jitter", probability = -0.1}"#),
            vec!["augment.ops[0] (color-jitter): probability = -0.1"],
        ),
        (
            ops(r#"{op = "random-resized-crop", min_scale = 0.9, max_scale = 0.5}"#),
            vec!["augment.ops[0] (random-resized-crop): min_scale = 0.9, max_scale = 0.5"],
        ),
        (
            ops(r#"{op = "gaussian-blur", kernel_size = 4}"#),
            vec!["augment.ops[0] (gaussian-blur): kernel_size = 4: must be odd"],
        ),
        (
            ops(r#"{op = "gaussian-blur", kernel_size = 17}"#),
            vec!["augment.ops[0] (gaussian-blur): kernel_size = 17: larger than the 16 px view"],
        ),
        (ops(r#"{op = "blurr"}"#), vec!["unknown variant `blurr`", "gaussian-blur", "augment.ops"]),
        (ops(r#"{op = "cutout", size = 0.5}"#), vec!["unknown field `size`", "augment.ops"]),
        (
            ops(r#"{op = "horizontal-flip"}, {op = "random-crop"}"#),
            vec!["augment.ops[1] (random-crop): a sizing op may only be the first op of a view"],
        ),
    ];
    for (value, needles) in &cases {
        assert_fails_with(&base.clone().args(["--set", value]).run(), needles);
    }
    // Every problem of one config is listed at once.
    let all =
        cases[..5].iter().map(|(v, _)| v.trim_start_matches("augment.ops=[").trim_end_matches(']')).collect::<Vec<_>>();
    let message = stderr(&base.clone().args(["--set", &ops(&all.join(", "))]).run());
    for index in 0..5 {
        assert!(message.contains(&format!("augment.ops[{index}]")), "{message}");
    }
    assert!(!dir.path().join("run").exists(), "a rejected config must not create the run folder");
}

#[test]
fn augment_preview_and_ablation_write_their_figures() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    let data_arg = data.display().to_string();
    let (png, params) = (dir.path().join("preview.png"), dir.path().join("params.jsonl"));
    let (png_arg, params_arg) = (png.display().to_string(), params.display().to_string());
    let preview = [
        "augment-preview",
        "--data",
        &data_arg,
        "--output",
        &png_arg,
        "--params",
        &params_arg,
        "--images",
        "4",
        "--pairs",
        "2",
        "--set",
        "data.image_size=16",
        "--config",
    ];
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/asymmetric.toml").display().to_string();
    let output = simclr([&preview[..], &[config.as_str()]].concat()).run();
    assert_succeeds(&output);
    let sheet = image::open(&png).unwrap();
    // 4 rows of 6x-enlarged 16 px views: the original and 2 pairs per row.
    assert_eq!(sheet.height(), 4 + 4 * (96 + 4));
    let logged = std::fs::read_to_string(&params).unwrap();
    assert_eq!(logged.lines().count(), 4 * 2 * 2);
    assert!(logged.contains("random-resized-crop"));
    assert!(stderr(&output)
        .contains("view 2: random-resized-crop -> horizontal-flip -> color-jitter -> grayscale -> solarize"));
    // In the format its name says: a .jpg of PNG bytes misled what opened it
    // by its name. An extension that is no image format is refused first.
    let sheet_in = |name: &str| {
        let path = dir.path().join(name).display().to_string();
        let args = ["augment-preview", "--data", &data_arg, "--output", &path, "--images", "2", "--pairs", "1"];
        (simclr(args).args(["--set", "data.image_size=16"]).run(), std::fs::read(&path).ok())
    };
    for (name, format) in [("sheet.JPG", image::ImageFormat::Jpeg), ("sheet", image::ImageFormat::Png)] {
        let (output, bytes) = sheet_in(name);
        assert_succeeds(&output);
        assert_eq!(image::guess_format(&bytes.unwrap()).unwrap(), format, "{name}");
    }
    let (output, bytes) = sheet_in("sheet.txt");
    assert_fails_with(&output, &["sheet.txt: an image is written as .png, .jpg", "not .txt"]);
    assert!(bytes.is_none());

    let out = dir.path().join("ablation");
    let output =
        tiny_study(["ablate", "augment"], &data, &out).args(["--ops", "random-resized-crop,color-jitter"]).run();
    assert_succeeds(&output);
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "{csv}");
    for row in &rows {
        let score: f64 = row.rsplit(',').next().unwrap().parse().unwrap();
        assert!((0.0..=1.0).contains(&score), "{row}");
    }
    // (crop, jitter) and (jitter, crop) are one experiment: three runs in all.
    let runs = std::fs::read_dir(&out).unwrap().filter(|e| e.as_ref().unwrap().path().is_dir()).count();
    assert_eq!(runs, 3);
    assert!(image::open(out.join("results.png")).unwrap().width() > 100);
    assert_fails_with(
        &simclr(["ablate", "augment", "--ops", "crop,blur", "--output", &out.display().to_string()]).run(),
        &["invalid value 'crop' for '--ops <OPS>'", "unknown op 'crop'", "random-resized-crop"],
    );
    // Each item of a list flag is parsed as the flag's, and a bad one named with it.
    assert_fails_with(
        &simclr(["ablate", "batch", "--lengths", "1,,2", "--output", &out.display().to_string()]).run(),
        &["invalid value '' for '--lengths <LENGTHS>'"],
    );
}

/// `ablate histogram` scores `ablate augment`'s pairs by colour
/// histograms without training anything, the same each time.
#[test]
fn histogram_study_scores_each_pair_without_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    let out = dir.path().join("histogram");
    let study = || {
        tiny_study(["ablate", "histogram", "--ops", "random-resized-crop,color-jitter", "--seeds", "0,1"], &data, &out)
            .run()
    };
    let output = study();
    assert_succeeds(&output);
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "first,second,random_guess,histogram_top1,histogram_top1_sd", "{csv}");
    assert_eq!(lines.len(), 5, "{csv}");
    for line in &lines[1..] {
        let fields: Vec<&str> = line.split(',').collect();
        // 12 images in batches of 4: a view's positive is one of 7 others.
        assert_eq!(fields[2], "0.142857", "{line}");
        let share: f64 = fields[3].parse().unwrap();
        assert!((0.0..=1.0).contains(&share), "{line}");
    }
    // (crop, jitter) and (jitter, crop) are one experiment.
    assert_eq!(lines[2].split(',').skip(2).collect::<Vec<_>>(), lines[3].split(',').skip(2).collect::<Vec<_>>());
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    for needle in ["the base run's own augmentation (both views): ", "colour jitter at strength 0: ", ", 1: "] {
        assert!(printed.contains(needle), "{needle} in {printed}");
    }
    assert!(printed.contains(&format!("as Figure 6: {}", out.join("histograms.png").display())), "{printed}");
    let strengths = std::fs::read_to_string(out.join("strengths.csv")).unwrap();
    let strength_rows: Vec<&str> = strengths.lines().collect();
    assert_eq!(strength_rows[0], "strength,histogram_top1,histogram_top1_sd", "{strengths}");
    let named: Vec<&str> = strength_rows[1..].iter().map(|row| row.split(',').next().unwrap()).collect();
    assert_eq!(named, ["0", "0.125", "0.25", "0.5", "1"], "{strengths}");
    for figure in ["results.png", "histograms.png"] {
        assert!(image::open(out.join(figure)).unwrap().width() > 100, "{figure}");
    }
    let folders = std::fs::read_dir(&out).unwrap().filter(|e| e.as_ref().unwrap().path().is_dir()).count();
    assert_eq!(folders, 0, "nothing is trained");
    assert_succeeds(&study());
    assert_eq!(std::fs::read_to_string(out.join("results.csv")).unwrap(), csv, "the same views each time");

    let bare = dir.path().join("bare");
    let no_jitter =
        || tiny_study(["ablate", "histogram", "--ops", "cutout"], &data, &bare).args(["--set", "augment.ops=[]"]);
    assert_fails_with(&no_jitter().run(), &["ablate histogram --strengths", "no color-jitter op"]);
    assert_succeeds(&no_jitter().args(["--strengths"]).run());
    assert_fails_with(
        &tiny_study(["ablate", "histogram", "--strengths", "0.5,2"], &data, &bare).run(),
        &["--strengths", "strength = 2"],
    );
}

#[test]
fn mismatched_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = trained_run(dir.path());
    let weights = out.join("encoder.safetensors");
    let (data_arg, output_arg) = (data.display().to_string(), dir.path().join("f.npy").display().to_string());
    let embed = |weights: &Path, arch: &str, width: &str| {
        simclr(["embed"])
            .args(encoder_flags(weights, arch, width))
            .args(["--input", &data_arg, "--output", &output_arg, "--image-size", "16"])
            .run()
    };
    // Mis-shaped: the weights are 0.125x, the model asked for is 0.25x.
    assert_fails_with(
        &embed(&weights, "resnet18", "0.25"),
        &["encoder.safetensors", "bn1.bias", "has shape [8], the model expects [16]"],
    );
    // Missing tensors: a ResNet-34 needs blocks a ResNet-18 file lacks.
    let output = embed(&weights, "resnet34", "0.125");
    assert_fails_with(&output, &["encoder.safetensors", "missing", "layer1.2"]);
    // Not a safetensors file at all.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
    assert_fails_with(&embed(&junk, "resnet18", "0.125"), &["junk.safetensors", "not a valid safetensors"]);
    assert!(!dir.path().join("f.npy").exists(), "no partial output on failure");
    // Evaluation takes the same checks, and needs labelled splits and one encoder.
    let splits = ["--train", data_arg.as_str(), "--test", data_arg.as_str()];
    let eval = simclr(["eval", "knn"]).args(encoder_flags(&junk, "resnet18", "0.125")).args(splits).run();
    assert_fails_with(&eval, &["junk.safetensors"]);
    assert_fails_with(&simclr(["eval", "knn", "--random-init", "--train", &data_arg]).run(), &["--test"]);
    assert_fails_with(&simclr(["eval", "linear", "--train", &data_arg, "--test", &data_arg]).run(), &["--random-init"]);
}

#[test]
fn eval_and_bench_settings_are_refused_by_name_and_an_io_error_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 2, 16);
    let data = data.display().to_string();
    let model = ["--arch", "resnet18", "--width", "0.125", "--stem", "cifar", "--device", "cpu"];
    // Each of these panicked inside libtorch or divided by zero.
    for protocol in ["knn", "linear", "finetune"] {
        let output = simclr(["eval", protocol, "--random-init", "--limit", "0", "--train", &data, "--test", &data])
            .args(model)
            .run();
        assert_fails_with(&output, &["--limit 0: must be at least 1"]);
    }
    // Checked before any image is read (the folder does not exist): a NaN
    // rate trained and scored a classifier of NaNs, a zero batch failed
    // only after every feature was computed.
    let missing = dir.path().join("missing").display().to_string();
    let settings = [
        ("linear", &["--learning-rate", "nan", "--momentum", "1", "--weight-decay=-1", "--batch-size", "0"][..]),
        ("finetune", &["--fraction", "2", "--epochs", "0", "--batch-size", "1", "--learning-rate=-0.1"][..]),
    ];
    let expected: [&[&str]; 2] = [
        &[
            "--batch-size 0: must be at least 1",
            "--learning-rate NaN: must be a finite number > 0",
            "--momentum 1: must be in [0, 1)",
            "--weight-decay -1: must be a finite number >= 0",
        ],
        &[
            "--fraction 2: must be in (0, 1]",
            "--epochs 0: must be at least 1",
            "--batch-size 1: must be at least 2",
            "--learning-rate -0.1: must be a finite number > 0",
        ],
    ];
    for ((protocol, flags), needles) in settings.into_iter().zip(expected) {
        let output = simclr(["eval", protocol, "--random-init", "--train", &missing, "--test", &missing])
            .args(model)
            .args(flags)
            .run();
        assert_fails_with(&output, needles);
    }
    let output = simclr(["eval", "knn", "--random-init", "--train", &missing, "--test", &missing, "--k", "0"])
        .args(model)
        .args(["--fraction", "0"])
        .run();
    assert_fails_with(&output, &["--k 0: must be at least 1", "--fraction 0: must be in (0, 1]"]);
    let output = simclr(["bench"]).args(model).args(["--image-size", "0", "--width", "0", "--steps", "1"]).run();
    assert_fails_with(&output, &["--image-size 0: must be at least 8", "--width 0: must be in (0, 16]"]);
    let output = simclr(["bench", "augment", "--data", &data, "--threads", "0"]).run();
    assert_fails_with(&output, &["--threads 0: must be at least 1"]);
    let output = simclr(["bench", "input", "--data", &data, "--limit", "0"]).run();
    assert_fails_with(&output, &["--limit 0: must be at least 1"]);
    // Data that is not there is named as the data.
    let none = dir.path().join("none").display().to_string();
    let output = simclr(["train", "--data", &missing, "--output", &none]).run();
    assert_fails_with(&output, &[&format!("dataset {missing}: no such file or folder")]);
    let output = simclr(["eval", "knn", "--random-init", "--train", &data, "--test", &missing]).args(model).run();
    assert_fails_with(&output, &[&format!("dataset {missing}: no such file or folder")]);
    // A folder where a file is to be written is refused before the work,
    // which wrote everything and then failed ("Is a directory").
    let folder = dir.path().display().to_string();
    let output = simclr(["eval", "knn", "--random-init", "--train", &data, "--test", &data, "--output", &folder]);
    assert_fails_with(&output.args(model).run(), &[&format!("--output {folder}: a folder, where the file to write")]);
    let weights = Path::new(env!("CARGO_MANIFEST_DIR")).join("../simclr/tests/fixtures/resnet18_cifar.safetensors");
    let embed = |output: &str| {
        simclr(["embed", "--weights", weights.to_str().unwrap(), "--arch", "resnet18", "--stem", "cifar"])
            .args(["--device", "cpu", "--input", &data, "--output", output])
            .run()
    };
    assert_fails_with(&embed(&folder), &[&format!("--output {folder}: a folder")]);
    let features = dir.path().join("f.npy");
    std::fs::create_dir(dir.path().join("f.paths.txt")).unwrap();
    assert_fails_with(&embed(features.to_str().unwrap()), &["--output's path list", "f.paths.txt: a folder"]);
    assert!(!features.exists(), "nothing is written");
    std::fs::remove_dir(dir.path().join("f.paths.txt")).unwrap();
    // The control: the same command, its paths file free, goes on to read
    // the weights (a fixture of the network's parameters alone, refused).
    assert_fails_with(&embed(features.to_str().unwrap()), &["tensor(s) missing"]);
    let output = simclr(["export", "--weights", weights.to_str().unwrap(), "--arch", "resnet18", "--stem", "cifar"]);
    assert_fails_with(&output.args(["--output", &folder]).run(), &[&format!("--output {folder}: a folder")]);
    // The I/O error is in the message once, not again as its cause.
    std::fs::create_dir(dir.path().join("metrics.jsonl")).unwrap();
    let output = simclr(["report", &dir.path().display().to_string()]).run();
    assert_fails_with(&output, &["metrics.jsonl: Is a directory"]);
    assert_eq!(stderr(&output).matches("Is a directory").count(), 1, "{}", stderr(&output));
}

#[test]
fn neighbors_finds_the_query_and_its_near_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let (_, run_dir) = trained_run(dir.path());
    let index = dir.path().join("index");
    std::fs::create_dir_all(&index).unwrap();
    let shapes = simclr::data::synthetic::generate(30, 10, 32, 5);
    for (i, sample) in shapes.samples.iter().enumerate() {
        sample.image().unwrap().save(index.join(format!("shape{i:02}.png"))).unwrap();
    }
    let original = shapes.samples[0].image().unwrap();
    image::imageops::flip_horizontal(&*original).save(index.join("copy_flipped.png")).unwrap();
    let cropped = image::imageops::crop_imm(&*original, 2, 1, 29, 29).to_image();
    image::imageops::resize(&cropped, 32, 32, image::imageops::FilterType::Triangle)
        .save(index.join("copy_cropped.png"))
        .unwrap();

    let query = index.join("shape00.png");
    let gallery = dir.path().join("gallery.png");
    for kind in ["exact", "hnsw"] {
        let output = simclr(["neighbors"])
            .args(encoder_flags(&run_dir.join("encoder.safetensors"), "resnet18", "0.125"))
            .args([
                "--image-size",
                "32",
                "--index",
                &index.display().to_string(),
                "--query",
                &query.display().to_string(),
                "--index-kind",
                kind,
                "--gallery",
                &gallery.display().to_string(),
            ])
            .run();
        assert_succeeds(&output);
        let table = String::from_utf8_lossy(&output.stdout).into_owned();
        let hits: Vec<&str> = table.lines().skip(1).map(|l| l.rsplit('\t').next().unwrap()).collect();
        assert_eq!(hits.len(), 5, "{table}");
        assert!(hits[0].ends_with("shape00.png"), "{kind}: the query itself comes first:\n{table}");
        for copy in ["copy_flipped.png", "copy_cropped.png"] {
            assert!(hits.iter().any(|h| h.ends_with(copy)), "{kind}: {copy} not in the top 5:\n{table}");
        }
    }
    // One row (the query and five neighbours) of 96-pixel thumbnails.
    let sheet = image::open(&gallery).unwrap();
    assert_eq!((sheet.width(), sheet.height()), (6 + 6 * 102 + 6, 6 + 102));

    // --exclude-self: five others, the copies among them, with the query
    // spelled otherwise than the index lists it; the whole index as queries.
    let spelled = index.join("../index/./shape00.png");
    for (kind, queries) in [("exact", &spelled), ("hnsw", &spelled), ("exact", &index)] {
        let output = simclr(["neighbors", "--exclude-self", "--image-size", "32", "--index-kind", kind])
            .args(encoder_flags(&run_dir.join("encoder.safetensors"), "resnet18", "0.125"))
            .args(["--index", index.to_str().unwrap(), "--query", queries.to_str().unwrap()])
            .run();
        assert_succeeds(&output);
        let table = String::from_utf8_lossy(&output.stdout).into_owned();
        let rows: Vec<Vec<&str>> = table.lines().skip(1).map(|l| l.split('\t').collect()).collect();
        let queried = std::fs::read_dir(queries).map_or(1, |listed| listed.count());
        assert_eq!(rows.len(), 5 * queried, "{kind}:\n{table}");
        // The index's file names are its images'.
        let name = |path: &str| path.rsplit('/').next().unwrap().to_owned();
        assert!(rows.iter().all(|row| name(row[0]) != name(row[3])), "{kind}: a query its own neighbour:\n{table}");
        let of_shape00: Vec<&str> =
            rows.iter().filter(|row| row[0].ends_with("shape00.png")).map(|row| row[3]).collect();
        for copy in ["copy_flipped.png", "copy_cropped.png"] {
            assert!(of_shape00.iter().any(|hit| hit.ends_with(copy)), "{kind}: {copy} not in the 5:\n{table}");
        }
    }
}

/// Per-epoch losses of a run, from its metrics log.
fn epoch_losses(run: &Path) -> Vec<f64> {
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect()
}

/// The scalars of a run's TensorBoard events that do not depend on the
/// clock (not images/s, nor the share of time spent waiting for data), as
/// (step, tag, value), in the order written.
fn logged_scalars(run: &Path) -> Vec<(i64, String, f32)> {
    use simclr::train::tensorboard;
    let file = std::fs::read(run.join("metrics.tfevents")).unwrap();
    let (records, cut) = tensorboard::read_records(&file).unwrap();
    assert!(!cut, "{}: a record cut short", run.display());
    let timed = ["train/images_per_second", "train/data_wait_fraction"];
    records
        .into_iter()
        .flat_map(|record| tensorboard::event_scalars(record).unwrap())
        .filter(|scalar| !timed.contains(&scalar.tag.as_str()))
        .map(|scalar| (scalar.step, scalar.tag, scalar.value))
        .collect()
}

/// A 3-epoch run of 6 steps an epoch, checkpointing every epoch.
fn three_epochs(data: &Path, out: &Path) -> Simclr {
    tiny_run(data, out).args(["--epochs", "3", "--set", "train.checkpoint_every=1"])
}

/// Asserts that `run` logged the losses of `reference`, epoch by epoch in
/// its JSON lines and step by step in its TensorBoard events, and wrote its
/// encoder bit for bit (the files' metadata order may differ); `what` says
/// what `run` went through.
fn assert_same_run(run: &Path, reference: &Path, what: &str) {
    assert_eq!(epoch_losses(run), epoch_losses(reference), "losses differ after {what}");
    let (ours, theirs) = (logged_scalars(run), logged_scalars(reference));
    assert!(ours.iter().any(|(_, tag, _)| tag == "train/loss_step"), "no step logged after {what}");
    assert!(ours == theirs, "the events differ after {what}:\n{ours:?}\n{theirs:?}");
    assert_same_tensors(&run.join("encoder.safetensors"), &reference.join("encoder.safetensors"), what);
    // The encoders kept along the run (`train.encoder_every`), by epoch.
    let kept = |run: &Path| -> Vec<String> {
        let folder = run.join("encoders");
        let mut names: Vec<String> = std::fs::read_dir(folder)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".safetensors"))
            .collect();
        names.sort();
        names
    };
    let names = kept(reference);
    assert_eq!(kept(run), names, "other encoders kept after {what}");
    assert!(!names.is_empty(), "no encoder kept along the reference run");
    for name in &names {
        let (ours, theirs) = (run.join("encoders").join(name), reference.join("encoders").join(name));
        assert_same_tensors(&ours, &theirs, &format!("{what} ({name})"));
    }
}

/// Whether two weight files hold the same tensors, bit for bit.
fn same_tensors(a: &Path, b: &Path) -> bool {
    let (ours, theirs) = (simclr::io::load(a).unwrap().tensors, simclr::io::load(b).unwrap().tensors);
    ours.len() == theirs.len() && theirs.iter().all(|(name, tensor)| ours.get(name).is_some_and(|t| t.equal(tensor)))
}

fn assert_same_tensors(ours: &Path, theirs: &Path, what: &str) {
    assert!(same_tensors(ours, theirs), "{} differs from {} after {what}", ours.display(), theirs.display());
}

#[test]
fn the_loss_study_writes_its_grid_and_a_killed_one_continues() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    // Two losses, one similarity, two temperatures, all negatives and the
    // semi-hard ones: four cells (the margin triplet loss has no
    // temperature; NT-Xent takes no mining), 2 epochs of 3 steps each.
    let study = |out: &Path| {
        simclr(["ablate", "loss", "--losses", "nt-xent,margin-triplet", "--similarities", "cosine"])
            .args(["--temperatures", "0.5,1", "--negatives", "all,semi-hard"])
            .args(tiny_flags(&data, out))
            .args(monitor_flags(&data))
            .args(["--epochs", "2", "--set", "train.checkpoint_every=1"])
            .env("RUST_LOG", "info")
    };
    let straight = dir.path().join("straight");
    let output = study(&straight).run();
    assert_succeeds(&output);
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("nt-xent, l2 norm") && table.contains("random-init encoder:"), "{table}");
    assert!(table.contains("margin-triplet, l2 norm, semi-hard"), "{table}");
    let csv = std::fs::read_to_string(straight.join("results.csv")).unwrap();
    assert!(csv.starts_with("objective,similarity,negatives,temperature,margin,knn_top1\n"), "{csv}");
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|row| row.split(',').collect()).collect();
    let cells: Vec<[&str; 5]> = rows.iter().map(|r| [r[0], r[1], r[2], r[3], r[4]]).collect();
    assert_eq!(
        cells,
        [
            ["nt-xent", "cosine", "all", "0.5", ""],
            ["nt-xent", "cosine", "all", "1", ""],
            ["margin-triplet", "cosine", "all", "", "1"],
            ["margin-triplet", "cosine", "semi-hard", "", "1"]
        ],
        "{csv}"
    );
    assert!(rows.iter().all(|r| (0.0..=1.0).contains(&r[5].parse::<f64>().unwrap())), "{csv}");
    // The semi-hard cell trains with mining, the other without.
    let config = |cell: &str| std::fs::read_to_string(straight.join(cell).join("config.toml")).unwrap();
    assert!(config("margin-triplet-cosine-m1-semi-hard").contains("negatives = \"semi-hard\""));
    assert!(config("margin-triplet-cosine-m1").contains("negatives = \"all\""));
    assert!(image::open(straight.join("results.png")).unwrap().width() > 100);

    // Stopped in the middle of its first cell's second epoch, then run again:
    // that cell resumes, the others train, and the study ends as the straight one.
    let killed = dir.path().join("killed");
    let first = study(&killed).env("SIMCLR_TEST_STOP_AFTER_STEPS", 4).run();
    assert_eq!(first.status.code(), Some(130), "{}", stderr(&first));
    let second = study(&killed).run();
    assert_succeeds(&second);
    assert!(stderr(&second).contains("resuming nt-xent-cosine-t0.5"), "{}", stderr(&second));
    assert_eq!(std::fs::read_to_string(killed.join("results.csv")).unwrap(), csv);
    assert_same_run(&killed.join("nt-xent-cosine-t0.5"), &straight.join("nt-xent-cosine-t0.5"), "resuming a cell");

    // A finished study is read back, not trained again.
    let third = study(&killed).run();
    assert_succeeds(&third);
    assert_eq!(stderr(&third).matches("is done, its score read from").count(), 4, "{}", stderr(&third));
    // Another base configuration in the same folder is refused, the folder named.
    let other = study(&killed).args(["--set", "optim.weight_decay=0.01"]).run();
    let cell = killed.join("nt-xent-cosine-t0.5").display().to_string();
    assert_fails_with(&other, &[&cell, "another configuration"]);
    assert_fails_with(
        &simclr(["ablate", "loss", "--losses", "infonce", "--output", &killed.display().to_string()]).run(),
        &["unknown loss 'infonce'", "nt-xent, nt-logistic, margin-triplet"],
    );
    // Mining asked of losses that take none is refused, naming them.
    let no_mining = simclr(["ablate", "loss", "--losses", "nt-xent,dcl", "--negatives", "semi-hard"])
        .args(tiny_flags(&data, &dir.path().join("no-mining")))
        .args(monitor_flags(&data))
        .run();
    assert_fails_with(&no_mining, &["--negatives semi-hard with --losses nt-xent,dcl", "nt-logistic"]);
    let one_run = simclr(["train", "--set", "loss.negatives=\"semi-hard\""])
        .args(tiny_flags(&data, &dir.path().join("one")))
        .run();
    assert_fails_with(&one_run, &["loss.negatives = \"semi-hard\" with loss.objective = \"nt-xent\""]);

    // Cells whose training diverges (every step's loss made NaN) are
    // recorded as such, and the study goes on to its end; run again, they
    // are read back.
    let diverging = dir.path().join("diverging");
    let nan = study(&diverging).env("SIMCLR_TEST_POISON_STEPS", "0,1,2,3,4,5").run();
    assert_succeeds(&nan);
    let csv = std::fs::read_to_string(diverging.join("results.csv")).unwrap();
    assert_eq!(csv.lines().filter(|line| line.ends_with(",diverged")).count(), 4, "{csv}");
    assert!(String::from_utf8_lossy(&nan.stdout).contains("diverged"));
    assert!(diverging.join("margin-triplet-cosine-m1/diverged.txt").exists());
    let again = study(&diverging).run();
    assert_succeeds(&again);
    assert_eq!(stderr(&again).matches("diverged before").count(), 4, "{}", stderr(&again));
}

#[test]
fn the_batch_study_trains_each_batch_for_each_length() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    let out = dir.path().join("batch");
    let study =
        || simclr(["ablate", "batch", "--batch-sizes", "2,4", "--lengths", "1,2"]).args(tiny_flags(&data, &out));
    // A study its monitor cannot score is refused before anything is trained.
    assert_fails_with(&study().run(), &["a study scores each run with the kNN monitor"]);
    assert!(!out.join("batch2-epochs1").exists(), "nothing was trained");
    let output = study().args(monitor_flags(&data)).run();
    assert_succeeds(&output);
    // The study sets each run's batch size and epochs, and says that the
    // base run's flags for them are not used.
    let warnings = stderr(&output);
    assert!(
        warnings
            .contains("--batch-size 4 is not used: the study sets train.batch_size in each run, from --batch-sizes"),
        "{warnings}"
    );
    assert!(
        warnings.contains("--epochs 1 is not used: the study sets train.epochs in each run, from --lengths"),
        "{warnings}"
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("batch 4") && table.contains("2 epochs"), "{table}");
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|row| row.split(',').collect()).collect();
    let cells: Vec<[&str; 2]> = rows.iter().map(|r| [r[0], r[1]]).collect();
    assert_eq!(cells, [["2", "1"], ["2", "2"], ["4", "1"], ["4", "2"]], "{csv}");
    // The learning rate scales linearly with the batch (the default optim.lr_scaling).
    let peak = |row: &Vec<&str>| row[2].parse::<f64>().unwrap();
    assert!((peak(&rows[2]) / peak(&rows[0]) - 2.0).abs() < 1e-12, "{csv}");
    // Each run trained its own number of epochs.
    assert_eq!(epoch_losses(&out.join("batch4-epochs2")).len(), 2);
    assert_eq!(epoch_losses(&out.join("batch2-epochs1")).len(), 1);
    assert!(image::open(out.join("results.png")).unwrap().width() > 100);
}

#[test]
fn a_study_with_seeds_scores_each_cell_by_the_mean_of_its_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    let out = dir.path().join("seeds");
    let study =
        || tiny_study(["ablate", "batch", "--batch-sizes", "4", "--lengths", "1", "--seeds", "3,4"], &data, &out);
    let output = study().run();
    assert_succeeds(&output);
    let cell = out.join("batch4-epochs1");
    let top1 = |seed: u64| run_summary(&cell.join(format!("seed-{seed}")))["final_knn_top1"].as_f64().unwrap();
    // Each seed trained a run of its own.
    assert_ne!(epoch_losses(&cell.join("seed-3")), epoch_losses(&cell.join("seed-4")));
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "batch_size,epochs,peak_learning_rate,knn_top1,knn_top1_sd", "{csv}");
    let row: Vec<f64> = lines[1].split(',').map(|v| v.parse().unwrap()).collect();
    let (a, b) = (top1(3), top1(4));
    assert!((row[3] - (a + b) / 2.0).abs() < 1e-4, "{csv}: runs {a} and {b}");
    assert!((row[4] - (a - b).abs() / 2f64.sqrt()).abs() < 1e-4, "{csv}: runs {a} and {b}");
    assert!(String::from_utf8_lossy(&output.stdout).contains(" ± "), "{}", String::from_utf8_lossy(&output.stdout));
    // Run again, both runs are read back.
    let again = study().run();
    assert_succeeds(&again);
    assert_eq!(stderr(&again).matches("is done, its score read from").count(), 2, "{}", stderr(&again));
    assert_eq!(std::fs::read_to_string(out.join("results.csv")).unwrap(), csv);
}

#[test]
fn the_head_study_scores_h_and_z_as_eval_and_embed_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    let out = dir.path().join("heads");
    let output = tiny_study(["ablate", "head", "--heads", "none,linear,mlp-3"], &data, &out).run();
    assert_succeeds(&output);
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("mlp-3") && table.contains("z = g(h)"), "{table}");
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|row| row.split(',').collect()).collect();
    assert_eq!(rows.iter().map(|r| r[0]).collect::<Vec<_>>(), ["none", "linear", "mlp-3"], "{csv}");
    let score = |text: &str| text.parse::<f64>().unwrap();
    // Without a head z is h, scored once by the monitor and once from the checkpoint.
    assert_eq!(rows[0][2], rows[0][3], "{csv}");
    assert!(image::open(out.join("results.png")).unwrap().width() > 100);
    // The effective ranks of the bank's features at h and at z, trained and
    // at random init: one where z is h, each between 1 and the features'
    // dimension, and h's at random init one for every head (the encoder is
    // initialised before the head, from the same seed).
    let columns = "knn_top1_h,knn_top1_z,effective_rank_h,effective_rank_z,effective_rank_h_random_init,\
                   effective_rank_z_random_init";
    assert!(csv.starts_with(&format!("head,projection_dim,{columns}\n")), "{csv}");
    assert_eq!((rows[0][4], rows[0][6]), (rows[0][5], rows[0][7]), "{csv}");
    assert!(rows.iter().all(|r| r[4..8].iter().all(|rank| (1.0..=128.0).contains(&score(rank)))), "{csv}");
    assert!(rows.iter().all(|r| r[6] == rows[0][6]), "{csv}");
    assert!(table.contains("effective rank of the kNN bank's features, h / z: head-none "), "{table}");
    assert!(table.contains("(random init "), "{table}");
    // The linear head's W: its effective rank, how far it moved, its spectrum.
    assert!(table.contains("effective rank of W: head-linear, seed 0 ") && table.contains("of its norm"), "{table}");
    assert!(image::open(out.join("linear-head-spectrum.png")).unwrap().width() > 100);

    // `eval knn` on the same splits with the monitor's k and T reads the
    // study's numbers from the run's checkpoint, at h and at z.
    let run = out.join("head-mlp-3");
    let checkpoint = run.join("checkpoint.safetensors").display().to_string();
    let data_arg = data.display().to_string();
    let eval = |layer: &str, extra: &[&str]| {
        simclr(["eval", "knn", "--k", "3", "--checkpoint", &checkpoint, "--layer", layer])
            .args(["--train", &data_arg, "--test", &data_arg])
            .args(extra)
            .run()
    };
    for (layer, column) in [("h", 2), ("z", 3)] {
        let json = dir.path().join(format!("eval-{layer}.json"));
        assert_succeeds(&eval(layer, &["--output", &json.display().to_string()]));
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let top1 = report["top1"].as_f64().unwrap();
        assert!((top1 - score(rows[2][column])).abs() < 1e-4, "{layer}: eval {top1}, study {csv}");
        assert_eq!(report["layer"], layer);
    }
    // A layer the head lacks, a head of weights without one: named.
    assert_fails_with(&eval("head:4", &[]), &["head:4", "head:1 to head:3"]);
    let encoder = run.join("encoder.safetensors").display().to_string();
    let splits = ["--train", &data_arg, "--test", &data_arg];
    let output = simclr(["eval", "knn", "--weights", &encoder, "--layer", "z"]).args(splits).run();
    assert_fails_with(&output, &["--layer z", "only a run's checkpoint", "encoder.safetensors"]);
    let output = simclr(["eval", "knn", "--random-init", "--layer", "z"]).args(splits).run();
    assert_fails_with(&output, &["--layer z", "--checkpoint"]);
    // Fine-tuning from the head's first layer (SimCLR v2's), with it: the
    // report names the layer; from h, the encoder's weights do as well.
    let finetune = |weights: &str, layer: &str| {
        let json = dir.path().join(format!("finetune-{layer}.json"));
        let output = simclr(["eval", "finetune", "--weights", weights, "--layer", layer, "--device", "cpu"])
            .args(splits)
            .args(["--fraction", "1", "--epochs", "1", "--batch-size", "4", "--output", json.to_str().unwrap()])
            .run();
        assert_succeeds(&output);
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(&json).unwrap()).unwrap()
    };
    assert_eq!(finetune(&checkpoint, "head:1")["layer"], "head:1");
    assert_eq!(finetune(&encoder, "h")["layer"], "h");
    let output = simclr(["eval", "finetune", "--weights", &encoder, "--layer", "head:1"]).args(splits).run();
    assert_fails_with(&output, &["--layer head:1", "only a run's checkpoint"]);

    // `embed` reads any layer of the checkpoint: h (0.125 x 512 = 64), the
    // head's hidden layers (as wide as h by default) and z (128).
    for (layer, width) in [("h", 64), ("head:1", 64), ("z", 128)] {
        let features = dir.path().join(format!("embed-{layer}.npy"));
        let output = simclr(["embed", "--weights", &checkpoint, "--layer", layer])
            .args(["--input", &data_arg, "--output", &features.display().to_string()])
            .run();
        assert_succeeds(&output);
        assert_eq!(npy_shape(&features), [12, width], "{layer}");
    }
}

#[test]
fn the_head_study_by_dimension_trains_each_head_at_each_output_dimension() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    let out = dir.path().join("dims");
    // A base that sets what --dims varies is told so.
    let output = tiny_study(["ablate", "head", "--heads", "none,linear", "--dims", "16,32"], &data, &out)
        .args(["--set", "model.head.projection_dim=64"])
        .run();
    assert_succeeds(&output);
    assert!(stderr(&output).contains("is not used: the study sets model.head.projection_dim in each run, from --dims"));
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|row| row.split(',').collect()).collect();
    // No head: one run, z = h.
    assert_eq!(
        rows.iter().map(|r| [r[0], r[1]]).collect::<Vec<_>>(),
        [["none", ""], ["linear", "16"], ["linear", "32"]]
    );
    assert_eq!(rows[0][2], rows[0][3], "{csv}");
    let config = |cell: &str| std::fs::read_to_string(out.join(cell).join("config.toml")).unwrap();
    assert!(config("head-linear-dim16").contains("projection_dim = 16"));
    assert!(config("head-linear-dim32").contains("projection_dim = 32"));
    assert!(config("head-none").contains(r#"kind = "none""#));
    // The table: a column per dimension, scored on h, no head across its row.
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("z: 16") && table.contains("z: 32") && !table.contains("z = g(h)"), "{table}");
    let none = table.lines().find(|line| line.trim_start().starts_with("none")).expect("a row without a head");
    let cells: Vec<&str> = none.split_whitespace().skip(1).collect();
    assert_eq!(cells.len(), 2);
    assert_eq!(cells[0], cells[1], "{table}");
    assert_fails_with(
        &simclr(["ablate", "head", "--dims", "8,0"]).args(tiny_flags(&data, &dir.path().join("zero"))).run(),
        &["--dims: 0", "at least 1"],
    );
    assert!(!dir.path().join("zero").exists());
}

#[test]
fn the_transform_study_adds_each_transformation_and_probes_h_and_z_reproducibly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    let out = dir.path().join("transforms");
    let study = || tiny_study(["ablate", "transform", "--transformations", "grayscale,rotation"], &data, &out).run();
    let output = study();
    assert_succeeds(&output);
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("colour vs grayscale") && table.contains("random init: h"), "{table}");
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("transformation,classes,random_guess,probe_h_random_init,probe_h,probe_z,knn_top1_h")
    );
    let rows: Vec<Vec<&str>> = lines.map(|row| row.split(',').collect()).collect();
    assert_eq!(
        rows.iter().map(|r| [r[0], r[1], r[2]]).collect::<Vec<_>>(),
        [["grayscale", "2", "0.8000"], ["rotation", "4", "0.2500"]]
    );
    for row in &rows {
        for score in &row[3..] {
            assert!((0.0..=1.0).contains(&score.parse::<f64>().unwrap()), "{csv}");
        }
    }
    // The grayscale row is the base (its preset has grayscale); the
    // rotation row adds the op.
    let config = |cell: &str| std::fs::read_to_string(out.join(cell).join("config.toml")).unwrap();
    assert!(config("transform-grayscale").contains(r#"op = "grayscale""#));
    assert!(!config("transform-grayscale").contains(r#"op = "rotation""#));
    assert!(config("transform-rotation").contains(r#"op = "rotation""#));
    assert!(image::open(out.join("results.png")).unwrap().width() > 100);
    // Run again without the probes' kept scores: the runs are read back and
    // the probes, drawn from the runs' seeds, score the same.
    let kept = |cell: &str| out.join(cell).join("transform-probes.json");
    for cell in ["transform-grayscale", "transform-rotation"] {
        std::fs::remove_file(kept(cell)).unwrap();
    }
    let again = study();
    assert_succeeds(&again);
    assert_eq!(stderr(&again).matches("is done, its score read from").count(), 2, "{}", stderr(&again));
    assert_eq!(std::fs::read_to_string(out.join("results.csv")).unwrap(), csv);
    // With them, the kept scores are read, not computed again: scores
    // changed by hand show in the table; kept under another program's key
    // (the control), they are computed again, and that key dropped.
    let keep = |cell: &str, key: &dyn Fn(&str) -> String| {
        let text = std::fs::read_to_string(kept(cell)).unwrap();
        let scores: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
        let (old_key, _) = scores.iter().next().unwrap();
        assert!(old_key.starts_with(&format!("{} program ", &cell["transform-".len()..])), "{old_key}");
        let changed = serde_json::json!({ key(old_key): [0.125, 0.25, 0.375] });
        std::fs::write(kept(cell), changed.to_string()).unwrap();
    };
    keep("transform-grayscale", &|key| key.to_owned());
    keep("transform-rotation", &|key| key.replace(" program ", " program X"));
    assert_succeeds(&study());
    let read_back = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let rows: Vec<&str> = read_back.lines().collect();
    assert!(rows[1].starts_with("grayscale,2,0.8000,0.1250,0.2500,0.3750,"), "{read_back}");
    assert_eq!(rows[2], csv.lines().nth(2).unwrap());
    let rotation = std::fs::read_to_string(kept("transform-rotation")).unwrap();
    assert!(!rotation.contains(" program X") && !rotation.contains("0.125"), "{rotation}");
    assert_fails_with(
        &simclr(["ablate", "transform", "--transformations", "rotation,blur"])
            .args(tiny_flags(&data, &dir.path().join("unknown")))
            .run(),
        &["unknown transformation 'blur'", "grayscale, rotation, noise, sobel"],
    );
    assert!(!dir.path().join("unknown").exists());
}

#[test]
fn the_bn_study_trains_global_and_per_device_batch_norm_by_number_of_devices() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    let out = dir.path().join("bn");
    let study = || tiny_study(["ablate", "bn", "--devices", "1,2"], &data, &out).run();
    let output = study();
    assert_succeeds(&output);
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("2 x 2 images") && table.contains("per-device BN"), "{table}");
    assert!(table.contains("training loss of the last epoch: global BN "), "{table}");
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("devices,images_per_device,batch_norm,knn_top1,final_loss"));
    let rows: Vec<Vec<&str>> = lines.map(|row| row.split(',').collect()).collect();
    // One device is global BN: one run, one line.
    assert_eq!(
        rows.iter().map(|r| [r[0], r[1], r[2]]).collect::<Vec<_>>(),
        [["1", "4", "global"], ["2", "2", "per-device"]]
    );
    let losses: Vec<f64> = rows.iter().map(|r| r[4].parse().unwrap()).collect();
    assert!(rows.iter().all(|r| (0.0..=1.0).contains(&r[3].parse::<f64>().unwrap())), "{csv}");
    assert!(losses.iter().all(|loss| loss.is_finite() && *loss > 0.0), "{csv}");
    // BatchNorm over 2 images is another computation than over 4.
    assert_ne!(losses[0], losses[1], "{csv}");
    let config = |cell: &str| std::fs::read_to_string(out.join(cell).join("config.toml")).unwrap();
    assert!(!config("global").contains("micro_batch_size"));
    assert!(config("per-device-2").contains("micro_batch_size = 2"));
    assert!(image::open(out.join("results.png")).unwrap().width() > 100);
    let again = study();
    assert_succeeds(&again);
    assert_eq!(stderr(&again).matches("is done, its score read from").count(), 2, "{}", stderr(&again));
    assert_eq!(std::fs::read_to_string(out.join("results.csv")).unwrap(), csv);
    let refused = dir.path().join("refused");
    assert_fails_with(
        &simclr(["ablate", "bn", "--devices", "3"]).args(tiny_flags(&data, &refused)).run(),
        &["--devices 3: the batch of 4 images does not split into 3 devices of equal size"],
    );
    assert_fails_with(
        &simclr(["ablate", "bn", "--devices", "2,1,2"]).args(tiny_flags(&data, &refused)).run(),
        &["--devices [2, 1, 2]: 2 is given twice"],
    );
    assert!(!refused.exists());
}

#[test]
fn the_model_study_trains_each_model_with_and_without_labels() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    let out = dir.path().join("models");
    let study = || tiny_study(["ablate", "model", "--archs", "resnet18", "--widths", "0.125,0.25"], &data, &out).run();
    let output = study();
    assert_succeeds(&output);
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|row| row.split(',').collect()).collect();
    assert_eq!(rows.iter().map(|r| [r[0], r[1]]).collect::<Vec<_>>(), [["resnet18", "0.125"], ["resnet18", "0.25"]]);
    for row in &rows {
        // Two scores and the model's random-init baseline, each a fraction.
        assert!(row[2..5].iter().all(|s| (0.0..=1.0).contains(&s.parse::<f64>().unwrap())), "{csv}");
    }
    // Each model trained twice: contrastively, and with labels through its classifier.
    let config = |cell: &str| std::fs::read_to_string(out.join(cell).join("config.toml")).unwrap();
    assert!(config("resnet18-0.25x-supervised").contains("supervised = true"));
    assert!(config("resnet18-0.25x-supervised").contains("width_multiplier = 0.25"));
    assert!(!config("resnet18-0.25x-simclr").contains("supervised"));
    assert!(image::open(out.join("results.png")).unwrap().width() > 100);
    // Run again, every cell is read back.
    let again = study();
    assert_succeeds(&again);
    assert_eq!(stderr(&again).matches("is done, its score read from").count(), 4, "{}", stderr(&again));
    assert_eq!(std::fs::read_to_string(out.join("results.csv")).unwrap(), csv);
}

#[test]
fn the_colour_study_trains_each_strength_with_and_without_labels_then_adds_blur_and_auto_augment() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    let out = dir.path().join("colour");
    let output =
        tiny_study(["ablate", "color", "--strengths", "0.25,1", "--auto-augment", "cifar10"], &data, &out).run();
    assert_succeeds(&output);
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|row| row.split(',').collect()).collect();
    assert_eq!(
        rows.iter().map(|r| [r[0], r[1], r[2]]).collect::<Vec<_>>(),
        [["0.25", "false", ""], ["1", "false", ""], ["1", "true", ""], ["", "false", "cifar10"]]
    );
    for row in &rows {
        assert!(row[3..5].iter().all(|s| (0.0..=1.0).contains(&s.parse::<f64>().unwrap())), "{csv}");
    }
    // The base is the imagenet pipeline (no preset given): its jitter at
    // each strength, its blur only in the last column; labels in one row.
    let config = |cell: &str| std::fs::read_to_string(out.join(cell).join("config.toml")).unwrap();
    let weak = config("s0.25-simclr");
    assert!(weak.contains("strength = 0.25") && !weak.contains("gaussian-blur"), "{weak}");
    assert!(config("s1+blur-simclr").contains("gaussian-blur"));
    assert!(config("s1+blur-supervised").contains("supervised = true"));
    assert!(!config("s1-simclr").contains("supervised"));
    // The AutoAugment column: the policy where the jitter was, no grayscale.
    let auto = config("autoaugment-cifar10-supervised");
    assert!(auto.contains("auto-augment") && auto.contains(r#"policy = "cifar10""#), "{auto}");
    assert!(!auto.contains("color-jitter") && !auto.contains("grayscale") && auto.contains("supervised = true"));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("1 + blur") && table.contains("AA cifar10"), "{table}");
    // A base without colour jitter has nothing to vary, and a strength out
    // of range is named, both before anything trains.
    let bare = dir.path().join("bare");
    assert_fails_with(
        &tiny_study(["ablate", "color"], &data, &bare).args(["--set", "augment.ops=[]"]).run(),
        &["no color-jitter op"],
    );
    // (`--auto-augment` alone asks for no AutoAugment column.)
    assert_fails_with(
        &simclr(["ablate", "color", "--auto-augment", "--strengths", "0.5,2"]).args(tiny_flags(&data, &bare)).run(),
        &["--strengths: strength = 2", "[0, 1.25]"],
    );
    assert_fails_with(
        &simclr(["ablate", "color", "--auto-augment", "imagenet,cifar100"]).args(tiny_flags(&data, &bare)).run(),
        &["unknown AutoAugment policy 'cifar100'", "imagenet, cifar10, svhn"],
    );
    assert!(!bare.exists());
}

#[test]
fn the_fast_preset_is_reproducible_from_its_seed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    // The preset's tensor augmentation path on the CPU, 2 epochs (--epochs
    // replaces its time budget, whose epoch count follows the clock).
    let run = |name: &str, seed: &str, settings: &[&str]| {
        let out = dir.path().join(name);
        let output = simclr(["train", "--preset", "cifar10-fast", "--seed", seed])
            .args(tiny_flags(&data, &out))
            .args(["--epochs", "2"])
            .args(settings.iter().flat_map(|setting| ["--set", setting]))
            .env("RUST_LOG", "info")
            .run();
        assert_succeeds(&output);
        // The start line's `augment="device"` (coloured: the key and value apart).
        assert!(stderr(&output).contains(r#""device""#), "{}", stderr(&output));
        (out, stderr(&output))
    };
    // The second run also asks for what only CUDA does (a captured step,
    // deterministic cuDNN): the CPU runs without them, the same run. And
    // for the device augmentation on a thread of its own (a GPU's default,
    // which the CPU takes when told): the same batches, the same run.
    let cuda_only = ["train.cuda_graph=true", "train.deterministic=true", "augment.device_thread=true"];
    let ((first, _), (second, log), (other, _)) =
        (run("first", "3", &[]), run("second", "3", &cuda_only), run("other", "4", &[]));
    assert!(log.contains("train.cuda_graph is ignored on Cpu"), "{log}");
    assert_eq!(epoch_losses(&first).len(), 2);
    assert_same_run(&second, &first, "a second run from the same seed (CUDA's settings ignored or alike on the CPU)");
    assert_ne!(epoch_losses(&other), epoch_losses(&first), "another seed must give another run");

    // The step runs in bf16 on a CPU with bf16 instructions (as this
    // machine's may be; device.rs checks the detection against
    // /proc/cpuinfo), in fp32 on any other or when told; the summary says which.
    let precision = |run: &Path| run_summary(run)["precision"].as_str().unwrap().to_owned();
    let native = simclr::device::cpu_computes_bf16();
    assert_eq!(precision(&first), if native { "bf16" } else { "fp32" });
    let (fp32, _) = run("fp32", "3", &["train.mixed_precision=false"]);
    assert_eq!(precision(&fp32), "fp32");
    if native {
        assert!(encoder_difference(&fp32, &first) > 0.0, "fp32 trained the bf16 run's encoder");
    } else {
        assert_same_run(&fp32, &first, "fp32 asked for on a CPU that trains in fp32 anyway");
    }
}

#[test]
fn an_interrupted_run_resumes_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 12, 16);
    let straight = dir.path().join("straight");
    assert_succeeds(&three_epochs(&data, &straight).run());

    // Stopped after step 8, in the middle of epoch 2, as SIGINT/SIGTERM would.
    let stopped = dir.path().join("stopped");
    let first = three_epochs(&data, &stopped).env("SIMCLR_TEST_STOP_AFTER_STEPS", 8).run();
    assert_eq!(first.status.code(), Some(130), "{}", stderr(&first));
    assert!(stderr(&first).contains("simclr train --resume --output"), "{}", stderr(&first));
    assert!(!stopped.join("encoder.safetensors").exists());
    let resumed = simclr(["train", "--resume", "--output", &stopped.display().to_string()]).run();
    assert_succeeds(&resumed);

    assert_eq!(epoch_losses(&straight).len(), 3);
    assert_same_run(&stopped, &straight, "resuming mid-epoch");
    // The score at random init, measured by the first process, is still
    // reported at the end of the resumed one.
    let initial = |run: &Path| run_summary(run)["initial_knn_top1"].clone();
    assert!(initial(&straight).is_f64(), "{}", initial(&straight));
    assert_eq!(initial(&stopped), initial(&straight));
    assert!(String::from_utf8_lossy(&resumed.stdout).contains("at random init ->"));
}

#[test]
fn checkpoints_every_n_steps_or_minutes_bound_what_a_kill_loses() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 12, 16);
    // 3 epochs of 6 steps; by epochs, a checkpoint only at the end.
    let runs = |out: &Path, every: &str| {
        let epochs = ["--epochs", "3", "--set", "train.checkpoint_every=10"];
        tiny_run(&data, out).args(epochs).args(["--set", every])
    };
    let straight = dir.path().join("straight");
    assert_succeeds(&runs(&straight, "train.checkpoint_every_steps=0").run());
    // SIGKILLed once step 10 (the 4th of epoch 2) is done, before what
    // follows it: the last checkpoint is that of step 8 when one is due
    // every 4 steps, of step 9 when one is due every 1e-9 minutes (every
    // step), and the resume from it trains the same run.
    let kill_after_10 = |out: &Path, every: &str| {
        let first = runs(out, every).env("SIMCLR_TEST_KILL_AFTER_STEPS", 10).run();
        assert_eq!(first.status.signal(), Some(libc::SIGKILL), "{every}: {}", stderr(&first));
    };
    for (name, every, saved_at) in
        [("steps", "train.checkpoint_every_steps=4", 8), ("minutes", "train.checkpoint_every_minutes=1e-9", 9)]
    {
        let killed = dir.path().join(name);
        kill_after_10(&killed, every);
        assert_eq!(resume_step(&killed), saved_at, "{every}");
        assert_succeeds(&simclr(["train", "--resume", "--output", &killed.display().to_string()]).run());
        assert_same_run(&killed, &straight, &format!("a kill after step 10 with {every}"));
    }
    // The control: with neither, the kill leaves no checkpoint at all.
    let lost = dir.path().join("lost");
    kill_after_10(&lost, "train.checkpoint_every_minutes=0");
    assert_eq!(resume_step(&lost), 0);
    assert!(!lost.join("checkpoint.safetensors").exists());

    // Two processes vote on their clocks after every step and save alike
    // (both ranks are killed, and the launcher says so).
    let two = |out: &Path| runs(out, "train.checkpoint_every_minutes=1e-9").args(["--nproc-per-node", "2"]);
    let straight_on_two = dir.path().join("straight-on-two");
    assert_succeeds(&two(&straight_on_two).run());
    let killed = dir.path().join("killed-on-two");
    let first = two(&killed).env("SIMCLR_TEST_KILL_AFTER_STEPS", 10).run();
    assert!(!first.status.success() && stderr(&first).contains("rank"), "{}", stderr(&first));
    assert_eq!(resume_step(&killed), 9);
    assert_succeeds(&resumed(&killed, "2").run());
    assert_same_run(&killed, &straight_on_two, "a kill of both processes after step 10");
}

#[test]
fn a_run_its_launcher_restarts_continues_from_its_checkpoint() {
    // torchrun's agent (--max-restarts) and a SLURM requeue run the failed
    // command again as it was, counting restarts: it continues from the
    // folder's checkpoint, or starts anew where the run wrote none.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 12, 16);
    // 3 epochs of 6 steps, a checkpoint every 4, each process on one thread.
    let runs = |out: &Path| {
        let settings = ["--epochs", "3", "--set", "train.checkpoint_every_steps=4"];
        tiny_run(&data, out).args(settings).env("OMP_NUM_THREADS", 1).env("RUST_LOG", "info")
    };
    let straight = dir.path().join("straight");
    assert_succeeds(&runs(&straight).run());
    let requeued = dir.path().join("requeued");
    assert!(!runs(&requeued).env("SIMCLR_TEST_KILL_AFTER_STEPS", 2).run().status.success());
    assert_eq!(resume_step(&requeued), 0);
    let output = runs(&requeued).env("SLURM_RESTART_COUNT", 1).env("SIMCLR_TEST_KILL_AFTER_STEPS", 10).run();
    assert!(stderr(&output).contains("(SLURM_RESTART_COUNT=1): it starts anew"), "{}", stderr(&output));
    assert_eq!(resume_step(&requeued), 8);
    // The control: the command again, not restarted, refuses the run there.
    assert_fails_with(&runs(&requeued).run(), &["a run already exists here"]);
    let output = runs(&requeued).env("SLURM_RESTART_COUNT", 2).run();
    assert_succeeds(&output);
    assert!(stderr(&output).contains("it continues from its checkpoint"), "{}", stderr(&output));
    assert_same_run(&requeued, &straight, "a start anew and a requeue after a kill at step 10");

    // Two processes killed after step 10, started again by torchrun's
    // agent (its variables set by hand here): rank 0 alone reads the
    // folder, and both continue (neither scores the monitor at random init).
    let two = |out: &Path| runs(out).args(["--nproc-per-node", "2"]);
    let straight_on_two = dir.path().join("straight-on-two");
    assert_succeeds(&two(&straight_on_two).run());
    let killed = dir.path().join("killed-on-two");
    assert!(!two(&killed).env("SIMCLR_TEST_KILL_AFTER_STEPS", 10).run().status.success());
    assert_eq!(resume_step(&killed), 8);
    let port = free_port();
    let ranks: Vec<Child> = (0..2)
        .map(|rank| {
            runs(&killed)
                .env("RANK", rank)
                .env("LOCAL_RANK", rank)
                .env("WORLD_SIZE", 2)
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port)
                .env("TORCHELASTIC_RESTART_COUNT", 1)
                .spawn(|command| {
                    command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
                })
        })
        .collect();
    for child in ranks {
        assert_succeeds(&child.wait_with_output().unwrap());
    }
    assert_same_run(&killed, &straight_on_two, "a torchrun restart of two processes killed after step 10");
}

#[test]
fn fp16_training_keeps_its_loss_scale_across_a_resume() {
    // fp16 as a V100 or T4 trains (emulated on this CPU): the loss scaled
    // for the backward pass, the scale checkpointed with the optimiser.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 12, 16);
    let fp16 = ["--set", "train.mixed_precision_dtype=\"fp16\""];
    let straight = dir.path().join("straight");
    assert_succeeds(&three_epochs(&data, &straight).args(fp16).run());
    assert_eq!(run_summary(&straight)["precision"], "fp16");
    let scale = |run: &Path| {
        let tensors = simclr::io::load(&run.join("checkpoint.safetensors")).unwrap().tensors;
        tensors.get("optim.loss_scale").expect("the loss scale is checkpointed").double_value(&[])
    };
    // The first steps overflow at 2^16, as GradScaler's do, and halve it.
    let final_scale = scale(&straight);
    assert!(final_scale < 65536.0 && final_scale.log2().fract() == 0.0, "scale {final_scale}");
    let stopped = dir.path().join("stopped");
    let first = three_epochs(&data, &stopped).args(fp16).env("SIMCLR_TEST_STOP_AFTER_STEPS", 8).run();
    assert_eq!(first.status.code(), Some(130), "{}", stderr(&first));
    assert_succeeds(&simclr(["train", "--resume", "--output", &stopped.display().to_string()]).run());
    assert_same_run(&stopped, &straight, "resuming fp16 mid-epoch");
    assert_eq!(scale(&stopped), final_scale);
}

#[test]
fn micro_batches_train_and_resume_like_whole_batches() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 12, 16);
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        assert_succeeds(&three_epochs(&data, &out).args(extra).run());
        out
    };
    // A chunk of the whole batch (4 images) is today's step, bit for bit.
    let whole = run("whole", &[]);
    assert_same_run(&run("one-chunk", &["--micro-batch-size", "4"]), &whole, "a chunk of the batch");
    // Chunks of 2 normalise BatchNorm per chunk: another run (the exact
    // gradient is tested in the library), which resumes to the same result.
    let chunks = run("chunks", &["--micro-batch-size", "2"]);
    assert!(std::fs::read_to_string(chunks.join("config.toml")).unwrap().contains("micro_batch_size = 2"));
    assert_ne!(epoch_losses(&chunks), epoch_losses(&whole));
    let stopped = dir.path().join("stopped");
    let first = three_epochs(&data, &stopped).args(["--micro-batch-size", "2"]).env("SIMCLR_TEST_STOP_AFTER_STEPS", 8);
    assert_eq!(first.run().status.code(), Some(130));
    assert_succeeds(&simclr(["train", "--resume", "--output", &stopped.display().to_string()]).run());
    assert_same_run(&stopped, &chunks, "resuming a run in chunks");
    assert_fails_with(
        &three_epochs(&data, &dir.path().join("bad")).args(["--micro-batch-size", "0"]).run(),
        &["train.micro_batch_size = 0"],
    );
}

#[test]
fn non_finite_steps_are_skipped_and_a_run_of_them_stops() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 12, 16);
    let poisoned = |out: &Path, steps: &str| three_epochs(&data, out).env("SIMCLR_TEST_POISON_STEPS", steps).run();
    let one = dir.path().join("one");
    let output = poisoned(&one, "2");
    assert_succeeds(&output);
    assert!(String::from_utf8_lossy(&output.stdout).contains("skipped 1 steps"));
    assert!(stderr(&output).contains("non-finite"), "the skip is reported:\n{}", stderr(&output));
    assert!(epoch_losses(&one).iter().all(|l| l.is_finite()));

    // Five in a row (the default limit) in epoch 2: the run stops, and the
    // checkpoint of epoch 1 is intact and resumable.
    let many = dir.path().join("many");
    let output = poisoned(&many, "7,8,9,10,11");
    assert_fails_with(&output, &["5 steps in a row", "learning rate", "checkpoint.safetensors"]);
    assert_eq!(epoch_losses(&many).len(), 1);
    assert_succeeds(&simclr(["train", "--resume", "--output", &many.display().to_string()]).run());
    assert_eq!(epoch_losses(&many).len(), 3);

    // A checkpoint keeps the count: stopped after the skipped step and
    // resumed, the run is the uninterrupted one, its skip reported.
    let resume = |out: &Path, poison: &str| {
        let run = simclr(["train", "--resume", "--output", &out.display().to_string()]);
        run.env("SIMCLR_TEST_POISON_STEPS", poison).run()
    };
    let stopped = dir.path().join("stopped");
    let first =
        three_epochs(&data, &stopped).env("SIMCLR_TEST_POISON_STEPS", "2").env("SIMCLR_TEST_STOP_AFTER_STEPS", 4).run();
    assert_eq!(first.status.code(), Some(130), "{}", stderr(&first));
    assert_succeeds(&resume(&stopped, "2"));
    assert_eq!(run_summary(&stopped)["skipped_steps"], 1);
    assert_same_run(&stopped, &one, "a stop after a skipped step");
    // And the streak: three in a row before a stop and two after make the
    // five at which the uninterrupted run stops.
    let streak = dir.path().join("streak");
    let first = three_epochs(&data, &streak)
        .env("SIMCLR_TEST_POISON_STEPS", "7,8,9,10,11")
        .env("SIMCLR_TEST_STOP_AFTER_STEPS", 9)
        .run();
    assert_eq!(first.status.code(), Some(130), "{}", stderr(&first));
    assert_fails_with(&resume(&streak, "7,8,9,10,11"), &["5 steps in a row (up to step 11)"]);
}

#[test]
fn sigterm_checkpoints_and_says_how_to_resume_and_a_run_keeps_its_folder_to_itself() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 12, 16);
    let out = dir.path().join("run");
    let child = tiny_run(&data, &out).args(["--epochs", "200"]).spawn(|command| {
        command.stderr(std::process::Stdio::piped());
    });
    // Wait until training is under way (the first epoch is logged).
    let started = std::time::Instant::now();
    while !out.join("metrics.jsonl").exists() {
        assert!(started.elapsed().as_secs() < 60, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // While it trains, no other run trains in its folder (before the lock,
    // one started and both wrote there).
    let pid = child.id().to_string();
    let second = tiny_run(&data, &out).run();
    assert_fails_with(&second, &["run folder", &format!("another process (pid {pid}) is training there")]);
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    assert!(stderr(&output).contains("--resume"), "{}", stderr(&output));
    // The checkpoint it wrote is whole: the run continues from it.
    assert_succeeds(&simclr(["train", "--resume", "--output", &out.display().to_string(), "--epochs", "2"]).run());
}

#[test]
fn a_damaged_or_missing_checkpoint_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 12, 16);
    let out = dir.path().join("run");
    assert_succeeds(&three_epochs(&data, &out).args(["--epochs", "2"]).run());
    let (latest, previous) = (out.join("checkpoint.safetensors"), out.join("checkpoint.prev.safetensors"));
    assert!(latest.is_file() && previous.is_file(), "the previous checkpoint is kept");

    // Flip one byte of the tensor data: the checksum catches it.
    let mut bytes = std::fs::read(&latest).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    std::fs::write(&latest, bytes).unwrap();
    let out_arg = out.display().to_string();
    let resumed = simclr(["train", "--resume", "--output", &out_arg, "--epochs", "3"]).run();
    assert_succeeds(&resumed);
    for needle in ["checksum mismatch", "previous checkpoint"] {
        assert!(stderr(&resumed).contains(needle), "warning should say '{needle}':\n{}", stderr(&resumed));
    }
    // Epoch 2 was redone from epoch 1's checkpoint; the log holds each epoch once.
    assert_eq!(epoch_losses(&out).len(), 3);

    // The latest checkpoint gone, with no new one written: the previous one.
    std::fs::remove_file(&latest).unwrap();
    assert_succeeds(&simclr(["train", "--resume", "--output", &out_arg, "--epochs", "4"]).run());
    assert_eq!(epoch_losses(&out).len(), 4);

    // A kill between the write of a new checkpoint and its renames leaves
    // it whole beside the others: it is the newest, the resume continues
    // from it and finishes its save. Killed after the latest moved aside
    // (epoch 4's checkpoint new, epoch 3's previous, no latest):
    let fresh = out.join("checkpoint.safetensors.new");
    let epoch_of = |path: &Path| simclr::train::checkpoint::Checkpoint::read(path).unwrap().position.epoch;
    std::fs::rename(&latest, &fresh).unwrap();
    assert!(simclr::train::checkpoint::exists(&latest), "a new checkpoint alone is a run");
    let resumed = simclr(["train", "--resume", "--output", &out_arg, "--epochs", "5"]).env("RUST_LOG", "info").run();
    assert_succeeds(&resumed);
    for needle in ["save was cut short", "epoch=4"] {
        assert!(stderr(&resumed).contains(needle), "the resume should say '{needle}':\n{}", stderr(&resumed));
    }
    assert!(!stderr(&resumed).contains("previous checkpoint"), "{}", stderr(&resumed));
    assert!(!fresh.exists(), "the cut save was finished");
    assert_eq!((epoch_of(&latest), epoch_of(&previous)), (5, 4));
    assert_eq!(epoch_losses(&out).len(), 5);
    // Killed before the latest moved aside (epoch 5's checkpoint new, epoch
    // 4's the latest): the resume finishes the save, and epoch 4's moves aside.
    std::fs::rename(&latest, &fresh).unwrap();
    std::fs::copy(&previous, &latest).unwrap();
    let resumed = simclr(["train", "--resume", "--output", &out_arg, "--epochs", "6"]).env("RUST_LOG", "info").run();
    assert_succeeds(&resumed);
    for needle in ["save was cut short", "epoch=5"] {
        assert!(stderr(&resumed).contains(needle), "the resume should say '{needle}':\n{}", stderr(&resumed));
    }
    assert_eq!((epoch_of(&latest), epoch_of(&previous)), (6, 5));
    assert_eq!(epoch_losses(&out).len(), 6);
}

/// `--init-encoder`: pretraining goes on from another run's encoder. At a
/// learning rate of 1e-30 no weight moves by more than about 1e-30, so a
/// run started from the first run's encoder ends with its weights (not its
/// BatchNorm running statistics, which training updates at any rate), and
/// its kNN monitor scores it, before training, as the first run's scored it
/// after. The encoder file and the run's checkpoint both serve, the latter
/// on two processes (rank 0 reads the file; rank 1's half of the monitor's
/// features shows it computed with the same weights); a file of another
/// network is refused before the run folder is made.
#[test]
fn a_run_starts_its_encoder_from_another_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    let first = dir.path().join("first");
    assert_succeeds(&tiny_run(&data, &first).args(["--epochs", "2"]).run());
    let weights_moved = |run: &Path| {
        let (ours, theirs) = (simclr::io::load(&run.join("encoder.safetensors")).unwrap().tensors, {
            simclr::io::load(&first.join("encoder.safetensors")).unwrap().tensors
        });
        let weights = theirs.iter().filter(|(name, _)| !name.contains("running_") && !name.contains("num_batches"));
        weights.map(|(name, tensor)| (&ours[name] - tensor).abs().max().double_value(&[])).fold(0.0, f64::max)
    };
    let from = |weights: &Path, run: &Path| {
        let weights = weights.display().to_string();
        tiny_run(&data, run).args(["--seed", "7", "--set", "optim.learning_rate=1e-30", "--init-encoder", &weights])
    };
    let two_processes = ["--nproc-per-node", "2"];
    // The run's folder stands for its checkpoint, which the run records.
    let (encoder, checkpoint) = (first.join("encoder.safetensors"), first.join("checkpoint.safetensors"));
    for (given, weights, flags) in
        [(&encoder, &encoder, &[][..]), (&checkpoint, &checkpoint, &two_processes[..]), (&first, &checkpoint, &[][..])]
    {
        let run = dir.path().join(format!("from-{}", given.file_stem().unwrap().to_string_lossy()));
        let started = from(given, &run).args(flags).run();
        assert_succeeds(&started);
        let said = format!("with the encoder of {}", weights.display());
        assert!(
            String::from_utf8_lossy(&started.stdout).contains(&said),
            "{}",
            String::from_utf8_lossy(&started.stdout)
        );
        let moved = weights_moved(&run);
        assert!(moved < 1e-20, "{}: the encoder's weights moved by {moved}", weights.display());
        let (summary, first_summary) = (run_summary(&run), run_summary(&first));
        assert_eq!(summary["initial_knn_top1"], first_summary["final_knn_top1"], "{}", weights.display());
        assert_eq!(summary["init_encoder"], weights.display().to_string());
        assert!(std::fs::read_to_string(run.join("config.toml")).unwrap().contains("init_encoder"));
    }
    // Negative control: the same run from a random init ends elsewhere.
    let random = dir.path().join("random");
    assert_succeeds(&tiny_run(&data, &random).args(["--seed", "7", "--set", "optim.learning_rate=1e-30"]).run());
    assert!(weights_moved(&random) > 1e-3, "{}", weights_moved(&random));

    let other = dir.path().join("other");
    let refused = from(&first.join("encoder.safetensors"), &other).args(["--set", "model.width_multiplier=0.25"]).run();
    assert_fails_with(
        &refused,
        &["first/encoder.safetensors", "records resnet18 at 0.125x", "builds resnet18 at 0.25x"],
    );
    let missing = from(&dir.path().join("none.safetensors"), &other).run();
    assert_fails_with(&missing, &["none.safetensors"]);
    assert!(!other.exists(), "a refused run makes no folder");
}

/// `simclr export`: the TorchScript module, loaded as `torch.jit.load`
/// loads it (libtorch's loader, through tch), gives the features `embed`
/// writes of the same images from their RGB values in [0, 1] (PNGs at the
/// encoder's size: the same pixels on both sides, nothing resized): h from
/// the encoder file, z from the run's checkpoint. A head layer of an
/// encoder file is refused, and nothing is written.
#[test]
fn an_exported_module_gives_the_features_embed_writes() {
    use simclr::tch::{CModule, Kind, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 4, 16);
    let run = dir.path().join("run");
    assert_succeeds(&tiny_training(&data, &run).run());
    let text = |path: &Path| path.display().to_string();
    for (weights, layer) in [(run.join("encoder.safetensors"), "h"), (run.join("checkpoint.safetensors"), "z")] {
        let module = dir.path().join(format!("{layer}.pt"));
        let exported =
            simclr(["export", "--weights", &text(&weights), "--layer", layer, "--output", &text(&module)]).run();
        assert_succeeds(&exported);
        let said = String::from_utf8_lossy(&exported.stdout).into_owned();
        assert!(said.contains("forward(images) takes [N, 3, H, W] RGB floats in [0, 1]"), "{said}");
        let features = dir.path().join(format!("{layer}.npy"));
        let embed = ["embed", "--weights", &text(&weights), "--layer", layer, "--device", "cpu"];
        assert_succeeds(&simclr(embed).args(["--input", &text(&data), "--output", &text(&features)]).run());

        let ours = Tensor::read_npy(&features).unwrap();
        let paths = std::fs::read_to_string(dir.path().join(format!("{layer}.paths.txt"))).unwrap();
        let images: Vec<Tensor> = paths
            .lines()
            .map(|path| {
                let image = image::open(path).unwrap().to_rgb8();
                let (width, height) = (image.width() as i64, image.height() as i64);
                let pixels = Tensor::from_slice(image.as_raw()).view([height, width, 3]).permute([2, 0, 1]);
                pixels.to_kind(Kind::Float) / 255.0
            })
            .collect();
        let theirs = CModule::load(&module).unwrap().forward_ts(&[Tensor::stack(&images, 0)]).unwrap();
        assert_eq!(theirs.size(), ours.size(), "{layer}");
        let scale = ours.abs().max().double_value(&[]);
        let difference = (&theirs - &ours).abs().max().double_value(&[]) / scale;
        assert!(scale > 0.0 && difference < 1e-5, "{layer}: {difference:e} of {scale}");
    }
    let refused = dir.path().join("refused.pt");
    let weights = text(&run.join("encoder.safetensors"));
    let output = simclr(["export", "--weights", &weights, "--layer", "z", "--output", &text(&refused)]).run();
    assert_fails_with(&output, &["checkpoint"]);
    assert!(!refused.exists());
}

#[test]
fn the_skip_policy_trains_embeds_and_evaluates_without_unreadable_images() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    let mut jpeg = Vec::new();
    RgbImage::new(16, 16).write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
    std::fs::write(data.join("bars").join("broken.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    let out = dir.path().join("run");
    let output = tiny_run(&data, &out).args(["--set", "data.on_bad_image=skip"]).run();
    assert_succeeds(&output);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(stdout.contains("skipped 1 unreadable image:") && stdout.contains("broken.jpg"), "{stdout}");
    assert!(stderr(&output).contains("skipping unreadable image"), "reported when met:\n{}", stderr(&output));
    let summary = run_summary(&out);
    let listed = summary["skipped_images"].as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].as_str().unwrap().contains("broken.jpg"));

    // The run's encoder over the same 13 files: embed, neighbors and eval
    // stop at the broken one, or leave it out under --on-bad-image skip.
    let (data_arg, features) = (data.display().to_string(), dir.path().join("features.npy"));
    let encoder = encoder_flags(&out.join("encoder.safetensors"), "resnet18", "0.125");
    let features_arg = features.display().to_string();
    let embed = || simclr(["embed", "--input", &data_arg, "--output", &features_arg]).args(&encoder);
    assert_fails_with(&embed().run(), &["broken.jpg"]);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!left.iter().any(|name| name.to_string_lossy().starts_with("features")), "left behind: {left:?}");
    let output = embed().args(["--on-bad-image", "skip", "--batch-size", "5"]).run();
    assert_succeeds(&output);
    assert!(String::from_utf8_lossy(&output.stdout).contains("skipped 1 unreadable image:\n  "));
    assert_eq!(npy_shape(&features), [12, 64]);
    let paths = std::fs::read_to_string(dir.path().join("features.paths.txt")).unwrap();
    assert_eq!(paths.lines().count(), 12);
    assert!(!paths.contains("broken"), "{paths}");

    let bars = data.join("bars").display().to_string();
    let neighbors = simclr(["neighbors", "--index", &data_arg, "--query", &bars, "--k", "12"]).args(&encoder);
    assert_fails_with(&neighbors.clone().run(), &["broken.jpg"]);
    let output = neighbors.args(["--on-bad-image", "skip"]).run();
    assert_succeeds(&output);
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(table.lines().count(), 1 + 6 * 12, "6 readable queries, 12 readable images each:\n{table}");
    assert!(!table.contains("broken") && stderr(&output).contains("skipped 2 unreadable images:"), "{table}");

    let knn = simclr(["eval", "knn", "--train", &data_arg, "--test", &data_arg, "--k", "3"]).args(&encoder);
    assert_fails_with(&knn.clone().run(), &["broken.jpg"]);
    let output = knn.args(["--on-bad-image", "skip"]).run();
    assert_succeeds(&output);
    assert!(String::from_utf8_lossy(&output.stdout).contains("12 labelled of 12 train / 12 test images"));
    assert!(stderr(&output).contains("skipped 2 unreadable images:"), "{}", stderr(&output));
    // Linear leaves it out as its features are computed, fine-tuning before
    // it trains: the same counts.
    let skip = ["--on-bad-image", "skip", "--epochs", "1"];
    for (protocol, labelled) in [("linear", "12 labelled"), ("finetune", "6 labelled")] {
        let output = simclr(["eval", protocol, "--train", &data_arg, "--test", &data_arg]).args(&encoder).args(skip);
        let output = match protocol {
            "finetune" => output.args(["--fraction", "0.5", "--batch-size", "4"]).run(),
            _ => output.run(),
        };
        assert_succeeds(&output);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(stdout.contains(&format!("{labelled} of 12 train / 12 test images")), "{protocol}: {stdout}");
        assert!(stderr(&output).contains("skipped 2 unreadable images:"), "{protocol}: {}", stderr(&output));
    }
}

/// A file in `dir` whose name starts with `prefix`, if any.
fn file_starting(dir: &Path, prefix: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
}

/// Whatever checkpoint a killed run left must load: the latest whenever it
/// exists, and through the fallback in any case.
fn assert_checkpoint_usable(run: &Path) {
    use simclr::train::checkpoint::{self, Checkpoint};
    let latest = run.join(checkpoint::FILE_NAME);
    if latest.exists() {
        if let Err(error) = Checkpoint::read(&latest) {
            panic!("the latest checkpoint is unreadable after a kill: {error}");
        }
    }
    if checkpoint::exists(&latest) {
        Checkpoint::read_latest(&latest).unwrap();
    }
}

/// Which checkpoint file a run folder holds now: a new one replaces the
/// old by a rename, so its inode changes with every checkpoint written.
fn checkpoint_identity(run: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(run.join("checkpoint.safetensors")).ok().map(|m| m.ino())
}

/// Waits, polling, until `ready` holds; `alive(what)` fails the test if
/// the run has ended first.
fn wait_until(what: &str, ready: &dyn Fn() -> bool, alive: &mut dyn FnMut(&str)) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !ready() {
        alive(what);
        assert!(std::time::Instant::now() < deadline, "waited 120 s for {what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A kill point set by the run's progress, not the clock, so that it falls
/// at the same places on a fast machine, a slow one and a busy one: waits,
/// polling, until the run in `run` replaces the checkpoint it had as
/// `before` (read before it started), then for a `fraction` in [0, 1) of
/// the epoch the run has just timed (in the next epoch's steps, its kNN
/// monitor or its checkpoint write), or until its checkpoint after that if
/// that comes first (the epoch just timed was slower than the next, as a
/// resumed run's first one is): a kill there advances the run two epochs
/// at most. `alive(what)` fails the test if the run has ended before `what`.
fn wait_for_kill_point(run: &Path, before: Option<u64>, fraction: f64, alive: &mut dyn FnMut(&str)) {
    wait_until("its next checkpoint", &|| checkpoint_identity(run) != before, alive);
    let written = checkpoint_identity(run);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last = serde_json::from_str::<serde_json::Value>(metrics.lines().last().unwrap()).unwrap();
    let epoch = std::time::Duration::from_secs_f64(last["seconds"].as_f64().unwrap());
    let kill_at = std::time::Instant::now() + epoch.mul_f64(fraction);
    while std::time::Instant::now() < kill_at && checkpoint_identity(run) == written {
        alive("its kill point");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    alive("its kill point");
}

#[test]
fn sigkill_at_random_points_never_loses_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 12, 16);
    // 12 epochs of 6 steps, a checkpoint after each: each round below
    // advances the run by at most two epochs, so every round finds it
    // running and kills it.
    let runs = |out: &Path| tiny_run(&data, out).args(["--epochs", "12", "--set", "train.checkpoint_every=1"]);
    let straight = dir.path().join("straight");
    assert_succeeds(&runs(&straight).run());
    let killed = dir.path().join("killed");
    // What every round's run printed, for the message of a failure.
    let log = dir.path().join("rounds.log");
    let history = || std::fs::read_to_string(&log).unwrap_or_default();
    let start = |pause_ms: u64| {
        let run = if simclr::train::checkpoint::exists(&killed.join("checkpoint.safetensors")) {
            simclr(["train", "--resume", "--output", &killed.display().to_string()])
        } else {
            runs(&killed)
        };
        run.env("RUST_LOG", "info").env("SIMCLR_TEST_WRITE_PAUSE_MS", pause_ms).spawn(|command| {
            command.stdout(std::process::Stdio::null());
            command.stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap());
        })
    };
    let assert_running = |child: &mut std::process::Child, before: &str| {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before {before}; the rounds printed:\n{}", history());
        }
    };
    // Kill points, alternating: a seeded fraction of an epoch after the run
    // writes its next checkpoint (`wait_for_kill_point`); and the middle of
    // a checkpoint write (the write pauses halfway for 3 s, and the test
    // kills the process as soon as the half-written file appears).
    let mut state = 0x5EED_u64;
    let mut next_fraction = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) % 1000) as f64 / 1000.0
    };
    for round in 0..8 {
        let mid_write = round % 2 == 1;
        // The newest whole checkpoint: where a kill fell after a save's
        // write and before its renames (a timed kill's poll ends as the old
        // file moves away), the `.new` one, which the next start puts in
        // place before anything else.
        let newest = ["checkpoint.safetensors.new", "checkpoint.safetensors"];
        let before = newest.iter().find_map(|name| std::fs::read(killed.join(name)).ok());
        let identity = checkpoint_identity(&killed);
        let mut child = start(if mid_write { 3000 } else { 0 });
        if mid_write {
            // This process's temporary file (it carries the process's id),
            // not one an earlier kill left.
            let temporary = format!("checkpoint.safetensors.new.tmp{}", child.id());
            let began = || killed.join(&temporary).exists();
            wait_until("a checkpoint write to begin", &began, &mut |what| assert_running(&mut child, what));
            child.kill().unwrap();
            child.wait().unwrap();
            // The interrupted write touched nothing but its temporary file.
            assert_eq!(std::fs::read(killed.join("checkpoint.safetensors")).ok(), before);
        } else {
            wait_for_kill_point(&killed, identity, next_fraction(), &mut |what| assert_running(&mut child, what));
            child.kill().unwrap();
            child.wait().unwrap();
        }
        assert_checkpoint_usable(&killed);
    }
    // Finish the run: the same losses, epoch by epoch, and the same weights.
    let finish = start(0).wait_with_output().unwrap();
    assert!(finish.status.success() || killed.join("encoder.safetensors").exists());
    if !killed.join("encoder.safetensors").exists() {
        let finish = start(0).wait_with_output().unwrap();
        assert!(finish.status.success());
    }
    assert_same_run(&killed, &straight, "4 timed and 4 mid-write kills");
    // The half-written files of the kills mid-write are gone (each resume
    // removes those before it).
    let left: Vec<String> = [killed.clone(), killed.join("encoders")]
        .iter()
        .flat_map(|folder| std::fs::read_dir(folder).unwrap())
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| simclr::io::temporary_target(name).is_some())
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

#[test]
fn a_full_disk_keeps_the_previous_checkpoint_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 4, 16);
    let out = dir.path().join("run");
    assert_succeeds(&tiny_run(&data, &out).run());
    let checkpoint = out.join("checkpoint.safetensors");
    let before = std::fs::read(&checkpoint).unwrap();
    // Files may grow to half a checkpoint: the next one cannot be written.
    let limit_kib = before.len() / 2 / 1024;
    let args = ["train", "--resume", "--epochs", "2", "--output", &out.display().to_string()].map(String::from);
    let output = simclr(&args).limits(&format!("ulimit -f {limit_kib}")).run();
    assert_fails_with(
        &output,
        &["checkpoint.safetensors", "cannot write a new checkpoint", "disk is full", "previous checkpoint"],
    );
    assert_eq!(std::fs::read(&checkpoint).unwrap(), before, "the previous checkpoint changed");
    assert!(file_starting(&out, "checkpoint.safetensors.new").is_none(), "a partial file was left behind");
    // With room again, the run continues from it.
    assert_succeeds(&simclr(args.iter().map(String::as_str).collect::<Vec<_>>()).run());
    assert_eq!(epoch_losses(&out).len(), 2);
}

#[test]
fn out_of_memory_names_the_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // A full-width ResNet-18 on 128 views of 160 px needs several GB of
    // activations; the address space is capped at 3 GB.
    let args = [
        "train",
        "--preset",
        "demo",
        "--output",
        &out.display().to_string(),
        "--batch-size",
        "64",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--set",
        "data.image_size=160",
        "--set",
        "data.synthetic_images=64",
        "--set",
        "model.width_multiplier=1.0",
        "--set",
        "train.knn_every=0",
    ]
    .map(String::from);
    let output = simclr(&args).limits("ulimit -v 3000000").run();
    assert_fails_with(&output, &["out of memory", "batch of 64 images (128 views)", "train.batch_size"]);
    // The same step in `simclr bench`.
    let bench = ["bench", "--arch", "resnet18", "--stem", "cifar", "--image-size", "160", "--batch-size", "64"];
    let output = simclr([&bench[..], &["--steps", "1", "--warmup", "1", "--device", "cpu"]].concat())
        .limits("ulimit -v 3000000")
        .run();
    assert_fails_with(&output, &["out of memory", "batch of 64 images (128 views)", "--micro-batch-size"]);
}

#[test]
fn knn_every_0_keeps_no_monitor() {
    // train.knn_every = 0 is "never": no score at random init either, and
    // the monitor's images are never read (a broken one is not met).
    let dir = tempfile::tempdir().unwrap();
    let (data, monitored) = (dir.path().join("data"), dir.path().join("monitored"));
    image_folder(&data, 4, 16);
    image_folder(&monitored, 4, 16);
    std::fs::write(monitored.join("bars").join("broken.jpg"), b"not a jpeg").unwrap();
    let run = |name: &str, every: &str| {
        let out = dir.path().join(name);
        let knn_every = format!("train.knn_every={every}");
        (tiny_training(&data, &out).args(monitor_flags(&monitored)).args(["--set", &knn_every]).run(), out)
    };
    let (output, out) = run("never", "0");
    assert_succeeds(&output);
    let summary = run_summary(&out);
    assert!(summary["initial_knn_top1"].is_null() && summary["final_knn_top1"].is_null(), "{summary}");
    // The control: a monitor that runs meets the broken image.
    assert_fails_with(&run("every-epoch", "1").0, &["broken.jpg"]);
}

#[test]
fn a_time_budget_sizes_the_run_after_its_first_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 4, 16);
    let out = dir.path().join("run");
    // One epoch takes far longer than 1 ms: the budget fits only the first.
    let args = tiny_run(&data, &out).args(["--epochs", "5", "--set", "train.time_budget_seconds=0.001"]);
    let output = args.run();
    assert_succeeds(&output);
    assert_eq!(epoch_losses(&out).len(), 1);
    // The plan is saved with the run, so a resume keeps it.
    let saved = simclr::train::checkpoint::Checkpoint::read(&out.join("checkpoint.safetensors")).unwrap().config;
    assert_eq!((saved.train.epochs, saved.train.time_budget_seconds), (1, None));
    assert_fails_with(
        &tiny_run(&data, &dir.path().join("bad")).args(["--set", "train.time_budget_seconds=-1"]).run(),
        &["train.time_budget_seconds = -1"],
    );
}

#[test]
fn a_run_trains_on_views_smaller_than_the_images_it_is_scored_on() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 4, 16);
    let out = dir.path().join("run");
    let output = tiny_run(&data, &out).args(["--set", "augment.view_size=8"]).run();
    assert_succeeds(&output);
    // The encoder is recorded for the images' size, which eval reads by default.
    let metadata = simclr::io::load(&out.join("encoder.safetensors")).unwrap().metadata;
    assert!(metadata.values().any(|value| value.contains("\"image_size\":16")), "{metadata:?}");
    assert_fails_with(
        &tiny_run(&data, &dir.path().join("bad")).args(["--set", "augment.view_size=4"]).run(),
        &["augment.view_size = 4: must be at least 8"],
    );
}

/// The largest difference between the tensors of two runs' encoders,
/// relative to the largest magnitude of each tensor.
fn encoder_difference(run: &Path, reference: &Path) -> f64 {
    let (ours, theirs) = encoders(run, reference);
    largest_difference(&ours, &theirs, "")
}

/// The tensors of two runs' `encoder.safetensors`, as many in each.
fn encoders(run: &Path, reference: &Path) -> (Tensors, Tensors) {
    let encoder = |run: &Path| simclr::io::load(&run.join("encoder.safetensors")).unwrap().tensors;
    let (ours, theirs) = (encoder(run), encoder(reference));
    assert_eq!(ours.len(), theirs.len());
    (ours, theirs)
}

/// The largest difference between same-named tensors whose names start
/// with `prefix`, each relative to the reference tensor's largest magnitude.
fn largest_difference(ours: &Tensors, theirs: &Tensors, prefix: &str) -> f64 {
    theirs
        .iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(name, expected)| {
            let scale = expected.abs().max().double_value(&[]).max(1e-12);
            (&ours[name] - expected).abs().max().double_value(&[]) / scale
        })
        .fold(0.0, f64::max)
}

type Tensors = std::collections::HashMap<String, simclr::tch::Tensor>;

/// The distance between two runs' encoders as one vector of every tensor:
/// the norm of the difference over the norm of the reference's.
///
/// Not [`encoder_difference`] where fp32 runs sum in different orders: a
/// BatchNorm shift feeding a convolution and another BatchNorm has a
/// gradient of nearly zero, a sum of large terms over every position, so its
/// rounding alone moves that bias by up to 13% of its own size in 12 steps
/// (1 thread against 2, measured on an AMD EPYC) while the encoder as a
/// whole moves 1.1e-3 of its norm.
fn encoder_distance(run: &Path, reference: &Path) -> f64 {
    use simclr::tch::{Kind, Tensor};
    let (ours, theirs) = encoders(run, reference);
    let squared = |t: &Tensor| t.square().sum(Kind::Double).double_value(&[]);
    let (apart, size) = theirs
        .iter()
        .filter(|(_, expected)| expected.is_floating_point())
        .map(|(name, expected)| {
            let expected = expected.to_kind(Kind::Double);
            (squared(&(ours[name].to_kind(Kind::Double) - &expected)), squared(&expected))
        })
        .fold((0.0, 0.0), |(a, s), (da, ds)| (a + da, s + ds));
    (apart / size).sqrt()
}

/// fp32 round-off by [`largest_difference`] between runs that sum in
/// different orders, over a few steps: supervised training on 2 processes
/// against 1 after 2 steps measured 7.9e-6 and 1.4e-5 on two machines.
const PROCESSES_TOLERANCE: f64 = 5e-4;

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
}

/// fp32 rounding of an encoder by [`encoder_distance`] after the 6 steps of
/// [`two_processes_train_the_encoder_of_one`]: 1 process on 1 thread
/// against 2 threads measured 6.6e-6 to 1.5e-4 over seeds 0-5, 2 processes
/// against 1 1.2e-7 to 4.3e-5; per-process BatchNorm 2.6e-2 to 3.5e-2.
const ENCODER_ROUNDING: f64 = 1e-3;

/// The runs the bounds above were measured on are fp32: on a CPU with bf16
/// instructions the step would run in bf16, whose rounding is 2^16 times
/// coarser (measured there, 2 epochs of 15 steps: 2 bf16 processes 2.3e-2
/// from 1 by [`encoder_distance`], bf16 2.0e-2 from fp32 on 1 process,
/// fp32 on 2 processes 3.0e-3 from 1).
const FP32: [&str; 2] = ["--set", "train.mixed_precision=false"];

#[test]
fn two_processes_train_the_encoder_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 12, 16);
    // With the kNN monitor, whose work the two processes share.
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let output = tiny_run(&data, &out).args(FP32).args(extra).run();
        assert_succeeds(&output);
        out
    };
    let one = run("one", &[]);
    let two = run("two", &["--nproc-per-node", "2"]);
    let knn = epoch_field(&two, "knn_top1");
    assert!(knn.iter().all(serde_json::Value::is_f64), "kNN top-1 of 2 processes: {knn:?}");
    assert_eq!(knn, epoch_field(&one, "knn_top1"));
    let summary = run_summary(&two);
    assert!(summary["initial_knn_top1"].is_f64(), "{summary}");
    let files = ["checkpoint.safetensors", "encoder.safetensors", "metrics.jsonl", "metrics.tfevents", "config.toml"];
    for file in files.iter().chain(&["summary.json"]) {
        assert!(two.join(file).is_file(), "{file} missing");
    }
    // Rank 0 alone logs: the events of as many scalars, of one size each.
    let size = |run: &Path| std::fs::metadata(run.join("metrics.tfevents")).unwrap().len();
    assert_eq!(size(&two), size(&one));
    let distance = encoder_distance(&two, &one);
    eprintln!("2 processes against 1: encoder {distance:e} apart");
    assert!(distance < ENCODER_ROUNDING, "2 processes differ from 1 by {distance:e}");
    let (losses_two, losses_one) = (epoch_losses(&two), epoch_losses(&one));
    assert_eq!(losses_two.len(), losses_one.len());
    for (a, b) in losses_two.iter().zip(&losses_one) {
        assert!((a - b).abs() < 1e-4 * b.abs(), "epoch losses {losses_two:?} against {losses_one:?}");
    }
    // Negative control: per-process BatchNorm is a different computation.
    let per_device = run("per-device", &["--nproc-per-node", "2", "--set", "train.sync_batch_norm=false"]);
    let distance = encoder_distance(&per_device, &one);
    eprintln!("per-process BatchNorm against 1 process: {distance:e}");
    assert!(distance > 10.0 * ENCODER_ROUNDING, "per-process BatchNorm went unnoticed: {distance:e}");
}

#[test]
fn two_processes_evaluate_as_one() {
    // kNN and linear evaluation with the features (and kNN's votes) shared
    // between 2 processes against 1, and fine-tuning with each batch shared:
    // the same report, with a broken image
    // in the second process's part left out under the skip policy. The
    // features of a part come from other batches than one process's, so a
    // score could move by a rounding; on these 23 images it does not. With
    // every image voting nearly alike (k 30, temperature 100) the larger
    // class (12 blocks against 11 bars) wins every vote, while the first
    // process's part of the bank (11 bars and a block) alone would make the
    // bars win: each query's neighbours must come from every part.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 12, 16);
    std::fs::remove_file(data.join("bars").join("011.png")).unwrap();
    std::fs::write(data.join("blocks").join("broken.jpg"), b"not a jpeg").unwrap();
    let data = data.display().to_string();
    let encoder = ["--random-init", "--arch", "resnet18", "--width", "0.125", "--stem", "cifar", "--image-size", "16"];
    let eval = |protocol: &str, extra: &[&str]| {
        let flags = ["--train", &data, "--test", &data, "--device", "cpu", "--on-bad-image", "skip"];
        simclr(["eval", protocol]).args(encoder).args(flags).args(extra)
    };
    // Fine-tuning in batches of 7 cut 3 + 4 (BatchNorm's statistics weighted by the parts).
    let cases = [
        ("knn", &["--k", "5"][..]),
        ("knn", &["--k", "30", "--temperature", "100"]),
        ("linear", &["--epochs", "5"]),
        // On crops and flips through the frozen encoder, batches of 7 cut 3 + 4.
        ("linear", &["--epochs", "2", "--augment", "--batch-size", "7"]),
        // Half the labels, drawn among the readable images as fine-tuning draws them.
        ("knn", &["--k", "5", "--fraction", "0.5"]),
        ("finetune", &["--fraction", "1", "--epochs", "2", "--batch-size", "7"]),
    ];
    for (case, (protocol, extra)) in cases.into_iter().enumerate() {
        let report = |processes: &[&str]| {
            let json = dir.path().join(format!("{case}-{}.json", processes.len()));
            let output = eval(protocol, extra).args(["--output", json.to_str().unwrap()]).args(processes).run();
            assert_succeeds(&output);
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            assert_eq!(stdout.lines().filter(|line| line.contains("top-1")).count(), 1, "one report:\n{stdout}");
            let mut report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
            report.as_object_mut().unwrap().remove("seconds");
            report
        };
        let (one, two) = (report(&[]), report(&["--nproc-per-node", "2"]));
        assert_eq!(two, one, "{protocol} {extra:?}");
        let named = if extra.contains(&"--augment") { format!("{protocol}-augmented") } else { protocol.to_owned() };
        assert_eq!(one["protocol"], named.as_str());
        assert_eq!((&one["train_images"], &one["skipped"].as_array().unwrap().len()), (&23.into(), &2));
    }
    // Under the stop policy an image one process cannot read stops both, naming it.
    let flags = ["--train", &data, "--test", &data, "--device", "cpu", "--fraction", "1", "--nproc-per-node", "2"];
    let output = simclr(["eval", "finetune"]).args(encoder).args(flags).run();
    assert_every_process_names(&output, "broken.jpg");
    let output = eval("knn", &["--nproc-per-node", "2", "--dist-timeout-seconds", "0"]).run();
    assert_fails_with(&output, &["--dist-timeout-seconds 0: must be a finite number > 0"]);
    // Processes started with different settings stop, naming it.
    let port = free_port();
    let rank = |rank: usize, k: &str| {
        eval("knn", &["--k", k, "--dist-timeout-seconds", "20"])
            .env("RANK", rank)
            .env("WORLD_SIZE", 2)
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port)
            .spawn(|command| {
                command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
            })
    };
    for child in [rank(0, "5"), rank(1, "7")] {
        assert_fails_with(&child.wait_with_output().unwrap(), &["different eval settings", "rank 1"]);
    }
}

/// The float32 values of a `.npy` matrix as this program writes it.
fn npy_values(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    bytes[128..].chunks(4).map(|value| f32::from_le_bytes(value.try_into().unwrap())).collect()
}

/// A trained run's encoder flags, and a folder of 12 images and a broken
/// one, last in the listing (in the last process's part).
fn encoder_and_broken_images(dir: &Path) -> (Vec<String>, PathBuf) {
    let (_, run) = trained_run(dir);
    let data = dir.join("images");
    image_folder(&data, 6, 16);
    std::fs::write(data.join("blocks").join("broken.jpg"), b"not a jpeg").unwrap();
    (encoder_flags(&run.join("encoder.safetensors"), "resnet18", "0.125"), data)
}

#[test]
fn two_processes_embed_as_one() {
    // Each process writes the features of its part of the images to a file
    // of its own; the first joins them in order. Against one process: the
    // same paths and features (computed in other batches: within 1e-5),
    // with a broken image in the second process's part left out under the
    // skip policy, or stopping both, naming it, and leaving no file.
    let dir = tempfile::tempdir().unwrap();
    let (encoder, data) = encoder_and_broken_images(dir.path());
    let out = dir.path().join("out");
    let embed = |name: &str, extra: &[&str]| {
        let output = out.join(name).display().to_string();
        let input = data.display().to_string();
        simclr(["embed", "--input", &input, "--output", &output, "--batch-size", "4"]).args(&encoder).args(extra)
    };
    let skip = ["--on-bad-image", "skip"];
    for (name, extra) in [("one.npy", &skip[..]), ("two.npy", &[&skip[..], &["--nproc-per-node", "2"]].concat())] {
        let output = embed(name, extra).run();
        assert_succeeds(&output);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert_eq!(stdout.matches("embedded 12 images").count(), 1, "one report:\n{stdout}");
        assert!(stdout.contains("skipped 1 unreadable image:") && stdout.contains("broken.jpg"), "{stdout}");
    }
    let read = |name: &str| (npy_shape(&out.join(name)), npy_values(&out.join(name)));
    let ((shape_one, one), (shape_two, two)) = (read("one.npy"), read("two.npy"));
    assert_eq!((&shape_one, &shape_two), (&vec![12, 64], &vec![12, 64]));
    let paths = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
    assert_eq!(paths("two.paths.txt"), paths("one.paths.txt"));
    let apart = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(apart(&two, &one) < 1e-5, "2 processes' features {} from 1's", apart(&two, &one));
    // The control: the second process's part first is not one process's.
    let swapped = [&one[6 * 64..], &one[..6 * 64]].concat();
    assert!(apart(&swapped, &one) > 1e-3, "the comparison misses parts out of order");
    let mut files: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|entry| entry.unwrap().file_name().to_string_lossy().into()).collect();
    files.sort();
    assert_eq!(files, ["one.npy", "one.paths.txt", "two.npy", "two.paths.txt"]);

    let output = embed("stopped.npy", &["--nproc-per-node", "2"]).run();
    assert_fails_with(&output, &["broken.jpg"]);
    let left = std::fs::read_dir(&out).unwrap().count();
    assert_eq!(left, 4, "a stopped run leaves nothing behind");
}

#[test]
fn two_processes_search_as_one() {
    // Each process embeds its part of the queries and searches its part of
    // the images; the first takes each query's best of both parts. Against
    // one process: the same neighbours, similarities within 1e-4 (features
    // computed in other batches), the same gallery; a broken image in the
    // second process's part skipped, or stopping both, naming it.
    let dir = tempfile::tempdir().unwrap();
    let (encoder, data) = encoder_and_broken_images(dir.path());
    let search = |index: &Path, gallery: &str, extra: &[&str]| {
        let (index, queries) = (index.display().to_string(), data.display().to_string());
        let gallery = dir.path().join(gallery).display().to_string();
        let flags = ["--index", &index, "--query", &queries, "--k", "5", "--batch-size", "4", "--gallery", &gallery];
        simclr(["neighbors"]).args(&encoder).args(flags).args(["--on-bad-image", "skip"]).args(extra).run()
    };
    // Per query (the broken one is skipped), its neighbours' paths and similarities.
    let table = |output: &Output| -> Vec<(String, Vec<(String, f64)>)> {
        assert_succeeds(output);
        let mut queries: Vec<(String, Vec<(String, f64)>)> = Vec::new();
        for line in String::from_utf8_lossy(&output.stdout).lines().skip(1) {
            let fields: Vec<&str> = line.split('\t').collect();
            let hit = (fields[3].to_owned(), fields[2].parse::<f64>().unwrap());
            match queries.last_mut() {
                Some((query, hits)) if query == fields[0] => hits.push(hit),
                _ => queries.push((fields[0].to_owned(), vec![hit])),
            }
        }
        queries
    };
    let same = |a: &[(String, Vec<(String, f64)>)], b: &[(String, Vec<(String, f64)>)]| {
        a.len() == b.len()
            && a.iter().zip(b).all(|((query_a, hits_a), (query_b, hits_b))| {
                query_a == query_b
                    && hits_a.len() == hits_b.len()
                    && hits_a
                        .iter()
                        .zip(hits_b)
                        .all(|((path_a, sim_a), (path_b, sim_b))| path_a == path_b && (sim_a - sim_b).abs() < 1e-4)
            })
    };
    let one = search(&data, "one.png", &[]);
    assert!(stderr(&one).contains("broken.jpg"), "{}", stderr(&one));
    let one = table(&one);
    assert_eq!((one.len(), one[0].1.len()), (12, 5));
    for processes in ["2", "3"] {
        let output = search(&data, &format!("{processes}.png"), &["--nproc-per-node", processes]);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert_eq!(stdout.lines().filter(|line| line.starts_with("query")).count(), 1, "one table:\n{stdout}");
        assert!(same(&table(&output), &one), "{processes} processes:\n{stdout}");
        let gallery = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
        assert!(gallery(&format!("{processes}.png")) == gallery("one.png"), "{processes} processes' gallery");
    }
    // The control: the first process's part alone (the bars) is not the search.
    let bars = dir.path().join("bars-only");
    std::fs::create_dir_all(bars.join("bars")).unwrap();
    for entry in std::fs::read_dir(data.join("bars")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, bars.join("bars").join(path.file_name().unwrap())).unwrap();
    }
    assert!(!same(&table(&search(&bars, "bars.png", &[])), &one), "the comparison misses a part left out");
    // HNSW builds its graph in one process; the stop policy stops both.
    let output = search(&data, "hnsw.png", &["--nproc-per-node", "2", "--index-kind", "hnsw"]);
    assert_fails_with(&output, &["--nproc-per-node 2: --index-kind hnsw builds its graph in one process"]);
    let output = search(&data, "stopped.png", &["--nproc-per-node", "2", "--on-bad-image", "stop"]);
    assert_fails_with(&output, &["broken.jpg"]);
}

#[test]
fn supervised_training_is_the_same_on_one_or_two_processes() {
    let dir = tempfile::tempdir().unwrap();
    let (data, shards) = folder_and_shards(dir.path());
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let output = tiny_training(&data, &out).args(["--epochs", "2"]).args(extra).run();
        assert_succeeds(&output);
        out
    };
    let one = run("one", &["--supervised"]);
    // The head is the classifier: linear, an output per class (2 here).
    let config = std::fs::read_to_string(one.join("config.toml")).unwrap();
    for line in ["supervised = true", "kind = \"linear\"", "projection_dim = 2"] {
        assert!(config.contains(line), "{line} missing from\n{config}");
    }
    // Each process's labels follow its slice of every batch: 2 processes
    // take the steps of 1. Compared after 2 steps (1.4e-5 and 8e-6 apart,
    // measured): the third batch puts one class on each process, whose
    // gradients then nearly cancel, and LARS's per-layer normalisation
    // magnifies the rounding of such a sum (6.5e-3 after it, 2e-2 after
    // 12 steps, against 5e-5 for contrastive training).
    let two_steps = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let output = tiny_training(&data, &out).args(FP32).args(extra).env("SIMCLR_TEST_STOP_AFTER_STEPS", 2).run();
        assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
        simclr::io::load(&out.join("checkpoint.safetensors")).unwrap().tensors
    };
    let (one_process, two_processes) =
        (two_steps("one-2", &["--supervised"]), two_steps("two-2", &["--supervised", "--nproc-per-node", "2"]));
    let difference = |ours: &Tensors, theirs: &Tensors| largest_difference(ours, theirs, "model.encoder.");
    let apart = difference(&two_processes, &one_process);
    eprintln!("supervised, 2 processes against 1 after 2 steps: encoder differs by {apart:e}");
    assert!(apart < PROCESSES_TOLERANCE, "2 processes differ from 1 by {apart:e}");
    // Negative control: contrastive steps from the same seed are another computation.
    let contrastive = two_steps("contrastive-2", &[]);
    assert!(difference(&contrastive, &one_process) > 10.0 * PROCESSES_TOLERANCE);

    // Shards streamed in a buffer's order train with labels too (each batch
    // names the images behind its views), reproducibly.
    let streamed = |name: &str| {
        let out = dir.path().join(name);
        let output = tiny_training(&shards, &out).args(["--supervised", "--set", "data.shuffle_buffer=4"]).run();
        assert_succeeds(&output);
        out
    };
    let (streamed_once, streamed_again) = (streamed("streamed"), streamed("streamed-again"));
    assert_eq!(encoder_difference(&streamed_once, &streamed_again), 0.0, "two streamed supervised runs differ");

    // What cannot train with labels is named: images without classes, a
    // head that is not the classifier.
    let flat = dir.path().join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    for entry in std::fs::read_dir(data.join("bars")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, flat.join(path.file_name().unwrap())).unwrap();
    }
    let output = tiny_training(&flat, &dir.path().join("flat-run")).args(["--supervised"]).run();
    assert_fails_with(&output, &["flat", "labelled images"]);
    let output = tiny_training(&data, &dir.path().join("mlp")).args(["--set", "train.supervised=true"]).run();
    assert_fails_with(&output, &["model.head", "projection_dim = 2"]);
}

#[test]
fn multi_process_bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    let out = dir.path().join("run");
    // A batch that does not split among the processes.
    let output = tiny_training(&data, &out).args(["--nproc-per-node", "3"]).run();
    assert_fails_with(&output, &["train.batch_size = 4", "3 equal slices"]);
    // NCCL on the CPU (and, in this build, without CUDA at all): refused
    // once, by the launcher, before any process starts.
    let output =
        tiny_training(&data, &out).args(["--nproc-per-node", "2", "--set", "train.dist_backend=\"nccl\""]).run();
    assert_fails_with(&output, &["train.dist_backend = \"nccl\""]);
    assert_eq!(stderr(&output).matches("error:").count(), 1, "{}", stderr(&output));
    // A process that fails alone (a file in its slice is no image): it, the
    // other, whose collective then breaks off, and the launcher all name the
    // file (as the rank that failed left it in the store), none a connection
    // closed by a peer (as before).
    let bad = dir.path().join("bad");
    image_folder(&bad, 6, 16);
    std::fs::write(bad.join("bars").join("007.png"), b"no image").unwrap();
    let output = tiny_training(&bad, &dir.path().join("bad-run")).args(["--nproc-per-node", "2"]).run();
    assert_every_process_names(&output, "007.png: not an image");

    let rank = |rank: usize, port: u16, host: &str| {
        tiny_training(&data, &out)
            .args(["--set", "train.dist_timeout_seconds=5"])
            .env("RANK", rank)
            .env("WORLD_SIZE", 2)
            .env("MASTER_ADDR", host)
            .env("MASTER_PORT", port)
    };
    let piped = |command: &mut Command| {
        command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    };
    // Processes started with different settings both stop, naming it.
    let port = free_port();
    let first = rank(0, port, "127.0.0.1").spawn(piped);
    let second = rank(1, port, "127.0.0.1").args(["--epochs", "3"]).spawn(piped);
    for child in [first, second] {
        assert_fails_with(&child.wait_with_output().unwrap(), &["different configurations", "rank 1"]);
    }
    // Two machines whose copies of the data differ (an image fewer on the
    // second), each given the same relative path, so the configurations
    // agree: both stop, naming it, rather than slicing other listings.
    let machines = [dir.path().join("machine0"), dir.path().join("machine1")];
    machines.iter().for_each(|machine| image_folder(&machine.join("data"), 6, 16));
    let one_image = std::fs::read_dir(machines[1].join("data").join("bars")).unwrap().next().unwrap().unwrap();
    std::fs::remove_file(one_image.path()).unwrap();
    let port = free_port();
    let children = machines.iter().enumerate().map(|(rank, machine)| {
        tiny_training(Path::new("data"), Path::new("run"))
            .args(["--set", "train.dist_timeout_seconds=20"])
            .env("RANK", rank)
            .env("WORLD_SIZE", 2)
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port)
            .spawn(|command| {
                piped(command);
                command.current_dir(machine);
            })
    });
    for child in children.collect::<Vec<_>>() {
        assert_fails_with(&child.wait_with_output().unwrap(), &["different training images", "rank 1"]);
    }
    // Rank 0's machine cannot be reached: an error within the timeout, naming the address.
    let started = std::time::Instant::now();
    let output = rank(1, 29511, "10.255.255.1").run();
    assert_fails_with(&output, &["10.255.255.1:29511"]);
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "took {:?}", started.elapsed());
    // The port is taken: rank 0 cannot serve the store there.
    let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let output = rank(0, port, "127.0.0.1").run();
    assert_fails_with(&output, &[&format!("127.0.0.1:{port}")]);
}

/// The processes the launcher `parent` started.
fn children_of(parent: u32) -> Vec<u32> {
    let listed = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap_or_default();
    listed.split_whitespace().map(|pid| pid.parse().unwrap()).collect()
}

/// The rank a launcher gave the process `pid` (its `RANK`), while it runs.
fn rank_of(pid: u32) -> Option<String> {
    let environment = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let rank = environment.split(|&byte| byte == 0).find_map(|pair| pair.strip_prefix(b"RANK="));
    rank.map(|rank| String::from_utf8_lossy(rank).into_owned())
}

/// `--resume` of `run` on 2 processes (through the launcher) or on 1 (a plain run).
fn resumed(run: &Path, processes: &str) -> Simclr {
    let resume = simclr(["train", "--resume", "--output", &run.display().to_string()]);
    if processes == "1" {
        resume
    } else {
        resume.args(["--nproc-per-node", processes])
    }
}

/// The global step a resumed run in `run` starts from (0 for a fresh one).
fn resume_step(run: &Path) -> usize {
    let checkpoint = run.join("checkpoint.safetensors");
    match simclr::train::checkpoint::exists(&checkpoint) {
        true => simclr::train::checkpoint::Checkpoint::read_latest(&checkpoint).unwrap().position.step,
        false => 0,
    }
}

#[test]
fn a_killed_process_stops_the_run_and_it_resumes_on_two_or_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 12, 16);
    let fresh = |out: &Path| {
        tiny_training(&data, out).args(["--epochs", "8", "--set", "train.checkpoint_every=1", "--nproc-per-node", "2"])
    };
    // Kill points set by the run's progress (`wait_for_kill_point`): a
    // seeded fraction of an epoch after the run writes its next checkpoint
    // (each file write pauses 200 ms, so the run is still going then), two
    // epochs on at most, so three rounds stay short of the run's 8. Rounds
    // alternate between 2 processes (one worker killed, the launcher stops
    // the other) and 1 (the process killed); the run then finishes on 2 or 1.
    let mut state = 0x5EED_u64;
    let mut next_fraction = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) % 1000) as f64 / 1000.0
    };
    for finish_on in ["2", "1"] {
        let killed = dir.path().join(format!("killed-{finish_on}"));
        // Where each run started, and on how many processes.
        let mut segments: Vec<(usize, &str)> = Vec::new();
        for round in 0..3 {
            let processes = if round % 2 == 0 { "2" } else { "1" };
            segments.push((resume_step(&killed), processes));
            let run = if simclr::train::checkpoint::exists(&killed.join("checkpoint.safetensors")) {
                resumed(&killed, processes)
            } else {
                fresh(&killed)
            };
            let identity = checkpoint_identity(&killed);
            let mut launcher = run.env("SIMCLR_TEST_WRITE_PAUSE_MS", 200).spawn(|command| {
                command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
            });
            wait_for_kill_point(&killed, identity, next_fraction(), &mut |what| {
                use std::io::Read;
                if let Some(status) = launcher.try_wait().unwrap() {
                    let mut printed = String::new();
                    let _ = launcher.stderr.take().map(|mut stderr| stderr.read_to_string(&mut printed));
                    panic!("round {round}: the run ended ({status}) before {what}: {printed}");
                }
            });
            // One worker of two (alternately rank 0 and 1), or the one process.
            let workers = children_of(launcher.id());
            let victim = if processes == "2" { workers[round / 2 % workers.len()] } else { launcher.id() };
            let killed_rank = rank_of(victim);
            // SAFETY: kill(2) on a process this test (or its child) started.
            unsafe { libc::kill(victim as i32, libc::SIGKILL) };
            let output = launcher.wait_with_output().unwrap();
            assert!(!output.status.success(), "round {round}: the killed run reported success");
            if processes == "2" {
                // The launcher names the rank killed, not one that failed for it.
                let said = format!("rank {} of 2 failed (signal: 9 (SIGKILL))", killed_rank.unwrap());
                assert!(stderr(&output).contains(&said), "{said}:\n{}", stderr(&output));
                // Its peer, whose collective broke off, says why it found no cause.
                let peer = "a process ended without leaving a cause (killed by a signal";
                assert!(stderr(&output).contains(peer), "{peer}:\n{}", stderr(&output));
            }
            assert_checkpoint_usable(&killed);
        }
        segments.push((resume_step(&killed), finish_on));
        assert_succeeds(&resumed(&killed, finish_on).run());

        // The reference: the same steps on the same numbers of processes,
        // without kills (each part stopped where the next run resumed, as a
        // signal would), bit for bit. Not one uninterrupted run: in this
        // tiny setting (2 images per process) fp32 rounding between 1 and 2
        // processes grows chaotically when an early epoch runs on the other
        // number (straight runs on 1 and on 2 end 0.2 apart after 8 epochs,
        // measured), so that comparison failed whenever a kill fell so.
        let replay = dir.path().join(format!("replay-{finish_on}"));
        for (part, &(_, processes)) in segments.iter().enumerate() {
            let run = match part {
                0 => fresh(&replay),
                _ => resumed(&replay, processes),
            };
            match segments.get(part + 1) {
                Some(&(next, _)) => {
                    let output = run.env("SIMCLR_TEST_STOP_AFTER_STEPS", next).run();
                    // A stop on every process, not a failure of one.
                    let (status, reached) = (output.status, resume_step(&replay));
                    assert!(
                        status.code() == Some(130) && reached == next && !stderr(&output).contains("failed"),
                        "replay part {part} on {processes}, stopped at step {next}: {status}, checkpoint at step {reached}\n{}",
                        stderr(&output)
                    );
                }
                None => assert_succeeds(&run.run()),
            }
        }
        eprintln!("killed 3 times, finished on {finish_on}: runs from steps on processes {segments:?}");
        assert_same_run(&killed, &replay, &format!("3 kills and finishing on {finish_on} ({segments:?})"));
    }
    // Negative control: the two schedules differ at least in their last
    // run's processes, which the bitwise comparison sees.
    let difference = encoder_difference(&dir.path().join("killed-1"), &dir.path().join("replay-2"));
    assert!(difference > 0.0, "a run on other numbers of processes went unnoticed");
}

#[test]
fn a_stuck_process_is_named_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    // Each rank in turn is stopped (SIGSTOP, as a process stuck on a dead
    // file system) once the run has trained an epoch: the other times out
    // in a collective after 5 s, rank 0's in the forward pass or the
    // optimiser's, rank 1's in the backward (a collective of autograd's).
    for stopped_rank in ["0", "1"] {
        let out = dir.path().join(format!("stuck-{stopped_rank}"));
        let settings = ["--epochs", "1000", "--nproc-per-node", "2", "--set", "train.dist_timeout_seconds=5"];
        let launcher = tiny_training(&data, &out).args(settings).spawn(|command| {
            command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
        });
        let started = std::time::Instant::now();
        while std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default().is_empty() {
            assert!(started.elapsed().as_secs() < 120, "no epoch done in 2 minutes");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let victim = children_of(launcher.id()).into_iter().find(|&pid| rank_of(pid).as_deref() == Some(stopped_rank));
        // SAFETY: kill(2) on a process the launcher this test started started.
        unsafe { libc::kill(victim.expect("the rank's process") as i32, libc::SIGSTOP) };
        let stopped = std::time::Instant::now();
        let output = launcher.wait_with_output().unwrap();
        let printed = stderr(&output);
        let said = format!("error: rank {stopped_rank} of 2 stopped answering: the others timed out waiting for it");
        assert!(!output.status.success() && printed.contains(&said), "{said}:\n{printed}");
        // The other process names the one it waited for, in one line.
        let named = format!("; rank {stopped_rank} (on ");
        assert!(
            printed.contains(&named) && printed.contains(") did not come to it within the timeout (5 s)"),
            "{printed}"
        );
        assert!(!printed.contains("Exception raised from"), "{printed}");
        // The timeout, the launcher's wait for the others to time out, and no more.
        assert!(stopped.elapsed().as_secs() < 40, "took {:?}:\n{printed}", stopped.elapsed());
    }
}

#[test]
fn sigterm_to_the_launcher_stops_every_process_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 12, 16);
    let runs = |out: &Path| tiny_training(&data, out).args(["--epochs", "3", "--nproc-per-node", "2"]);
    let straight = dir.path().join("straight");
    assert_succeeds(&runs(&straight).run());
    let stopped = dir.path().join("stopped");
    // Each file write pauses 300 ms, so the run is still going when its first
    // epoch's metrics appear.
    let launcher = runs(&stopped).env("SIMCLR_TEST_WRITE_PAUSE_MS", 300).spawn(|command| {
        command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !stopped.join("metrics.jsonl").exists() || std::fs::read(stopped.join("metrics.jsonl")).unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no epoch within 120 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: kill(2) on a process this test started.
    unsafe { libc::kill(launcher.id() as i32, libc::SIGTERM) };
    let output = launcher.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    assert!(stderr(&output).contains("simclr train --resume --output"), "{}", stderr(&output));
    assert!(!stopped.join("encoder.safetensors").exists());
    assert_succeeds(&resumed(&stopped, "2").run());
    let difference = encoder_difference(&stopped, &straight);
    eprintln!("stopped by SIGTERM and resumed: encoder differs from the straight run by {difference:e}");
    assert!(difference < PROCESSES_TOLERANCE, "differs by {difference:e}");
}

/// `simclr shard` of `data` into `shards`, `per_shard` images each.
fn write_shards(data: &Path, shards: &Path, per_shard: usize) {
    let (data, shards) = (data.display().to_string(), shards.display().to_string());
    assert_succeeds(
        &simclr(["shard", "--input", &data, "--output", &shards, "--per-shard", &per_shard.to_string()]).run(),
    );
}

/// An image folder of 24 images in `dir`, and its shards of 5.
fn folder_and_shards(dir: &Path) -> (PathBuf, PathBuf) {
    let (data, shards) = (dir.join("data"), dir.join("shards"));
    image_folder(&data, 12, 16);
    write_shards(&data, &shards, 5);
    (data, shards)
}

/// One field of every epoch in a run's metrics log.
fn epoch_field(run: &Path, field: &str) -> Vec<serde_json::Value> {
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[field].clone()).collect()
}

#[test]
fn embed_and_neighbors_read_shards_as_the_folder_they_were_written_from() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = trained_run(dir.path());
    let shards = dir.path().join("shards");
    write_shards(&data, &shards, 3);
    let weights = out.join("encoder.safetensors").display().to_string();
    let embed = |input: &Path, name: &str| {
        let output = dir.path().join(name);
        let (input, output_arg) = (input.display().to_string(), output.display().to_string());
        assert_succeeds(&simclr(["embed", "--weights", &weights, "--input", &input, "--output", &output_arg]).run());
        let names = std::fs::read_to_string(output.with_extension("paths.txt")).unwrap();
        (simclr::tch::Tensor::read_npy(&output).unwrap(), names.lines().map(String::from).collect::<Vec<_>>())
    };
    // The shards hold the folder's images in its order, byte for byte.
    let (folder, files) = embed(&data, "folder.npy");
    let (sharded, members) = embed(&shards, "shards.npy");
    assert_eq!(members.len(), files.len());
    assert!(members[0].ends_with("shard-000000.tar:000000000.png"), "{members:?}");
    assert!(members[7].ends_with("shard-000002.tar:000000007.png"), "{members:?}");
    assert!(sharded.equal(&folder), "the shards' features differ from the folder's");
    // Negative control: the same features in another order are told apart.
    assert!(!sharded.equal(&folder.flip([0])));
    // Searched as shards, an image of the folder finds its own member, and
    // the gallery draws it from the shard.
    let gallery = dir.path().join("gallery.png");
    let output = simclr(["neighbors", "--weights", &weights, "--k", "1", "--thumbnail", "16"])
        .args(["--index", &shards.display().to_string(), "--query", &files[5]])
        .args(["--gallery", &gallery.display().to_string()])
        .run();
    assert_succeeds(&output);
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    let hit = table.lines().nth(1).and_then(|line| line.rsplit('\t').next());
    assert_eq!(hit, Some(members[5].as_str()), "{table}");
    let sheet = image::open(&gallery).unwrap();
    assert_eq!((sheet.width(), sheet.height()), (6 + 2 * 22 + 6, 6 + 22));
}

#[test]
fn shards_train_as_the_folder_they_were_written_from() {
    let dir = tempfile::tempdir().unwrap();
    let (data, shards) = folder_and_shards(dir.path());
    let names: Vec<String> =
        std::fs::read_dir(&shards).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.iter().filter(|n| n.ends_with(".tar")).count(), 5, "{names:?}");
    let from_folder = dir.path().join("folder-run");
    assert_succeeds(&three_epochs(&data, &from_folder).run());
    // The shards also serve as the kNN monitor's labelled splits.
    let from_shards = dir.path().join("shards-run");
    assert_succeeds(
        &tiny_run(&shards, &from_shards).args(["--epochs", "3", "--set", "train.checkpoint_every=1"]).run(),
    );
    let knn = |run: &Path| epoch_field(run, "knn_top1");
    assert_eq!(epoch_losses(&from_shards), epoch_losses(&from_folder));
    assert_eq!(knn(&from_shards), knn(&from_folder));
    assert_eq!(encoder_difference(&from_shards, &from_folder), 0.0, "the encoders differ");
    // Negative control: the same shards with another seed train otherwise.
    let reseeded = dir.path().join("reseeded");
    assert_succeeds(&three_epochs(&shards, &reseeded).args(["--set", "train.seed=1"]).run());
    assert_ne!(epoch_losses(&reseeded), epoch_losses(&from_folder));
}

#[test]
fn a_cut_shard_or_a_member_that_is_not_an_image_is_named() {
    // Twelve samples, so that every one is in the one epoch's 3 batches of 4.
    let dir = tempfile::tempdir().unwrap();
    let with_text = dir.path().join("with-text");
    image_folder(&with_text, 6, 16);
    std::fs::remove_file(with_text.join("bars").join("005.png")).unwrap();
    std::fs::write(with_text.join("bars").join("000-notes.png"), "not an image").unwrap();
    let shards = dir.path().join("shards");
    write_shards(&with_text, &shards, 7);
    // Member 0 of shard 0 is the text file (it sorts first in its class).
    let output = tiny_training(&shards, &dir.path().join("text")).run();
    assert_fails_with(&output, &["shard-000000.tar:000000000.png", "not an image"]);

    let data = dir.path().join("data");
    image_folder(&data, 6, 16);
    let cut = dir.path().join("cut");
    write_shards(&data, &cut, 7);
    // Shard 1 holds images 7..11; cut it 20 bytes into the data of image 9.
    let last = cut.join("shard-000001.tar");
    let bytes = std::fs::read(&last).unwrap();
    let header = bytes.windows(13).position(|w| w == b"000000009.png").expect("member 9 is in shard 1");
    std::fs::write(&last, &bytes[..header + 512 + 20]).unwrap();
    let output = tiny_training(&cut, &dir.path().join("stopped")).run();
    assert_fails_with(&output, &["shard-000001.tar:000000009.png", "truncated"]);
    let skipped = dir.path().join("skipped");
    let output = tiny_training(&cut, &skipped).args(["--set", "data.on_bad_image=skip"]).run();
    assert_succeeds(&output);
    let summary = run_summary(&skipped);
    let listed: Vec<&str> = summary["skipped_images"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].contains("shard-000001.tar:000000009.png"), "{listed:?}");

    // Cut inside a member's header: the rest of the shard is one sample
    // that cannot be read, named after the member before it.
    std::fs::write(&last, &bytes[..header + 100]).unwrap();
    let output = tiny_training(&cut, &dir.path().join("header")).run();
    assert_fails_with(&output, &["shard-000001.tar:(after 000000008.cls)", "damaged shard"]);
}

#[test]
fn streamed_shards_train_reproducibly_on_one_or_two_processes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, shards) = folder_and_shards(dir.path());
    let streamed = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let settings = ["--set", "data.shuffle_buffer=6", "--set", "data.workers=2"];
        assert_succeeds(&three_epochs(&shards, &out).args(settings).args(extra).run());
        out
    };
    let (first, second) = (streamed("first", &[]), streamed("second", &[]));
    assert_eq!(epoch_losses(&first).len(), 3);
    assert_eq!(epoch_losses(&first), epoch_losses(&second));
    assert_eq!(encoder_difference(&first, &second), 0.0, "two streamed runs differ");
    // Stopped mid-epoch 2 and resumed with another number of data workers
    // (as on a machine with other cores): the stream passes over the
    // batches done, and its order does not depend on the workers.
    let stop_after = |name: &str, steps: usize, extra: &[&str]| {
        let out = dir.path().join(name);
        let settings = ["--set", "data.shuffle_buffer=6", "--set", "data.workers=2"];
        let output =
            three_epochs(&shards, &out).args(settings).args(extra).env("SIMCLR_TEST_STOP_AFTER_STEPS", steps).run();
        assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
        out
    };
    let resume = |run: &Path, extra: &[&str]| {
        simclr(["train", "--resume", "--output", &run.display().to_string()]).args(extra).run()
    };
    let stopped = stop_after("stopped", 8, &[]);
    assert_succeeds(&resume(&stopped, &["--set", "data.workers=1"]));
    assert_eq!(epoch_losses(&stopped), epoch_losses(&first));
    assert_eq!(encoder_difference(&stopped, &first), 0.0, "the resumed stream differs");
    // Negative controls: read by index, or by another number of readers,
    // the same shards come in other orders.
    let by_index = dir.path().join("by-index");
    assert_succeeds(&three_epochs(&shards, &by_index).run());
    assert_ne!(epoch_losses(&by_index), epoch_losses(&first));
    let two_readers = streamed("two-readers", &["--set", "data.stream_readers=2"]);
    assert_ne!(epoch_losses(&two_readers), epoch_losses(&first));
    // Two processes are each dealt whole shards of 5, 5, 5, 5 and 4 images,
    // another deal each epoch, and train as many steps as the fewest images
    // a deal can give one allow: 9, 4 steps of 2 each; rank 0 says so.
    let two = dir.path().join("two");
    let settings = ["--set", "data.shuffle_buffer=6", "--set", "data.workers=2", "--nproc-per-node", "2"];
    let output = three_epochs(&shards, &two).args(settings).run();
    assert_succeeds(&output);
    assert_eq!(epoch_field(&two, "step"), [4, 8, 12]);
    let warning = "streaming 5 shards of 24 images on 2 processes trains on 16 images an epoch";
    assert_eq!(stderr(&output).matches(warning).count(), 1, "{}", stderr(&output));
    // Stopped mid-epoch there, the run resumes on 2 processes, not on 1,
    // which would deal the shards otherwise.
    let stopped_on_two = stop_after("stopped-on-two", 7, &["--nproc-per-node", "2"]);
    assert_fails_with(&resume(&stopped_on_two, &[]), &["after batch 3 of epoch 2", "resume it on 2 processes, not 1"]);
    assert_succeeds(&resume(&stopped_on_two, &["--nproc-per-node", "2"]));
    assert_eq!(encoder_difference(&stopped_on_two, &two), 0.0, "the stream resumed on 2 processes differs");
    // Shards that give a process no full part of a batch are named, on
    // every process, rather than training no step.
    let output = three_epochs(&shards, &dir.path().join("no-batch"))
        .args(["--set", "data.shuffle_buffer=6", "--nproc-per-node", "2", "--batch-size", "24"])
        .run();
    assert_fails_with(&output, &["no full batch of 24 images", "as few as 9 images for its part of 12"]);
}

#[test]
fn streaming_needs_shards() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, 4, 16);
    let output = tiny_training(&data, &dir.path().join("run")).args(["--set", "data.shuffle_buffer=4"]).run();
    assert_fails_with(&output, &["data.shuffle_buffer = 4", "is not shards"]);
}
