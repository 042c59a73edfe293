//! A contiguous, half-open range of transformer layers: the unit a shard hosts.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Layers `[start, end)` of a model. Always non-empty once validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LayerRange {
    pub start: u32,
    pub end: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayerRangeError {
    #[error("layer range {0} is empty: the start must be below the end")]
    Empty(LayerRange),
    #[error("layer range {range} lies outside the model's layers 0..{block_count}")]
    OutOfBounds { range: LayerRange, block_count: u32 },
    #[error("cannot parse layer range {0:?}: expected START..END, e.g. 0..10")]
    Syntax(String),
}

impl LayerRange {
    pub const fn new(start: u32, end: u32) -> Self {
        Self { start, end }
    }

    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.start >= self.end
    }

    pub fn contains(&self, layer: u32) -> bool {
        self.start <= layer && layer < self.end
    }

    /// Checks that the range is non-empty and lies within `0..block_count`.
    pub fn validate(&self, block_count: u32) -> Result<(), LayerRangeError> {
        if self.is_empty() {
            return Err(LayerRangeError::Empty(*self));
        }
        if self.end > block_count {
            return Err(LayerRangeError::OutOfBounds {
                range: *self,
                block_count,
            });
        }
        Ok(())
    }

    pub fn iter(&self) -> std::ops::Range<u32> {
        self.start..self.end
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

impl FromStr for LayerRange {
    type Err = LayerRangeError;

    /// Parses `A..B` (also `A:B` and `A-B`, as other tools write it).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || LayerRangeError::Syntax(s.to_string());
        let (a, b) = s
            .split_once("..")
            .or_else(|| s.split_once(':'))
            .or_else(|| s.split_once('-'))
            .ok_or_else(syntax)?;
        let start = a.trim().parse().map_err(|_| syntax())?;
        let end = b.trim().parse().map_err(|_| syntax())?;
        let range = LayerRange::new(start, end);
        if range.is_empty() {
            return Err(LayerRangeError::Empty(range));
        }
        Ok(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_spellings() {
        assert_eq!("0..10".parse(), Ok(LayerRange::new(0, 10)));
        assert_eq!("10:20".parse(), Ok(LayerRange::new(10, 20)));
        assert_eq!("20-30".parse(), Ok(LayerRange::new(20, 30)));
    }

    #[test]
    fn rejects_bad_ranges() {
        assert!(matches!(
            "5..5".parse::<LayerRange>(),
            Err(LayerRangeError::Empty(_))
        ));
        assert!(matches!(
            "a..b".parse::<LayerRange>(),
            Err(LayerRangeError::Syntax(_))
        ));
        assert!(matches!(
            "-1..3".parse::<LayerRange>(),
            Err(LayerRangeError::Syntax(_))
        ));
        let err = LayerRange::new(20, 31).validate(30).unwrap_err();
        assert_eq!(
            err.to_string(),
            "layer range 20..31 lies outside the model's layers 0..30"
        );
        assert!(LayerRange::new(0, 30).validate(30).is_ok());
    }
}
