//! A lean HTTP/1.1 keep-alive client for the bench's request-per-message
//! work (publishing, long polling), where a general client's per-request
//! cost would make the load tool, which shares the machine's cores with the
//! server, the bottleneck: reqwest spent ~21 µs of the tool's CPU per
//! acknowledged publish, this client a fraction of that (BENCHMARKS.md).
//!
//! One request at a time on one connection; bodies framed by
//! `Content-Length` or chunked; a connection the server closes is opened
//! again for the next request. Loopback plain HTTP only, as the bench is.

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Response heads longer than this are refused: the servers measured send
/// a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;

pub(crate) struct Http1 {
    /// `host:port`, from the server URL.
    authority: String,
    stream: Option<TcpStream>,
    /// Bytes read and not yet consumed (the start of the next response).
    buf: Vec<u8>,
    /// The request being written, kept for its capacity.
    out: Vec<u8>,
}

/// A response: status, the headers the bench reads, and the body.
pub(crate) struct Response {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Response {
    /// A header's value, by case-insensitive name.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Splits `http://host:port/path?query` into its authority and its path.
pub(crate) fn split_url(url: &str) -> anyhow::Result<(&str, &str)> {
    let rest = url.strip_prefix("http://").with_context(|| format!("not an http:// URL: {url}"))?;
    Ok(match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    })
}

impl Http1 {
    /// A client for the server at `server` (`http://host:port`); connects on
    /// the first request.
    pub(crate) fn new(server: &str) -> anyhow::Result<Self> {
        let (authority, _) = split_url(server)?;
        Ok(Http1 { authority: authority.to_owned(), stream: None, buf: Vec::new(), out: Vec::new() })
    }

    /// Sends one request and reads its whole response. `headers` are written
    /// as given (`name: value`); `Host` and `Content-Length` are added.
    pub(crate) async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<Response> {
        self.out.clear();
        self.out.extend_from_slice(format!("{method} {path} HTTP/1.1\r\nhost: {}\r\n", self.authority).as_bytes());
        for (name, value) in headers {
            self.out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        if !body.is_empty() || method == "POST" {
            self.out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        }
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(body);
        // A kept-alive connection the server has meanwhile closed fails on
        // the write or reads nothing: one fresh connection retries it.
        // (Every request the bench sends may be sent twice: a publish that
        // reached the server would be counted as a duplicate by the tally.)
        let reused = self.stream.is_some();
        match self.exchange().await {
            Err(e) if reused && is_stale(&e) => {
                self.stream = None;
                self.exchange().await
            }
            r => r,
        }
    }

    async fn exchange(&mut self) -> anyhow::Result<Response> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(&self.authority).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
            self.buf.clear();
        }
        let result = self.send_and_read().await;
        if !matches!(&result, Ok((_, true))) {
            // An error, or the server said it closes: the next request opens anew.
            self.stream = None;
        }
        result.map(|(r, _)| r)
    }

    /// The response, and whether the connection may be used again.
    async fn send_and_read(&mut self) -> anyhow::Result<(Response, bool)> {
        let stream = self.stream.as_mut().context("not connected")?;
        stream.write_all(&self.out).await.map_err(Stale::from)?;
        let (status, headers, head_len) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut slots);
            match parsed.parse(&self.buf)? {
                httparse::Status::Complete(len) => {
                    let headers = parsed
                        .headers
                        .iter()
                        .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
                        .collect::<Vec<_>>();
                    break (parsed.code.context("no status")?, headers, len);
                }
                httparse::Status::Partial if self.buf.len() > MAX_HEAD => bail!("response head over {MAX_HEAD} bytes"),
                httparse::Status::Partial => {
                    // Nothing of the response yet and the connection ends:
                    // the server had closed it.
                    let nothing_yet = self.buf.is_empty();
                    match read_more(stream, &mut self.buf).await {
                        Ok(0) if nothing_yet => return Err(Stale(std::io::ErrorKind::UnexpectedEof.into()).into()),
                        Ok(0) => bail!("connection closed in the response head"),
                        Ok(_) => {}
                        Err(e) if nothing_yet => return Err(Stale(e).into()),
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        };
        self.buf.drain(..head_len);
        let mut response = Response { status, headers, body: Vec::new() };
        let keep_alive = !response.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let no_body = status == 204 || status == 304 || (100..200).contains(&status);
        if no_body {
        } else if response.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            response.body = read_chunked(stream, &mut self.buf).await?;
        } else if let Some(len) = response.header("content-length") {
            let len: usize = len.trim().parse().context("bad content-length")?;
            while self.buf.len() < len {
                if read_more(stream, &mut self.buf).await? == 0 {
                    bail!("connection closed in the body");
                }
            }
            response.body = self.buf.drain(..len).collect();
        } else {
            // Delimited by the end of the connection.
            while read_more(stream, &mut self.buf).await? > 0 {}
            response.body = std::mem::take(&mut self.buf);
            return Ok((response, false));
        }
        Ok((response, keep_alive))
    }
}

/// The connection was found closed before any of the response arrived.
#[derive(Debug)]
struct Stale(std::io::Error);

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connection closed by the server: {}", self.0)
    }
}

impl std::error::Error for Stale {}

impl From<std::io::Error> for Stale {
    fn from(e: std::io::Error) -> Self {
        Stale(e)
    }
}

fn is_stale(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Stale>().is_some()
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    buf.reserve(8 * 1024);
    stream.read_buf(buf).await
}

/// A chunked body, decoded; trailers are read and dropped.
async fn read_chunked(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if read_more(stream, buf).await? == 0 {
                bail!("connection closed in a chunked body");
            }
        };
        let size_text = std::str::from_utf8(&buf[..line_end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers, up to an empty line.
            loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    buf.drain(..i + 2);
                    if i == 0 {
                        return Ok(body);
                    }
                    continue;
                }
                if read_more(stream, buf).await? == 0 {
                    bail!("connection closed in a chunked body's trailers");
                }
            }
        }
        while buf.len() < size + 2 {
            if read_more(stream, buf).await? == 0 {
                bail!("connection closed in a chunk");
            }
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_authority_and_path() {
        assert_eq!(split_url("http://127.0.0.1:8080/api/x?y=1").unwrap(), ("127.0.0.1:8080", "/api/x?y=1"));
        assert_eq!(split_url("http://localhost:1").unwrap(), ("localhost:1", "/"));
        assert!(split_url("https://x/").is_err());
    }

    /// A real exchange with a one-shot server written by hand: keep-alive
    /// with Content-Length, then a chunked answer that closes.
    #[tokio::test]
    async fn reads_sized_and_chunked_bodies_on_one_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut chunk = [0u8; 4096];
            // Two requests on one connection; answer each once its head (and
            // the first one's 5-byte body) is in.
            while !seen.ends_with(b"\r\n\r\nhello") {
                let n = s.read(&mut chunk).await.unwrap();
                seen.extend_from_slice(&chunk[..n]);
            }
            s.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nETag: 7\r\n\r\nok").await.unwrap();
            seen.clear();
            while !seen.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut chunk).await.unwrap();
                seen.extend_from_slice(&chunk[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8(seen).unwrap()
        });
        let mut http = Http1::new(&format!("http://{addr}")).unwrap();
        let first = http.request("POST", "/p", &[("content-type", "text/plain")], b"hello").await.unwrap();
        assert_eq!((first.status, first.body.as_slice(), first.header("etag")), (201, &b"ok"[..], Some("7")));
        let second = http.request("GET", "/g?x=1", &[], b"").await.unwrap();
        assert_eq!((second.status, second.body.as_slice()), (200, &b"abcde"[..]));
        assert!(http.stream.is_none(), "Connection: close is honoured");
        let second_head = server.await.unwrap();
        assert!(second_head.starts_with(&format!("GET /g?x=1 HTTP/1.1\r\nhost: {addr}\r\n")), "{second_head}");
        assert!(!second_head.contains("content-length"), "a GET without a body says no length: {second_head}");
    }
}
