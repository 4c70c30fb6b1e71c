//! The machine-readable end of every report: one line
//! `summary kind=fanout peer=herald transport=sse ... p99_ms=3.21 ...` after
//! the lines meant for people. bench/compare.sh reads figures from it, so its
//! keys stay stable; a figure not measured is `-`.

use std::fmt::Display;

pub(crate) struct Summary(Vec<(&'static str, String)>);

impl Summary {
    pub(crate) fn new(kind: &str) -> Self {
        Summary(vec![("kind", kind.to_owned())])
    }

    pub(crate) fn add(&mut self, key: &'static str, value: impl Display) -> &mut Self {
        self.0.push((key, value.to_string()));
        self
    }

    /// A figure with `decimals` places, or `-` when there is none.
    pub(crate) fn num(&mut self, key: &'static str, value: Option<f64>, decimals: usize) -> &mut Self {
        self.add(key, value.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}")))
    }

    pub(crate) fn print(&self) {
        let fields: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("summary {}", fields.join(" "));
    }
}
