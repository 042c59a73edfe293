//! Stop sequences over streamed text: text is released only once it can no longer be
//! the start of a stop sequence, and everything from a stop sequence on is dropped.

pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet released.
    pending: String,
    stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            stopped: false,
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a piece; returns the text that may be shown now.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return out;
        }
        // Hold back the longest tail that is a proper prefix of some stop sequence.
        let hold = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        out
    }

    /// The text still held back once generation has ended without a stop.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, at a
/// character boundary of `text`.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && stop.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            out += &m.push(p);
        }
        let stopped = m.is_stopped();
        out += &m.finish();
        (out, stopped)
    }

    #[test]
    fn passes_text_through_without_stops() {
        assert_eq!(
            run(&[], &["Hello", " world"]),
            ("Hello world".into(), false)
        );
    }

    #[test]
    fn stops_at_a_sequence_split_across_pieces() {
        assert_eq!(
            run(&["\n\n"], &["Paris.", "\n", "\nThe"]),
            ("Paris.".into(), true)
        );
        assert_eq!(
            run(&["END", "\n"], &["abc", "E", "N", "Dxyz"]),
            ("abc".into(), true)
        );
    }

    #[test]
    fn releases_a_false_start() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("ab ST"), "ab ");
        assert_eq!(m.push("ART"), "START");
        assert!(!m.is_stopped());
    }

    #[test]
    fn holds_back_only_at_char_boundaries() {
        assert_eq!(run(&["é!"], &["café", "s"]), ("cafés".into(), false));
        assert_eq!(run(&["é!"], &["café", "!x"]), ("caf".into(), true));
    }
}
