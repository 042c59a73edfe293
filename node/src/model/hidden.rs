//! Hidden states as the layers carry them: `batch × seq` rows of `width` f32 values
//! in one plain vector, which the kernels read and write in place. Candle tensors
//! appear only where a shard meets its caller (the wire, the client) and where
//! candle still computes a weight type this project has no kernel for.

use candle_core::{bail, Device, Result, Tensor};

#[derive(Clone, Debug, PartialEq)]
pub struct Hidden {
    values: Vec<f32>,
    batch: usize,
    seq: usize,
    width: usize,
}

impl Hidden {
    /// `values`: `[batch, seq, width]`, row-major.
    pub fn new(values: Vec<f32>, (batch, seq, width): (usize, usize, usize)) -> Result<Self> {
        if batch.checked_mul(seq).and_then(|n| n.checked_mul(width)) != Some(values.len()) {
            bail!("{} values are not [{batch}, {seq}, {width}]", values.len());
        }
        Ok(Self {
            values,
            batch,
            seq,
            width,
        })
    }

    /// A `[batch, seq, width]` tensor's values (copied once).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        Self::from_tensors(&[t])
    }

    /// `[batch, seq_i, width]` tensors one after another along the positions, each
    /// value copied once.
    pub fn from_tensors(parts: &[&Tensor]) -> Result<Self> {
        let Some(first) = parts.first() else {
            bail!("no hidden states to join");
        };
        let (batch, _, width) = first.dims3()?;
        let mut seqs = Vec::with_capacity(parts.len());
        for p in parts {
            match p.dims3()? {
                (b, s, w) if b == batch && w == width => seqs.push(s),
                dims => bail!("hidden states {dims:?} cannot follow [{batch}, _, {width}]"),
            }
        }
        let seq = seqs.iter().sum();
        let mut values = Vec::with_capacity(batch * seq * width);
        for b in 0..batch {
            for (p, s) in parts.iter().zip(&seqs) {
                crate::model::with_values(p, |v| {
                    values.extend_from_slice(&v[b * s * width..][..s * width])
                })?;
            }
        }
        Self::new(values, (batch, seq, width))
    }

    pub fn into_tensor(self) -> Result<Tensor> {
        let dims = self.dims();
        Tensor::from_vec(self.values, dims, &Device::Cpu)
    }

    pub fn into_values(self) -> Vec<f32> {
        self.values
    }

    pub fn dims(&self) -> (usize, usize, usize) {
        (self.batch, self.seq, self.width)
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }

    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// The same batch and positions with rows of another width: `values` are
    /// `[batch, seq, width]`.
    pub fn with_rows(&self, values: Vec<f32>, width: usize) -> Result<Self> {
        Self::new(values, (self.batch, self.seq, width))
    }

    /// `f` over every row, each giving a row of `width_out` values, spread over the
    /// compute threads in tasks of `per_task` rows ([`map_rows`](crate::model::map_rows)).
    pub fn map_rows(
        &self,
        width_out: usize,
        per_task: usize,
        f: impl Fn(&[f32], &mut [f32]) + Sync,
    ) -> Result<Self> {
        let values = crate::model::map_rows(&self.values, (self.width, width_out), per_task, f);
        self.with_rows(values, width_out)
    }

    /// The residual stream: `other` added to these values, in place.
    pub fn add(&mut self, other: &Hidden) -> Result<()> {
        if self.dims() != other.dims() {
            bail!("cannot add {:?} and {:?}", other.dims(), self.dims());
        }
        for (x, y) in self.values.iter_mut().zip(&other.values) {
            *x += y;
        }
        Ok(())
    }

    /// Positions `start..start + len`.
    pub fn positions(&self, start: usize, len: usize) -> Result<Self> {
        if start + len > self.seq {
            bail!("positions {start}..{} of {}", start + len, self.seq);
        }
        let w = self.width;
        let mut values = Vec::with_capacity(self.batch * len * w);
        for b in 0..self.batch {
            values.extend_from_slice(&self.values[(b * self.seq + start) * w..][..len * w]);
        }
        Self::new(values, (self.batch, len, w))
    }

    /// `parts`' rows side by side (one batch size and length).
    pub fn side_by_side(parts: &[Hidden]) -> Result<Self> {
        let Some(first) = parts.first() else {
            bail!("no hidden states to join");
        };
        let (batch, seq) = (first.batch, first.seq);
        if parts.iter().any(|p| p.batch != batch || p.seq != seq) {
            bail!("hidden states of different shapes cannot stand side by side");
        }
        let width = parts.iter().map(|p| p.width).sum();
        let mut values = Vec::with_capacity(batch * seq * width);
        for row in 0..batch * seq {
            for p in parts {
                values.extend_from_slice(&p.values[row * p.width..][..p.width]);
            }
        }
        Self::new(values, (batch, seq, width))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counting((b, s, w): (usize, usize, usize), from: f32) -> Hidden {
        let values = (0..b * s * w).map(|i| from + i as f32).collect();
        Hidden::new(values, (b, s, w)).unwrap()
    }

    #[test]
    fn joins_and_cuts_as_candle_does() {
        let (a, b) = (counting((2, 3, 4), 0.0), counting((2, 5, 4), 100.0));
        let tensors = [a.clone().into_tensor().unwrap(), b.into_tensor().unwrap()];
        let joined = Hidden::from_tensors(&[&tensors[0], &tensors[1]]).unwrap();
        let expected = Tensor::cat(&tensors, 1).unwrap();
        assert_eq!(joined, Hidden::from_tensor(&expected).unwrap());
        let cut = joined.positions(2, 4).unwrap();
        let expected = expected.narrow(1, 2, 4).unwrap();
        assert_eq!(cut, Hidden::from_tensor(&expected).unwrap());

        let wide = Hidden::side_by_side(&[a.clone(), counting((2, 3, 2), 50.0)]).unwrap();
        let tensors = [
            a.into_tensor().unwrap(),
            counting((2, 3, 2), 50.0).into_tensor().unwrap(),
        ];
        let expected = Tensor::cat(&tensors, 2).unwrap();
        assert_eq!(wide, Hidden::from_tensor(&expected).unwrap());
    }

    #[test]
    fn refuses_mismatched_shapes() {
        assert!(Hidden::new(vec![0.0; 5], (1, 2, 3)).is_err());
        assert!(Hidden::new(vec![], (usize::MAX, 2, 2)).is_err());
        let mut a = counting((1, 2, 3), 0.0);
        assert!(a.add(&counting((1, 3, 2), 0.0)).is_err());
        assert!(a.positions(1, 2).is_err());
        let other = [
            a.clone().into_tensor().unwrap(),
            counting((2, 2, 3), 0.0).into_tensor().unwrap(),
        ];
        assert!(Hidden::from_tensors(&[&other[0], &other[1]]).is_err());
    }
}
