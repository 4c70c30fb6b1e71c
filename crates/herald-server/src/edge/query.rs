//! Query strings, with repeated keys kept (`?channel=a&channel=b`), which
//! axum's `Query` extractor cannot express.

use crate::edge::error::ApiError;

pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub(crate) fn parse(raw: Option<&str>) -> Self {
        Query(raw.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default())
    }

    /// The last value of `key`, as browsers and most frameworks do.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub(crate) fn all(&self, key: &str) -> impl Iterator<Item = &str> {
        self.0.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// A positive integer parameter, or the default when absent.
    pub(crate) fn positive(&self, key: &str, default: usize) -> Result<usize, ApiError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
                ApiError::bad_request("invalid_parameter", format!("'{key}' must be a positive integer, got '{v}'"))
            }),
        }
    }
}
