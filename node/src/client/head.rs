//! The client's own part of the model: token embedding, final norm and LM head.
//! Keeping these local is what keeps plain tokens away from servers.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::model::block::{load_checked, RmsNorm};
use crate::model::gguf::{self, GgufFile};
use crate::model::{LlamaConfig, ModelError};

pub struct ClientHead {
    embedding: Arc<QTensor>,
    norm: RmsNorm,
    lm_head: QMatMul,
    vocab_size: usize,
    hidden_size: usize,
}

impl ClientHead {
    pub fn load(gguf: &mut GgufFile, cfg: &LlamaConfig) -> Result<Self, ModelError> {
        let (vocab, d) = (cfg.vocab_size, cfg.hidden_size);
        let embedding = Arc::new(load_checked(
            gguf,
            "token_embd.weight",
            &[vocab, d],
            gguf::is_supported_weight_type,
        )?);
        let norm = RmsNorm::load(gguf, "output_norm.weight", d, cfg.rms_eps)?;
        // Many small models tie the LM head to the embedding and ship no output.weight.
        let lm_head = match gguf.tensor_info("output.weight") {
            Some(_) => QMatMul::from_qtensor(load_checked(
                gguf,
                "output.weight",
                &[vocab, d],
                gguf::is_supported_weight_type,
            )?)?,
            None => QMatMul::from_arc(embedding.clone())?,
        };
        Ok(Self {
            embedding,
            norm,
            lm_head,
            vocab_size: vocab,
            hidden_size: d,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Hidden states `[1, ids.len(), hidden]` for `ids`, which must be in the vocabulary.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor, ModelError> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(ModelError::BadConfig(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.vocab_size
            )));
        }
        let ids = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu)?;
        Ok(self.embedding.embedding(&ids)?)
    }

    /// Logits of the last position of `hidden` (`[1, seq, hidden]`).
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Vec<f32>, ModelError> {
        let (_, seq, d) = hidden.dims3()?;
        if d != self.hidden_size {
            return Err(ModelError::BadConfig(format!(
                "hidden size {d} differs from the model's {}",
                self.hidden_size
            )));
        }
        let last = hidden.narrow(1, seq - 1, 1)?.contiguous()?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }
}
