//! A streamed upload that listens while it talks: `POST` with a chunked body on a plain
//! socket, and the daemon's answer read on a second thread while the body is still going out.
//!
//! Why not the HTTP client every other call uses: it reads the answer only after the whole
//! body is sent. The daemon may refuse an ingest stream long before its end (another ingest is
//! running, the disk is full, a block arrived damaged); it answers at once and stops reading,
//! and such a client then dies on "Broken pipe" without ever seeing why. Here the answer is
//! read as soon as it comes, the upload stops there, and the caller gets the daemon's own
//! words. Only `http://` is spoken (the API has no TLS yet).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::Duration;

/// Largest answer read from the daemon (answers are small JSON objects).
const MAX_ANSWER: u64 = 1 << 20;

/// Body bytes sent per chunk at most.
const CHUNK: usize = 1 << 20;

/// How long to wait for the daemon's answer after the last body byte went out (or could not).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

/// The daemon's answer: status, reason phrase, body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) reason: String,
    pub(crate) body: Vec<u8>,
}

/// Why an upload did not get an answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UploadError {
    /// The daemon could not be reached.
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    /// The API URL is not one this client can use.
    #[error("{0}")]
    Url(String),
    /// The body could not be produced (e.g. the image could not be read).
    #[error("{0}")]
    Body(std::io::Error),
    /// The connection broke before an answer arrived.
    #[error("{0}")]
    Lost(String),
}

/// `POST base+path` with `body` sent chunked, `headers` added; the daemon's answer, whenever
/// it comes (before, during or after the body).
pub(crate) fn post(base: &str, path: &str, headers: &[(&str, &str)], body: impl Read) -> Result<Answer, UploadError> {
    let (host, port) = host_port(base)?;
    let sock = TcpStream::connect((host.as_str(), port)).map_err(UploadError::Connect)?;
    let reader = sock.try_clone().map_err(UploadError::Connect)?;
    let (tx, answer) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(read_answer(reader));
    });
    let mut sock = sock;
    match send(&mut sock, &host, path, headers, body, &answer) {
        Ok(Some(early)) => return early,
        Ok(None) => {}
        Err(e) => {
            // The daemon must see a broken stream, not an end: no final chunk, just gone.
            let _ = sock.shutdown(Shutdown::Both);
            return Err(e);
        }
    }
    match answer.recv_timeout(ANSWER_TIMEOUT) {
        Ok(a) => a,
        Err(RecvTimeoutError::Timeout) => Err(UploadError::Lost("no answer from the daemon".into())),
        Err(RecvTimeoutError::Disconnected) => Err(UploadError::Lost("the answer could not be read".into())),
    }
}

/// `HOST`, `PORT` of an `http://HOST:PORT` base URL.
fn host_port(base: &str) -> Result<(String, u16), UploadError> {
    let url = url::Url::parse(base).map_err(|e| UploadError::Url(format!("invalid API URL {base}: {e}")))?;
    if url.scheme() != "http" {
        return Err(UploadError::Url(format!("invalid API URL {base}: only http:// is supported")));
    }
    let host = url.host_str().ok_or_else(|| UploadError::Url(format!("invalid API URL {base}: no host")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    Ok((host, url.port_or_known_default().unwrap_or(80)))
}

/// What reading an answer gives.
type Answered = Result<Answer, UploadError>;

/// Send the request head and the body. Stops early once an answer is waiting, and returns it.
/// A write that fails is not an error: the answer (or its absence) says what happened.
fn send(
    sock: &mut TcpStream,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    mut body: impl Read,
    answer: &Receiver<Answered>,
) -> Result<Option<Answered>, UploadError> {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: forkd/{}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n",
        env!("CARGO_PKG_VERSION")
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    if sock.write_all(head.as_bytes()).is_err() {
        return Ok(None);
    }
    let mut buf = vec![0u8; CHUNK];
    loop {
        if let Ok(early) = answer.try_recv() {
            return Ok(Some(early));
        }
        let n = body.read(&mut buf).map_err(UploadError::Body)?;
        if write_chunk(sock, &buf[..n]).is_err() || n == 0 {
            return Ok(None);
        }
    }
}

/// One chunk of a chunked body; an empty one is the last.
fn write_chunk(sock: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    sock.write_all(format!("{:x}\r\n", data.len()).as_bytes())?;
    sock.write_all(data)?;
    sock.write_all(b"\r\n")?;
    if data.is_empty() {
        sock.flush()?;
    }
    Ok(())
}

/// Read one HTTP/1.1 answer: the head, then a body by `Content-Length`, chunked, or to EOF.
fn read_answer(mut sock: TcpStream) -> Answered {
    let mut raw = Vec::new();
    let lost = |e: std::io::Error| UploadError::Lost(e.to_string());
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&raw) {
            Ok(httparse::Status::Complete(len)) => {
                let status = resp.code.unwrap_or(0);
                let reason = resp.reason.unwrap_or("").to_string();
                let framing = Framing::of(resp.headers);
                let rest = raw.split_off(len);
                let body = framing.read(rest, &mut sock).map_err(lost)?;
                return Ok(Answer { status, reason, body });
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(UploadError::Lost(format!("the daemon's answer is not HTTP: {e}"))),
        }
        if raw.len() as u64 > MAX_ANSWER {
            return Err(UploadError::Lost("the daemon's answer is too large".into()));
        }
        let mut buf = [0u8; 8192];
        let n = sock.read(&mut buf).map_err(lost)?;
        if n == 0 {
            return Err(UploadError::Lost("the daemon closed the connection without answering".into()));
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

/// How the answer's body is delimited.
#[derive(Debug)]
enum Framing {
    Length(u64),
    Chunked,
    ToEof,
}

impl Framing {
    fn of(headers: &[httparse::Header<'_>]) -> Framing {
        let value = |name: &str| {
            headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| String::from_utf8_lossy(h.value))
        };
        if value("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            return Framing::Chunked;
        }
        match value("content-length").and_then(|v| v.trim().parse().ok()) {
            Some(n) => Framing::Length(n),
            None => Framing::ToEof,
        }
    }

    /// The body, given the bytes already read after the head.
    fn read(&self, mut have: Vec<u8>, sock: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        let want = match self {
            Framing::Length(n) => (*n).min(MAX_ANSWER),
            Framing::Chunked | Framing::ToEof => MAX_ANSWER,
        };
        let already = have.len() as u64;
        sock.take(want.saturating_sub(already)).read_to_end(&mut have)?;
        have.truncate(usize::try_from(want).unwrap_or(usize::MAX));
        Ok(match self {
            Framing::Chunked => dechunk(&have),
            _ => have,
        })
    }
}

/// The data of a complete chunked body (whatever follows the last chunk is ignored).
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&raw[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim().to_string();
        let Ok(size) = usize::from_str_radix(&size_text, 16) else { break };
        let start = eol + 2;
        if size == 0 || start + size > raw.len() {
            break;
        }
        out.extend_from_slice(&raw[start..start + size]);
        raw = raw.get(start + size + 2..).unwrap_or(&[]);
    }
    out
}
