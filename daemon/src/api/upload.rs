//! A streamed upload that listens while it talks: `POST` with a chunked body on a plain
//! socket, and the daemon's answer read on a second thread while the body is still going out.
//!
//! Why not the HTTP client every other call uses: it reads the answer only after the whole
//! body is sent. The daemon may refuse an ingest stream long before its end (another ingest is
//! running, the disk is full, a block arrived damaged); it answers at once and stops reading,
//! and such a client then dies on "Broken pipe" without ever seeing why. Here the answer is
//! read as soon as it comes, the upload stops there, and the caller gets the daemon's own
//! words. Only `http://` is spoken (the API has no TLS yet).
//!
//! The body comes as [`Chunks`], each a list of byte pieces (frame heads, slices of the
//! buffers the image was read into), and each goes out as one HTTP chunk in vectored writes:
//! the payload is never copied on its way to the socket.

use std::io::{IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::Duration;

use bytes::Bytes;

/// Largest answer read from the daemon (answers are small JSON objects).
const MAX_ANSWER: u64 = 1 << 20;

/// A streamed request body, one chunk at a time.
pub trait Chunks {
    /// The pieces of the next chunk, sent together; `None` at the end. An error ends the
    /// upload as a broken stream (no final chunk).
    fn next_chunk(&mut self) -> std::io::Result<Option<Vec<Bytes>>>;
}

/// How long to wait for a TCP connection to the daemon (as every other API call does).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to wait for the daemon's answer after the last body byte went out (or could not).
/// The daemon answers once the last frames are committed and the snapshot is made durable:
/// seconds, even for a large ingest. An hour means a daemon that hangs does not hang the
/// agent (and its `--lvm` snapshot or `--freeze`) forever.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3600);

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
    /// A write made no progress within the stall timeout.
    #[error("the link made no progress")]
    Stalled,
}

/// `POST base+path` with `body` sent chunked, `headers` added; the daemon's answer, whenever
/// it comes (before, during or after the body). With `stall`, it fails when the link makes no
/// progress for that long (a write that cannot go out) and waits at most ten times that (at
/// least 20 s) for the answer after the body: for a sender that must notice a cut link rather
/// than wait for TCP to give up.
pub(crate) fn post(
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Chunks,
    stall: Option<Duration>,
) -> Result<Answer, UploadError> {
    let target = Target::of(base, path)?;
    let sock = target.connect()?;
    if let Some(d) = stall {
        sock.set_write_timeout(Some(d)).map_err(UploadError::Connect)?;
    }
    let reader = sock.try_clone().map_err(UploadError::Connect)?;
    let (tx, answer) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(read_answer(reader));
    });
    let mut sock = sock;
    match send(&mut sock, &target, headers, body, &answer) {
        Ok(Some(early)) => return early,
        Ok(None) => {}
        Err(UploadError::Stalled) => {
            let _ = sock.shutdown(Shutdown::Both);
            let d = stall.unwrap_or_default();
            return Err(UploadError::Lost(format!("the link made no progress for {:.1}s", d.as_secs_f64())));
        }
        Err(e) => {
            // The daemon must see a broken stream, not an end: no final chunk, just gone.
            let _ = sock.shutdown(Shutdown::Both);
            return Err(e);
        }
    }
    let wait = stall.map_or(ANSWER_TIMEOUT, |d| (d * 10).max(Duration::from_secs(20)));
    match answer.recv_timeout(wait) {
        Ok(a) => a,
        Err(RecvTimeoutError::Timeout) => {
            let _ = sock.shutdown(Shutdown::Both);
            Err(UploadError::Lost("no answer from the daemon".into()))
        }
        Err(RecvTimeoutError::Disconnected) => Err(UploadError::Lost("the answer could not be read".into())),
    }
}

/// Where the upload goes: `http://HOST:PORT[/PREFIX]` plus the route's path.
#[derive(Debug)]
struct Target {
    /// `HOST:PORT` as the `Host` header carries it (IPv6 in brackets).
    authority: String,
    /// The socket addresses `HOST:PORT` resolves to.
    addrs: Vec<std::net::SocketAddr>,
    /// The base URL's path prefix, if any, and the route's path.
    path: String,
}

impl Target {
    fn of(base: &str, path: &str) -> Result<Target, UploadError> {
        let bad = |why: &str| UploadError::Url(format!("invalid API URL {base}: {why}"));
        let url = url::Url::parse(base).map_err(|e| bad(&e.to_string()))?;
        if url.scheme() != "http" {
            return Err(bad("only http:// is supported"));
        }
        let addrs = url.socket_addrs(|| Some(80)).map_err(|e| UploadError::Connect(std::io::Error::other(e)))?;
        let host = url.host_str().ok_or_else(|| bad("no host"))?;
        let authority = format!("{host}:{}", url.port_or_known_default().unwrap_or(80));
        let path = format!("{}{path}", url.path().trim_end_matches('/'));
        Ok(Target { authority, addrs, path })
    }

    /// The first address that answers within [`CONNECT_TIMEOUT`].
    fn connect(&self) -> Result<TcpStream, UploadError> {
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the API host has no address");
        for addr in &self.addrs {
            match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(UploadError::Connect(last))
    }
}

/// What reading an answer gives.
type Answered = Result<Answer, UploadError>;

/// Send the request head and the body. Stops early once an answer is waiting, and returns it.
/// A write that fails is not an error: the answer (or its absence) says what happened.
fn send(
    sock: &mut TcpStream,
    target: &Target,
    headers: &[(&str, &str)],
    mut body: impl Chunks,
    answer: &Receiver<Answered>,
) -> Result<Option<Answered>, UploadError> {
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: forkd/{}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n",
        target.path,
        target.authority,
        env!("CARGO_PKG_VERSION")
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    if sock.write_all(head.as_bytes()).is_err() {
        return Ok(None);
    }
    loop {
        if let Ok(early) = answer.try_recv() {
            return Ok(Some(early));
        }
        let Some(pieces) = body.next_chunk().map_err(UploadError::Body)? else {
            // The last chunk, empty; whether it went out or not, the answer tells.
            let _ = write_chunk(sock, &[], 0);
            return Ok(None);
        };
        let len: usize = pieces.iter().map(Bytes::len).sum();
        // Nothing to send (an empty chunk would end the body), or the daemon stopped reading.
        if len > 0 {
            match write_chunk(sock, &pieces, len) {
                Ok(()) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(UploadError::Stalled)
                }
                Err(_) => return Ok(None),
            }
        }
    }
}

/// One chunk of a chunked body (`len` bytes in `pieces`); an empty one is the last.
fn write_chunk(sock: &mut TcpStream, pieces: &[Bytes], len: usize) -> std::io::Result<()> {
    let size = format!("{len:x}\r\n");
    let mut slices = Vec::with_capacity(pieces.len() + 2);
    slices.push(IoSlice::new(size.as_bytes()));
    slices.extend(pieces.iter().filter(|p| !p.is_empty()).map(|p| IoSlice::new(p)));
    slices.push(IoSlice::new(b"\r\n"));
    write_all_vectored(sock, &mut slices)?;
    if len == 0 {
        sock.flush()?;
    }
    Ok(())
}

/// `write_all` for vectored writes (the standard one is not stable yet); writes at most
/// `IOV_MAX` slices per call.
fn write_all_vectored(sock: &mut TcpStream, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    const IOV_MAX: usize = 1024;
    while !slices.is_empty() {
        let at_once = slices.len().min(IOV_MAX);
        match sock.write_vectored(&slices[..at_once]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
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
        let Some(end) = start.checked_add(size).filter(|&end| size > 0 && end <= raw.len()) else { break };
        out.extend_from_slice(&raw[start..end]);
        raw = raw.get(end.saturating_add(2)..).unwrap_or(&[]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;

    #[test]
    fn chunked_bodies_decode_and_bad_sizes_stop_without_panic() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"), b"abcde");
        assert_eq!(dechunk(b"ffffffffffffffff\r\nabc\r\n"), b"");
        assert_eq!(dechunk(b"10\r\nshort\r\n"), b"");
        assert_eq!(dechunk(b"zz\r\n"), b"");
    }

    /// An endless body: the upload only ends because the daemon answered.
    struct Endless;

    impl Chunks for Endless {
        fn next_chunk(&mut self) -> std::io::Result<Option<Vec<Bytes>>> {
            Ok(Some(vec![Bytes::from_static(&[7u8; 4096]), Bytes::from(vec![7u8; 1 << 20])]))
        }
    }

    #[test]
    fn chunks_go_out_whole_and_the_body_ends_with_an_empty_chunk() {
        struct Three(u8);
        impl Chunks for Three {
            fn next_chunk(&mut self) -> std::io::Result<Option<Vec<Bytes>>> {
                self.0 += 1;
                Ok(match self.0 {
                    1 => Some(vec![Bytes::from_static(b"ab"), Bytes::new(), Bytes::from_static(b"cde")]),
                    2 => Some(vec![Bytes::new()]),
                    3 => Some(vec![Bytes::from(vec![b'x'; 70_000])]),
                    _ => None,
                })
            }
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (sock, _) = listener.accept().expect("accept");
            let mut reader = std::io::BufReader::new(sock.try_clone().expect("clone"));
            let mut line = String::new();
            while reader.read_line(&mut line).expect("read head") > 2 {
                line.clear();
            }
            let mut body = Vec::new();
            loop {
                let mut size = String::new();
                reader.read_line(&mut size).expect("chunk size");
                let n = usize::from_str_radix(size.trim(), 16).expect("hex size");
                let mut chunk = vec![0u8; n + 2];
                reader.read_exact(&mut chunk).expect("chunk");
                body.extend_from_slice(&chunk[..n]);
                if n == 0 {
                    break;
                }
            }
            (&sock).write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").expect("answer");
            body
        });
        let a = post(&format!("http://{addr}"), "/x", &[], Three(0), None).expect("an answer");
        assert_eq!(a.status, 200);
        let body = server.join().expect("server");
        assert_eq!(&body[..5], b"abcde");
        assert_eq!(body.len(), 5 + 70_000);
    }

    #[test]
    fn an_answer_before_the_end_of_the_body_is_heard() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (sock, _) = listener.accept().expect("accept");
            let mut reader = std::io::BufReader::new(sock.try_clone().expect("clone"));
            let mut head = String::new();
            while reader.read_line(&mut head).expect("read head") > 2 {}
            let body = r#"{"error":"an ingest into `prod` is already running"}"#;
            let answer = format!("HTTP/1.1 409 Conflict\r\ncontent-length: {}\r\n\r\n{body}", body.len());
            (&sock).write_all(answer.as_bytes()).expect("answer");
            // As a careful server does: no reset while the client may still read the answer.
            let _ = sock.shutdown(Shutdown::Write);
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
            head
        });
        let a = post(&format!("http://{addr}/prefix/"), "/v1/sources/prod/ingest", &[("X-Test", "1")], Endless, None)
            .expect("an answer");
        assert_eq!(a.status, 409);
        assert_eq!(a.reason, "Conflict");
        assert!(String::from_utf8_lossy(&a.body).contains("already running"));
        let head = server.join().expect("server");
        assert!(head.starts_with("POST /prefix/v1/sources/prod/ingest HTTP/1.1\r\n"), "{head}");
        assert!(head.contains(&format!("Host: {addr}\r\n")) && head.contains("X-Test: 1\r\n"), "{head}");
    }

    #[test]
    fn a_body_that_fails_is_the_error() {
        struct Broken;
        impl Chunks for Broken {
            fn next_chunk(&mut self) -> std::io::Result<Option<Vec<Bytes>>> {
                Err(std::io::Error::other("reading the image at offset 0: Input/output error"))
            }
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().expect("accept");
            let mut all = Vec::new();
            let _ = sock.read_to_end(&mut all);
        });
        let err = post(&format!("http://{addr}"), "/x", &[], Broken, None).expect_err("the body failed");
        assert!(matches!(err, UploadError::Body(_)), "{err:?}");
        assert!(err.to_string().contains("offset 0"), "{err}");
        server.join().expect("server");
    }
}
