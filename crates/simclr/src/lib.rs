//! SimCLR: a simple framework for contrastive learning of visual
//! representations (Chen, Kornblith, Norouzi and Hinton, ICML 2020,
//! arXiv 2002.05709), on libtorch through `tch`.
//!
//! Each image x is augmented twice (section 3, [`augment`]); both views go
//! through the base encoder f(·) ([`model::resnet`]) and the projection head
//! g(·) ([`model::projection_head`]); the contrastive loss ([`loss`]) pulls
//! the two views of an image together and pushes the other 2(N-1) views of
//! the batch away. After training, the head is thrown away and h is the
//! representation used downstream.
//!
//! # Glossary
//! - **N**: images per batch; a batch holds 2N views.
//! - **h** = f(x̃): the representation, the encoder's pooled features
//!   (512·width for ResNet-18/34, 2048·width for ResNet-50 and deeper).
//! - **z** = g(h): the projection the loss is computed on.
//! - **tau** (τ): the temperature that divides similarities in NT-Xent.
//! - **s**: colour-jitter strength (appendix A).
//!
//! The modules follow the paper: [`data`] reads images, [`augment`] makes the
//! views, [`model`] holds f and g, [`loss`] the objectives, [`optim`] LARS and
//! the schedule, [`train`] the loop and checkpoints, [`eval`] the kNN monitor,
//! [`io`] weights in torchvision's names, [`embed`], [`retrieval`] and
//! [`bench`](mod@bench) the uses, [`report`] the figures.
#[macro_use]
mod names;

pub mod ablation;
pub mod augment;
pub mod bench;
pub mod checks;
pub mod config;
pub mod cuda_graph;
pub mod data;
pub mod device;
pub mod dist;
pub mod embed;
pub mod error;
pub mod eval;
pub mod export;
pub mod io;
pub mod loss;
pub mod model;
pub mod normalization;
pub mod optim;
pub mod report;
pub mod retrieval;
pub mod train;

pub use error::{Error, Result};
pub use tch;
