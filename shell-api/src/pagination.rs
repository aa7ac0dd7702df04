//! Keyset ("cursor") pagination shared by every list endpoint: `?limit=1..100` (default 20) and an opaque cursor.
//!
//! A cursor encodes the sort key of the last item served, so inserts while paging neither repeat nor skip rows
//! (unlike OFFSET). The encoding is hex of a small JSON array: opaque to clients, trivially versionable.

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::ApiError;

pub const LIMIT_DEFAULT: i64 = 20;
pub const LIMIT_MAX: i64 = 100;

/// `?limit=` and `?cursor=` of every list.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Page size, 1..=100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// `next_cursor` of the page before.
    pub cursor: Option<String>,
}

/// The `limit` and `cursor` query parameters; flatten into an endpoint's own query struct.
#[derive(Debug, Default, Deserialize)]
pub struct PageQuery {
    #[serde(default, deserialize_with = "limit_from_text")]
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

impl PageQuery {
    /// The page size, validated to 1..=100.
    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(LIMIT_DEFAULT),
            Some(n) if (1..=LIMIT_MAX).contains(&n) => Ok(n),
            Some(_) => Err(ApiError::invalid("limit", "must be between 1 and 100")),
        }
    }

    /// The decoded position after which this page starts, if any.
    pub fn after<K: DeserializeOwned>(&self) -> Result<Option<K>, ApiError> {
        self.cursor.as_deref().map(decode_cursor).transpose()
    }
}

/// A query string carries every value as text, and under `#[serde(flatten)]` (how endpoints embed `PageQuery`)
/// serde buffers it without telling the query parser that an integer is wanted, so a plain `Option<i64>` fails
/// on `limit=7`. Parse the text here; accept a real number too.
fn limit_from_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Limit {
        Number(i64),
        Text(String),
    }
    match Option::<Limit>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Limit::Number(n)) => Ok(Some(n)),
        Some(Limit::Text(text)) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| D::Error::custom("limit must be a whole number")),
    }
}

pub fn encode_cursor<K: Serialize>(key: &K) -> String {
    // Serializing plain keys (numbers, strings, uuids, timestamps) to JSON cannot fail.
    hex::encode(serde_json::to_vec(key).unwrap_or_default())
}

pub fn decode_cursor<K: DeserializeOwned>(cursor: &str) -> Result<K, ApiError> {
    hex::decode(cursor)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| ApiError::invalid("cursor", "not a cursor this endpoint issued"))
}

/// A page of results in the API's list shape.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `?cursor=` for the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` fetched rows: the extra row only says that another page exists.
    pub fn from_rows<K: Serialize>(mut rows: Vec<T>, limit: i64, key: impl Fn(&T) -> K) -> Self {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let next_cursor = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|last| encode_cursor(&key(last)))
        } else {
            None
        };
        Self {
            items: rows,
            next_cursor,
        }
    }
}
