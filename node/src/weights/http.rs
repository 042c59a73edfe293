//! A model file on an HTTP server (a model hub), read by range requests: the header of
//! each of its files, then only the byte ranges of the chunks a node needs. A model
//! split by llama.cpp into `NAME-00001-of-0000N.gguf` files is read file by file,
//! from the first one's URL. The server is trusted no more than a peer: every chunk is
//! checked against the model's manifest by the caller.

use std::collections::HashMap;
use std::io::Cursor;
use std::time::Duration;

use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;

use crate::model::gguf_header::{self, HeaderError, HEADER_MEMORY_LIMIT};

/// The first request for a header asks this much; while the header is longer, as
/// much again as was read is asked for, up to the header limit.
const FIRST_HEADER_BYTES: u64 = 64 << 10;
/// How long one request may take.
const PATIENCE: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url}: {source}")]
    Request { url: String, source: reqwest::Error },
    #[error("{url} answered {status} to a range request; it must serve byte ranges (206)")]
    NoRanges { url: String, status: StatusCode },
    #[error("{url} sent {got} bytes for a range of {asked}")]
    ShortRange { url: String, got: usize, asked: u64 },
    #[error("{url} is not a GGUF file this version reads: {problem}")]
    Header { url: String, problem: HeaderError },
    #[error("{url} names {count} split files in its split.count; at most 999 are read")]
    Splits { url: String, count: u64 },
}

/// Where a tensor's bytes are: which file, from which byte, how many.
#[derive(Clone, Debug)]
struct Place {
    file: usize,
    start: u64,
    bytes: u64,
}

/// A model's files on an HTTP server, their headers read.
pub struct RemoteModel {
    client: reqwest::Client,
    urls: Vec<String>,
    places: HashMap<String, Place>,
    /// Bytes received so far, headers included.
    received: std::sync::atomic::AtomicU64,
}

impl RemoteModel {
    /// Reads the header of the file at `url` and, if it is the first of a split model,
    /// of the others.
    pub async fn open(url: &str) -> Result<Self, HttpError> {
        let client = reqwest::Client::builder()
            .timeout(PATIENCE)
            .build()
            .map_err(|source| HttpError::Request {
                url: url.to_string(),
                source,
            })?;
        let mut model = Self {
            client,
            urls: vec![url.to_string()],
            places: HashMap::new(),
            received: Default::default(),
        };
        let first = model.header(url).await?;
        let count = match first.metadata.get("split.count") {
            Some(v) => v.to_u64().unwrap_or(1),
            None => 1,
        };
        if count > 999 {
            return Err(HttpError::Splits {
                url: url.to_string(),
                count,
            });
        }
        model.add(0, &first);
        for index in 1..count as usize {
            let part = split_url(url, index, count as usize).ok_or_else(|| HttpError::Header {
                url: url.to_string(),
                problem: HeaderError::Io(std::io::Error::other(
                    "split.count is set but the URL does not end in -00001-of-0000N.gguf",
                )),
            })?;
            let content = model.header(&part).await?;
            model.urls.push(part);
            model.add(index, &content);
        }
        Ok(model)
    }

    fn add(&mut self, file: usize, content: &gguf_header::Content) {
        for (name, info) in &content.tensor_infos {
            let elements: u64 = info.shape.iter().map(|&d| d as u64).product();
            let bytes = elements / info.dtype.block_size() as u64 * info.dtype.type_size() as u64;
            let start = content.tensor_data_offset.saturating_add(info.offset);
            self.places
                .insert(name.clone(), Place { file, start, bytes });
        }
    }

    /// The header of the file at `url`, asking for as much again of the file until it
    /// fits (so at most about twice the header is read).
    async fn header(&self, url: &str) -> Result<gguf_header::Content, HttpError> {
        let (mut bytes, total) = self.get(url, 0, FIRST_HEADER_BYTES).await?;
        loop {
            let have = bytes.len() as u64;
            match gguf_header::read(&mut Cursor::new(&bytes), HEADER_MEMORY_LIMIT) {
                Ok(content) => return Ok(content),
                Err(HeaderError::CutShort { .. }) if have < total && have < HEADER_MEMORY_LIMIT => {
                    let (more, _) = self.get(url, have, have).await?;
                    if more.is_empty() {
                        return Err(HttpError::ShortRange {
                            url: url.to_string(),
                            got: 0,
                            asked: have,
                        });
                    }
                    bytes.extend_from_slice(&more);
                }
                Err(problem) => {
                    return Err(HttpError::Header {
                        url: url.to_string(),
                        problem,
                    })
                }
            }
        }
    }

    /// Bytes `start..start + len` of the file at `url` (fewer where the file ends), and
    /// the file's length.
    async fn get(&self, url: &str, start: u64, len: u64) -> Result<(Vec<u8>, u64), HttpError> {
        let err = |source| HttpError::Request {
            url: url.to_string(),
            source,
        };
        let last = start + len.max(1) - 1;
        let response = self
            .client
            .get(url)
            .header(RANGE, format!("bytes={start}-{last}"))
            .send()
            .await
            .map_err(err)?;
        if response.status() != StatusCode::PARTIAL_CONTENT {
            return Err(HttpError::NoRanges {
                url: url.to_string(),
                status: response.status(),
            });
        }
        let total = response
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit_once('/'))
            .and_then(|(_, total)| total.parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        // Bounded by the range asked for: a server that sends more is cut off.
        let mut body = Vec::new();
        let mut response = response;
        while let Some(piece) = response.chunk().await.map_err(err)? {
            if body.len() as u64 + piece.len() as u64 > len {
                return Err(HttpError::ShortRange {
                    url: url.to_string(),
                    got: body.len() + piece.len(),
                    asked: len,
                });
            }
            body.extend_from_slice(&piece);
        }
        self.received
            .fetch_add(body.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok((body, total))
    }

    /// Bytes `range` of tensor `name`, if the files hold such a tensor.
    pub async fn tensor_range(
        &self,
        name: &str,
        range: std::ops::Range<u64>,
    ) -> Option<Result<Vec<u8>, HttpError>> {
        let place = self.places.get(name)?;
        if range.end > place.bytes || range.start >= range.end {
            return None;
        }
        let url = &self.urls[place.file];
        let len = range.end - range.start;
        Some(match self.get(url, place.start + range.start, len).await {
            Ok((bytes, _)) if bytes.len() as u64 == len => Ok(bytes),
            Ok((bytes, _)) => Err(HttpError::ShortRange {
                url: url.clone(),
                got: bytes.len(),
                asked: len,
            }),
            Err(e) => Err(e),
        })
    }

    /// Bytes received from the server so far, headers included.
    pub fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn url(&self) -> &str {
        &self.urls[0]
    }
}

/// The URL of split file `index` (from 0) of `count`, from the first one's.
fn split_url(first: &str, index: usize, count: usize) -> Option<String> {
    let suffix = format!("-00001-of-{count:05}.gguf");
    let stem = first.strip_suffix(&suffix)?;
    Some(format!("{stem}-{:05}-of-{count:05}.gguf", index + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_files_are_named_as_llama_cpp_names_them() {
        let first = "https://hub.example/m/Model-Q4_K_M-00001-of-00003.gguf";
        assert_eq!(
            split_url(first, 2, 3).unwrap(),
            "https://hub.example/m/Model-Q4_K_M-00003-of-00003.gguf"
        );
        assert_eq!(split_url("https://hub.example/m/Model.gguf", 1, 3), None);
    }
}
