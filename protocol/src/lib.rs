//! Wire types, limits and codecs of the Allmende inference protocol.
//!
//! # Layout
//! - [`layers`]: [`LayerRange`], the contiguous block of transformer layers a shard hosts.
//! - [`model`]: [`ModelId`], a content-derived identity that nodes with the same file agree on.
//! - [`tensor`]: [`WireTensor`], hidden states as they travel between nodes.
//! - [`bounded`]: lists decoded with a cap on their length.
//! - [`codec`]: the one bounded bincode encoder/decoder every message goes through.
//! - [`frame`]: length prefixes of stream frames, bounded before allocation.
//! - [`inference`]: the session protocol's messages and the servers' announcements.
//! - [`announcement`]: the signed envelope of a server's DHT announcement.
//! - [`manifest`]: [`Manifest`], a model's metadata, tensor table and chunk hashes,
//!   whose hash is the [`ModelId`].
//! - [`numerics`]: [`NUMERICS_VERSION`], which results the compute kernels produce.
//! - [`weights`]: fetching a model's manifest and tensors from peers.
//!
//! This crate holds no I/O, no async runtime and no model compute: only what two
//! peers must agree on byte for byte.

pub mod announcement;
pub mod bounded;
pub mod codec;
pub mod frame;
pub mod inference;
pub mod layers;
pub mod manifest;
pub mod model;
pub mod numerics;
pub mod tensor;
pub mod weights;

pub use codec::{decode, encode, encode_frame, CodecError, MAX_MESSAGE_BYTES};
pub use inference::{ClientMessage, ErrorKind, ServerInfo, ServerMessage, PROTOCOL_NAME};
pub use layers::{LayerRange, LayerRangeError};
pub use manifest::Manifest;
pub use model::ModelId;
pub use numerics::NUMERICS_VERSION;
pub use tensor::{TensorError, WireDType, WireTensor};
