//! The client's own part of the model: token embedding, final norm and LM head, with
//! what the architecture does to embeddings and logits.
//! Keeping these local is what keeps plain tokens away from servers.

use std::sync::Arc;

use candle_core::Tensor;

use crate::model::gguf::{self, GgufFile};
use crate::model::kernels::Linear;
use crate::model::pieces::load::load_checked;
use crate::model::pieces::norm::RmsNorm;
use crate::model::{Hidden, ModelConfig, ModelError};

pub struct ClientHead {
    embedding: Linear,
    norm: RmsNorm,
    /// `None`: the LM head is tied to the embedding.
    output: Option<Linear>,
    vocab_size: usize,
    hidden_size: usize,
    /// What embeddings are multiplied by, where the architecture scales them.
    embedding_scale: Option<f32>,
    config: ModelConfig,
}

impl ClientHead {
    pub fn load(gguf: &mut GgufFile, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let (vocab, d) = (cfg.vocab_size, cfg.hidden_size);
        let matrix = |gguf: &mut GgufFile, name: &str| -> Result<Linear, ModelError> {
            let q = load_checked(gguf, name, &[vocab, d], gguf::is_supported_weight_type)?;
            Ok(Linear::new(Arc::new(q))?)
        };
        let embedding = matrix(gguf, "token_embd.weight")?;
        let norm = RmsNorm::load(gguf, "output_norm.weight", d, cfg.rms_eps)?;
        // Many small models tie the LM head to the embedding and ship no output.weight.
        let output = match gguf.tensor_info("output.weight") {
            Some(_) => Some(matrix(gguf, "output.weight")?),
            None => None,
        };
        Ok(Self {
            embedding,
            norm,
            output,
            vocab_size: vocab,
            hidden_size: d,
            embedding_scale: cfg.arch.embedding_scale(cfg),
            config: cfg.clone(),
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
        let rows = self.embedding.rows(ids)?;
        let rows = match self.embedding_scale {
            Some(scale) => rows.affine(f64::from(scale), 0.0)?,
            None => rows,
        };
        Ok(rows.unsqueeze(0)?)
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
        let last = Hidden::from_tensor(&hidden.narrow(1, seq - 1, 1)?)?;
        let normed = self.norm.forward(&last)?;
        let lm_head = self.output.as_ref().unwrap_or(&self.embedding);
        let logits = match lm_head {
            // candle's own products run best on a thread of its pool (a hand-off there
            // and back); this project's kernels spread their work from any thread.
            Linear::Candle(_) => candle_core::utils::with_threadpool(|| lm_head.apply(&normed))?,
            Linear::Ours(_) => lm_head.apply(&normed)?,
        };
        let mut logits = logits.into_values();
        self.config.arch.finish_logits(&self.config, &mut logits);
        Ok(logits)
    }
}
