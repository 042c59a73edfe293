//! Cutting a replay into messages, and its joined output back into steps.

#[cfg(test)]
use allmende_protocol::WireDType;
use allmende_protocol::WireTensor;

/// Consecutive runs of `steps` of at most `limit` bytes and `max_steps` steps each
/// (at least one step).
pub(super) fn byte_chunks<'s, 'a>(
    steps: &'s [WireTensor<'a>],
    limit: usize,
    max_steps: usize,
) -> Vec<&'s [WireTensor<'a>]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, step) in steps.iter().enumerate() {
        if i > start && (bytes + step.wire_bytes() > limit || i - start == max_steps) {
            chunks.push(&steps[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += step.wire_bytes();
    }
    if start < steps.len() {
        chunks.push(&steps[start..]);
    }
    chunks
}

/// Splits `[1, total, hidden]` outputs back into one tensor per input step. The
/// server's reply is untrusted: anything but exactly that shape is refused.
pub(super) fn split_steps(
    joined: &WireTensor<'_>,
    steps: &[WireTensor<'_>],
) -> Result<Vec<WireTensor<'static>>, String> {
    let width = steps
        .first()
        .and_then(|s| s.shape.get(2).copied())
        .unwrap_or(0);
    let total: u32 = steps
        .iter()
        .map(|s| s.shape.get(1).copied().unwrap_or(0))
        .sum();
    let width = width as usize;
    if joined.shape != [1, total, width as u32] {
        return Err(format!(
            "replay returned shape {:?} for {total} positions",
            joined.shape
        ));
    }
    joined.validate().map_err(|e| e.to_string())?;
    let mut offset = 0;
    let mut out = Vec::with_capacity(steps.len());
    for step in steps {
        let seq = step.shape.get(1).copied().unwrap_or(0);
        let len = seq as usize * width;
        out.push(WireTensor {
            shape: vec![1, seq, width as u32],
            dtype: joined.dtype,
            values: joined.values[offset..offset + len].to_vec().into(),
        });
        offset += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(seq: u32) -> WireTensor<'static> {
        WireTensor::from_f32(
            &[1, seq, 2],
            &vec![seq as f32; 2 * seq as usize],
            WireDType::F32,
        )
        .unwrap()
    }

    #[test]
    fn chunks_respect_the_byte_limit() {
        let steps = [t(3), t(1), t(1), t(4)];
        let sizes = |limit| {
            byte_chunks(&steps, limit, usize::MAX)
                .iter()
                .map(|c| c.len())
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(1 << 20), vec![4]);
        assert_eq!(sizes(40), vec![3, 1]);
        assert_eq!(sizes(1), vec![1, 1, 1, 1]);
        let by_count = byte_chunks(&steps, 1 << 20, 3);
        assert_eq!(by_count.iter().map(|c| c.len()).collect::<Vec<_>>(), [3, 1]);
    }

    #[test]
    fn splits_replay_outputs_per_step() {
        let steps = [t(2), t(1)];
        let joined =
            WireTensor::from_f32(&[1, 3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], WireDType::F32)
                .unwrap();
        let parts = split_steps(&joined, &steps).unwrap();
        assert_eq!(*parts[0].values, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(*parts[1].values, vec![5.0, 6.0]);
        assert!(split_steps(&joined, &[t(1)]).is_err());
        // A hostile reply: right positions, a fourth axis of length zero.
        let hostile = WireTensor {
            shape: vec![1, 3, 2, 0],
            dtype: WireDType::F32,
            values: vec![].into(),
        };
        assert!(split_steps(&hostile, &steps).is_err());
        let narrow = WireTensor::from_f32(&[1, 3, 1], &[1.0; 3], WireDType::F32).unwrap();
        assert!(split_steps(&narrow, &steps).is_err());
    }
}
