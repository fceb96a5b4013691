//! The projection head g(·) (section 4.2): none (z = h), a linear map, or a
//! non-linear MLP, which the paper finds best by more than 10% (Figure 8).
//! The MLP can carry BatchNorm on every layer, as in SimCLR v2
//! (arXiv 2006.10029).
//!
//! Variables are named as an `nn.Sequential` called `layers` holding Linear,
//! (BatchNorm1d,) ReLU, ..., so `layers.0.weight` is the first Linear's.
use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    None,
    Linear,
    Mlp,
}

/// The `[model.head]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadConfig {
    pub kind: HeadKind,
    /// Linear layers in the MLP (the paper's 2; SimCLR v2 uses 3).
    pub layers: usize,
    /// Width of the hidden layers; absent means the size of h.
    pub hidden_dim: Option<usize>,
    /// Size of z: the paper's 128.
    pub projection_dim: usize,
    /// BatchNorm after every Linear, as in SimCLR v2.
    pub batch_norm: bool,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self { kind: HeadKind::Mlp, layers: 2, hidden_dim: None, projection_dim: 128, batch_norm: false }
    }
}

impl HeadConfig {
    pub(crate) fn check(&self, problems: &mut Vec<String>) {
        if self.kind == HeadKind::Mlp && self.layers < 2 {
            problems.push(format!(
                "model.head.layers = {}: an MLP head has at least 2 layers (use kind = \"linear\" for one)",
                self.layers
            ));
        }
        if self.projection_dim == 0 || self.hidden_dim == Some(0) {
            problems.push("model.head.projection_dim and hidden_dim must be at least 1".to_owned());
        }
    }
}

/// A linear layer with its BatchNorm and ReLU.
#[derive(Debug)]
struct Stage {
    linear: nn::Linear,
    batch_norm: Option<nn::BatchNorm>,
    relu: bool,
}

/// g(·): `[B, feature_dim]` h to `[B, output_dim]` z.
#[derive(Debug)]
pub struct ProjectionHead {
    layers: Vec<Stage>,
    output_dim: i64,
}

impl ProjectionHead {
    pub fn new(path: &nn::Path, config: &HeadConfig, feature_dim: i64) -> Self {
        let count = match config.kind {
            HeadKind::None => 0,
            HeadKind::Linear => 1,
            HeadKind::Mlp => config.layers,
        };
        let hidden = config.hidden_dim.map_or(feature_dim, |d| d as i64);
        let path = path / "layers";
        let mut index = 0;
        let mut inputs = feature_dim;
        let mut layers = Vec::with_capacity(count);
        for layer in 0..count {
            let last = layer + 1 == count;
            let outputs = if last { config.projection_dim as i64 } else { hidden };
            let use_bn = config.batch_norm && config.kind == HeadKind::Mlp;
            let linear_config = nn::LinearConfig { bias: !use_bn, ..Default::default() };
            let linear = nn::linear(&path / index, inputs, outputs, linear_config);
            index += 1;
            let batch_norm = use_bn.then(|| {
                // SimCLR v2 leaves out the last BatchNorm's shift (center=False);
                // it is kept here, at zero, so shapes match torch.nn.BatchNorm1d.
                let bn_config = nn::BatchNormConfig { ws_init: Init::Const(1.0), ..Default::default() };
                let bn = nn::batch_norm1d(&path / index, outputs, bn_config);
                index += 1;
                bn
            });
            if !last {
                index += 1; // the ReLU's slot in the Sequential
            }
            layers.push(Stage { linear, batch_norm, relu: !last });
            inputs = outputs;
        }
        Self { layers, output_dim: inputs }
    }

    pub fn output_dim(&self) -> i64 {
        self.output_dim
    }

    /// The head of kind none, holding no variables: z = h, of size `feature_dim`.
    pub fn identity(feature_dim: i64) -> Self {
        Self { layers: Vec::new(), output_dim: feature_dim }
    }

    /// The size of the output of the first `layers` linear layers (of h for none).
    pub fn dim_after(&self, layers: usize) -> i64 {
        match layers.min(self.depth()) {
            0 => self.layers.first().map_or(self.output_dim, |layer| layer.linear.ws.size()[1]),
            k => self.layers[k - 1].linear.ws.size()[0],
        }
    }

    /// Its linear layers: 0 (none), 1 (linear) or `layers` (MLP).
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    pub fn forward_t(&self, h: &Tensor, train: bool) -> Tensor {
        self.forward_to(h, self.depth(), train)
    }

    /// The output of the first `layers` linear layers (each with its
    /// BatchNorm and, before the last, its ReLU); all of them give z.
    pub fn forward_to(&self, h: &Tensor, layers: usize, train: bool) -> Tensor {
        let mut z = h.shallow_clone();
        for layer in &self.layers[..layers.min(self.depth())] {
            z = z.apply(&layer.linear);
            if let Some(bn) = &layer.batch_norm {
                z = crate::dist::batch_norm(&z, bn, train);
            }
            if layer.relu {
                z = z.relu();
            }
        }
        z
    }
}

/// Where features are read from (`--layer`): h, the encoder's output (what
/// the paper evaluates, and the default), z = g(h) after the whole head
/// (what the loss sees), or `head:k`, after the head's k-th linear layer
/// with its BatchNorm and ReLU (SimCLR v2 fine-tunes from the middle one of
/// a 3-layer head). Section 4.2 finds h better than z by more than 10%.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layer {
    #[default]
    H,
    Z,
    Head(usize),
}

impl Layer {
    /// How many of `head`'s linear layers it passes through.
    pub fn depth_in(self, head: &ProjectionHead) -> crate::Result<usize> {
        match self {
            Layer::H => Ok(0),
            Layer::Z => Ok(head.depth()),
            Layer::Head(k) if k <= head.depth() => Ok(k),
            Layer::Head(_) => Err(crate::Error::InvalidArgument(format!(
                "--layer {self}: the projection head has {} linear layer(s), so head:1 to head:{0} (or z)",
                head.depth()
            ))),
        }
    }
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layer::H => write!(f, "h"),
            Layer::Z => write!(f, "z"),
            Layer::Head(k) => write!(f, "head:{k}"),
        }
    }
}

impl std::str::FromStr for Layer {
    type Err = crate::Error;

    fn from_str(text: &str) -> crate::Result<Self> {
        let bad = || crate::Error::InvalidArgument(format!("layer '{text}': expected h, z or head:K with K >= 1"));
        match text {
            "h" => Ok(Layer::H),
            "z" => Ok(Layer::Z),
            _ => match text.strip_prefix("head:").map(str::parse::<usize>) {
                Some(Ok(k)) if k >= 1 => Ok(Layer::Head(k)),
                _ => Err(bad()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn kinds_give_expected_shapes_and_names() {
        let h = Tensor::randn([4, 32], (Kind::Float, Device::Cpu));
        for (kind, dim) in [(HeadKind::None, 32), (HeadKind::Linear, 8), (HeadKind::Mlp, 8)] {
            let store = nn::VarStore::new(Device::Cpu);
            let config = HeadConfig { kind, projection_dim: 8, hidden_dim: Some(16), ..Default::default() };
            let head = ProjectionHead::new(&store.root(), &config, 32);
            assert_eq!(head.forward_t(&h, true).size(), vec![4, dim]);
            assert_eq!(head.output_dim(), dim);
        }
        let store = nn::VarStore::new(Device::Cpu);
        let config = HeadConfig { layers: 3, batch_norm: true, ..Default::default() };
        ProjectionHead::new(&store.root(), &config, 32);
        let vars = store.variables();
        // Linear 0, BN 1, ReLU 2, Linear 3, BN 4, ReLU 5, Linear 6, BN 7.
        for name in ["layers.0.weight", "layers.1.running_mean", "layers.3.weight", "layers.7.bias"] {
            assert!(vars.contains_key(name), "{name} missing from {:?}", vars.keys());
        }
        assert!(!vars.contains_key("layers.0.bias"));
    }

    #[test]
    fn layers_parse_and_read_the_head_part_way() {
        for (text, layer) in [("h", Layer::H), ("z", Layer::Z), ("head:2", Layer::Head(2))] {
            assert_eq!(text.parse::<Layer>().unwrap(), layer);
            assert_eq!(layer.to_string(), text);
        }
        for bad in ["head:0", "head:", "g", "Z"] {
            assert!(bad.parse::<Layer>().unwrap_err().to_string().contains(bad), "{bad}");
        }
        tch::manual_seed(0);
        let store = nn::VarStore::new(Device::Cpu);
        let config =
            HeadConfig { layers: 3, hidden_dim: Some(16), projection_dim: 8, batch_norm: true, ..Default::default() };
        let head = ProjectionHead::new(&store.root(), &config, 32);
        let h = Tensor::randn([5, 32], (Kind::Float, Device::Cpu));
        // Every layer, in evaluation mode: the whole head.
        let z = head.forward_t(&h, false);
        assert!(head.forward_to(&h, 3, false).equal(&z));
        // The first layer alone: its Linear, BatchNorm (running statistics) and ReLU.
        let first = &head.layers[0];
        let by_hand = h.apply(&first.linear).apply_t(first.batch_norm.as_ref().unwrap(), false).relu();
        assert!(head.forward_to(&h, 1, false).allclose(&by_hand, 1e-6, 1e-6, false));
        // Negative control: the second layer's output is another tensor of that shape.
        assert!(!head.forward_to(&h, 2, false).allclose(&by_hand, 1e-3, 1e-3, false), "two layers read as one");
        assert_eq!((head.dim_after(1), head.dim_after(2), head.dim_after(3)), (16, 16, 8));
        assert_eq!(Layer::Z.depth_in(&head).unwrap(), 3);
        assert_eq!(Layer::H.depth_in(&head).unwrap(), 0);
        let error = Layer::Head(4).depth_in(&head).unwrap_err().to_string();
        assert!(error.contains("head:4") && error.contains("head:1 to head:3"), "{error}");
        assert_eq!(Layer::Z.depth_in(&ProjectionHead::identity(32)).unwrap(), 0);
    }
}
