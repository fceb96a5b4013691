//! The SimCLR network: encoder f(·) then projection head g(·), in one
//! variable store under the prefixes `encoder.` and `projection_head.`.
use tch::nn;
use tch::Tensor;

use super::{ModelConfig, ProjectionHead, ResNet};

/// Prefix of the encoder's variables in a SimCLR store.
pub const ENCODER_PREFIX: &str = "encoder";
pub const HEAD_PREFIX: &str = "projection_head";

#[derive(Debug)]
pub struct SimClr {
    pub encoder: ResNet,
    pub head: ProjectionHead,
}

impl SimClr {
    pub fn new(root: &nn::Path, config: &ModelConfig) -> Self {
        let encoder = ResNet::new(&(root / ENCODER_PREFIX), config.arch, config.width_multiplier, config.stem);
        let head = ProjectionHead::new(&(root / HEAD_PREFIX), &config.head, encoder.feature_dim());
        Self { encoder, head }
    }

    /// A network of `config` in a store of its own on `device` (the store
    /// owns the variables the network computes with), its convolution
    /// weights channels-last ([`crate::device::use_channels_last`]).
    pub fn in_store(config: &ModelConfig, device: tch::Device) -> (nn::VarStore, Self) {
        let store = nn::VarStore::new(device);
        let model = Self::new(&store.root(), config);
        crate::device::use_channels_last(&store);
        (store, model)
    }

    /// `encoder` alone (a head of kind none, z = h): for weights that hold
    /// only an encoder.
    pub fn headless(encoder: ResNet) -> Self {
        let head = ProjectionHead::identity(encoder.feature_dim());
        Self { encoder, head }
    }

    /// Returns (h, z) for a batch of views.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        let h = self.encoder.forward_t(x, train);
        let z = self.head.forward_t(&h, train);
        (h, z)
    }
}
