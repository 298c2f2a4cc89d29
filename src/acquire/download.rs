//! HTTP(S) transfers with resume: one engine that feeds either a partial file in the cache
//! (`fetch`) or a channel that a reader drains (`write URL`, streaming).
//!
//! Resume: after a dropped connection or a stall, the next attempt asks for `Range:
//! bytes=N-` with `If-Range` set to the validator of the first response (a strong ETag, else
//! Last-Modified), so a changed file is never spliced onto an old prefix. A server that answers
//! 200 instead of 206 restarts a file download from zero; a stream (which cannot take bytes
//! back) skips the prefix only when the validator proves the content is the same.
//!
//! Timeouts: a connect timeout and a read-idle timeout (no byte for that long), not a total
//! timeout, so large images on slow links still finish while a dead peer fails promptly.

use super::cache::{Partial, PartialMeta};
use super::{AcquireError, Result};
use crate::exit::Classify;
use crate::progress::Phase;
use crate::progress::{Event, Level, Reporter};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub(crate) struct DownloadOptions {
    /// Extra trusted CA certificates (PEM) for private mirrors, on top of the web PKI roots.
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) connect_timeout: Duration,
    /// No byte received for this long fails the attempt (then it is retried).
    pub(crate) idle_timeout: Duration,
    /// Retries after failed attempts; an attempt that moved 1 MiB or more resets the count.
    pub(crate) retries: u32,
    /// First backoff; doubles per consecutive failure, at most 10 s.
    pub(crate) backoff: Duration,
    /// Plain HTTP (and redirects to it) allowed: only when the source's digest is pinned.
    pub(crate) allow_http: bool,
    /// URL prefix rewrites from the config file, tried in order before the original URL.
    pub(crate) mirrors: Vec<crate::config::Mirror>,
}

impl DownloadOptions {
    /// The URLs to try for `url`: each matching mirror's rewrite, then `url` itself.
    pub(crate) fn candidates(&self, url: &str) -> Vec<String> {
        crate::config::mirror_candidates(&self.mirrors, url)
    }
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            ca_file: None,
            connect_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(30),
            retries: 5,
            backoff: Duration::from_millis(500),
            allow_http: false,
            mirrors: Vec::new(),
        }
    }
}

/// An attempt that moved at least this much before failing proves the link works, so the
/// retry count starts over; a peer that trickles a few KiB per connection still runs out.
const PROGRESS_RESETS_RETRIES: u64 = 1 << 20;

/// Where the bytes of a transfer go.
pub(crate) enum Sink<'a> {
    /// A partial file: can restart from zero.
    File {
        file: std::io::BufWriter<std::fs::File>,
        partial: &'a Partial,
    },
    /// A streaming consumer: bytes cannot be taken back. The network's chunks are handed on
    /// as they are (no copy), and hashed here, on the download thread, which otherwise waits
    /// on the socket: the consumer's thread (decompression, writing) is the busy one.
    Channel {
        tx: ChunkTx,
        hasher: Option<Box<super::digest::Hasher>>,
    },
}

/// How many downloaded bytes may wait for the consumer. Large enough that the download keeps
/// going while the writer is still setting up (target checks, confirmation, discard) and
/// through its fsyncs, small enough not to matter in memory.
const IN_FLIGHT: usize = 32 << 20;

/// The download's end of the chunk queue: bounded by bytes, not chunks (hyper's chunks range
/// from a few KiB to ~400 KiB, so a chunk count bounds neither memory nor read-ahead well).
pub(crate) struct ChunkTx {
    tx: tokio::sync::mpsc::UnboundedSender<bytes::Bytes>,
    room: Arc<tokio::sync::Semaphore>,
}

/// The consumer's end; dropping it stops the download (its next send fails).
pub(crate) struct ChunkRx {
    rx: tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes>,
    room: Arc<tokio::sync::Semaphore>,
}

fn permits(len: usize) -> u32 {
    len.min(IN_FLIGHT) as u32
}

pub(crate) fn chunk_queue() -> (ChunkTx, ChunkRx) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let room = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    (
        ChunkTx {
            tx,
            room: room.clone(),
        },
        ChunkRx { rx, room },
    )
}

impl ChunkTx {
    /// Waits for room, then queues the chunk; false once the consumer is gone.
    async fn send(&self, c: bytes::Bytes) -> bool {
        match self.room.acquire_many(permits(c.len())).await {
            Ok(p) => p.forget(),
            Err(_) => return false,
        }
        self.tx.send(c).is_ok()
    }
}

impl ChunkRx {
    /// The next chunk (blocking); None when the download thread has ended.
    pub(crate) fn recv(&mut self) -> Option<bytes::Bytes> {
        let c = self.rx.blocking_recv()?;
        self.room.add_permits(permits(c.len()) as usize);
        Some(c)
    }
}

impl Drop for ChunkRx {
    fn drop(&mut self) {
        self.room.close();
    }
}

impl Sink<'_> {
    async fn write(&mut self, buf: bytes::Bytes) -> Result<()> {
        match self {
            Sink::File { file, partial } => file
                .write_all(&buf)
                .map_err(|e| AcquireError::io(&partial.data, e)),
            Sink::Channel { tx, hasher } => {
                if let Some(h) = hasher {
                    h.update(&buf);
                }
                if tx.send(buf).await {
                    return Ok(());
                }
                Err(AcquireError::io(
                    "download stream",
                    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "consumer stopped reading"),
                ))
            }
        }
    }

    fn flush(&mut self) -> Result<()> {
        if let Sink::File { file, partial } = self {
            file.flush()
                .map_err(|e| AcquireError::io(&partial.data, e))?;
        }
        Ok(())
    }

    /// Start over from byte 0, if this sink can.
    fn restart(&mut self) -> Result<bool> {
        match self {
            Sink::File { file, partial } => {
                file.flush()
                    .map_err(|e| AcquireError::io(&partial.data, e))?;
                let f = file.get_mut();
                f.set_len(0)
                    .and_then(|_| f.rewind())
                    .map_err(|e| AcquireError::io(&partial.data, e))?;
                Ok(true)
            }
            Sink::Channel { .. } => Ok(false),
        }
    }

    fn remember(&self, m: &PartialMeta) -> Result<()> {
        if let Sink::File { partial, .. } = self {
            partial.write_meta(m)?;
        }
        Ok(())
    }
}

/// Position and validator of a transfer, carried across attempts.
#[derive(Debug, Clone, Default)]
pub(crate) struct ResumeState {
    pub(crate) offset: u64,
    pub(crate) etag: Option<String>,
    pub(crate) last_modified: Option<String>,
    pub(crate) total: Option<u64>,
}

impl ResumeState {
    fn if_range(&self) -> Option<&str> {
        // Weak ETags are not allowed in If-Range (RFC 9110 13.1.5).
        match &self.etag {
            Some(e) if !e.starts_with("W/") => Some(e),
            _ => self.last_modified.as_deref(),
        }
    }
}

/// One failed attempt: retry it or give up.
struct AttemptError {
    err: AcquireError,
    retry: bool,
}

impl From<AcquireError> for AttemptError {
    fn from(err: AcquireError) -> Self {
        AttemptError { err, retry: false }
    }
}

#[derive(Clone)]
pub(crate) struct Downloader {
    client: reqwest::Client,
    opts: DownloadOptions,
}

impl Downloader {
    pub(crate) fn new(opts: DownloadOptions) -> Result<Downloader> {
        let allow_http = opts.allow_http;
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 10 {
                attempt.error("more than 10 redirects")
            } else if !allow_http && attempt.url().scheme() != "https" {
                let u = attempt.url().to_string();
                attempt.error(format!(
                    "redirect to non-HTTPS URL {u} refused for a source without a pinned digest"
                ))
            } else {
                attempt.follow()
            }
        });
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("sbcflash/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(opts.connect_timeout)
            .redirect(policy)
            .https_only(!opts.allow_http);
        let mut pinned = Vec::new();
        if let Some(ca) = &opts.ca_file {
            let pem = std::fs::read(ca).map_err(|e| AcquireError::io(ca, e))?;
            pinned = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| {
                    AcquireError::BadDigest(format!(
                        "{}: not a PEM certificate bundle: {e}",
                        ca.display()
                    ))
                })?;
            if pinned.is_empty() {
                return Err(AcquireError::BadDigest(format!(
                    "{}: no certificate found in the file",
                    ca.display()
                )));
            }
        }
        let tls = super::tls::client_config(pinned).map_err(|e| AcquireError::Network {
            url: String::new(),
            msg: format!("cannot set up TLS: {e}"),
        })?;
        b = b.use_preconfigured_tls(tls);
        let client = b.build().map_err(|e| AcquireError::Network {
            url: String::new(),
            msg: format!("cannot set up the HTTP client: {e}"),
        })?;
        Ok(Downloader { client, opts })
    }

    /// Downloads `url` into `partial.data`, resuming what an earlier run left there when the
    /// remembered validator still applies. Blocking; the caller holds the partial's lock.
    pub(crate) fn download_to_partial(
        &self,
        url: &str,
        partial: &Partial,
        reporter: &dyn Reporter,
        job: &str,
    ) -> Result<u64> {
        let file = partial.open_data()?;
        let have = file
            .metadata()
            .map_err(|e| AcquireError::io(&partial.data, e))?
            .len();
        let mut state = ResumeState::default();
        match partial.read_meta(url) {
            Some(m) if have > 0 && m.total.is_none_or(|t| have <= t) => {
                state = ResumeState {
                    offset: have,
                    etag: m.etag,
                    last_modified: m.last_modified,
                    total: m.total,
                };
                reporter.report(Event::Message {
                    job: job.into(),
                    level: Level::Info,
                    text: format!("resuming {url} at byte {have}"),
                });
            }
            _ => {
                file.set_len(0)
                    .map_err(|e| AcquireError::io(&partial.data, e))?;
            }
        }
        let mut file = std::io::BufWriter::with_capacity(1 << 20, file);
        file.seek(std::io::SeekFrom::Start(state.offset))
            .map_err(|e| AcquireError::io(&partial.data, e))?;
        let mut sink = Sink::File { file, partial };
        let rt = runtime()?;
        rt.block_on(self.transfer(url, &mut sink, &mut state, reporter, job))?;
        sink.flush()?;
        Ok(state.offset)
    }

    /// Runs a transfer on its own thread and returns a channel of its bytes; the thread's
    /// result (the digests of everything it sent, or the error that ended it) comes back
    /// through the join handle.
    pub(crate) fn spawn_stream(
        &self,
        url: String,
        with_sha256: bool,
        reporter: Arc<dyn Reporter>,
        job: String,
    ) -> (ChunkRx, std::thread::JoinHandle<Result<super::Digests>>) {
        let (tx, rx) = chunk_queue();
        let this = self.clone();
        let h = std::thread::Builder::new()
            .name("sbcflash-download".into())
            .spawn(move || {
                let rt = runtime()?;
                let mut sink = Sink::Channel {
                    tx,
                    hasher: Some(Box::new(super::digest::Hasher::new(with_sha256))),
                };
                let mut state = ResumeState::default();
                rt.block_on(this.transfer(&url, &mut sink, &mut state, &*reporter, &job))?;
                match sink {
                    Sink::Channel {
                        hasher: Some(h), ..
                    } => Ok(h.finish()),
                    _ => unreachable!("a channel sink keeps its hasher"),
                }
            })
            .expect("spawn download thread");
        (rx, h)
    }

    /// Tries each mirror of `url` (config `[[mirrors]]`), then `url` itself, each with
    /// [`Self::retry_loop`]. A mirror that fails hands over to the next candidate; a file
    /// download starts over from byte 0 there (the next server's validators differ), a stream
    /// continues at its offset with a plain Range request (mirrors serve the same bytes, and
    /// the source digest is checked at the end either way).
    pub(crate) async fn transfer(
        &self,
        url: &str,
        sink: &mut Sink<'_>,
        st: &mut ResumeState,
        reporter: &dyn Reporter,
        job: &str,
    ) -> Result<()> {
        check_scheme(url, self.opts.allow_http)?;
        reporter.report(Event::Start {
            job: job.into(),
            phase: Phase::Download,
            total: st.total,
            detail: Some(url.to_string()),
        });
        let candidates = self.opts.candidates(url);
        let mut served_by = url;
        for (i, cand) in candidates.iter().enumerate() {
            let last = i + 1 == candidates.len();
            let res = match check_scheme(cand, self.opts.allow_http) {
                Ok(()) => self.retry_loop(cand, sink, st, reporter, job, last).await,
                Err(e) => Err(e),
            };
            match res {
                Ok(()) => {
                    served_by = cand;
                    break;
                }
                Err(e) if !last => {
                    let next = &candidates[i + 1];
                    reporter.report(Event::Message {
                        job: job.into(),
                        level: Level::Warn,
                        text: format!("mirror {cand} failed ({e}); trying {next}"),
                    });
                    st.etag = None;
                    st.last_modified = None;
                    if st.offset > 0 && sink.restart()? {
                        st.offset = 0;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let mut summary = serde_json::json!({ "url": url, "bytes": st.offset });
        if served_by != url {
            summary["mirror"] = serde_json::json!(served_by);
        }
        reporter.report(Event::Finish {
            job: job.into(),
            phase: Phase::Download,
            summary,
        });
        Ok(())
    }

    /// The retry loop around [`Self::attempt`] for one URL. `report_error`: emit the error
    /// event (only for the last candidate: a failed mirror is not the end of the download).
    async fn retry_loop(
        &self,
        url: &str,
        sink: &mut Sink<'_>,
        st: &mut ResumeState,
        reporter: &dyn Reporter,
        job: &str,
        report_error: bool,
    ) -> Result<()> {
        let mut failures = 0u32;
        loop {
            if st.offset > 0 && st.total == Some(st.offset) {
                return Ok(()); // a previous run got everything
            }
            let before = st.offset;
            let res = self.attempt(url, sink, st, reporter, job).await;
            sink.flush()?;
            match res {
                Ok(()) => return Ok(()),
                Err(a) => {
                    if st.offset >= before + PROGRESS_RESETS_RETRIES {
                        failures = 0;
                    }
                    if !a.retry || failures >= self.opts.retries {
                        if report_error {
                            reporter.report(Event::Error {
                                job: job.into(),
                                phase: Phase::Download,
                                message: a.err.to_string(),
                                exit_code: a.err.exit().code(),
                            });
                        }
                        return Err(a.err);
                    }
                    failures += 1;
                    let wait = self
                        .opts
                        .backoff
                        .saturating_mul(1 << (failures - 1).min(5))
                        .min(Duration::from_secs(10));
                    reporter.report(Event::Message {
                        job: job.into(),
                        level: Level::Warn,
                        text: format!(
                            "{}; retrying from byte {} in {} ms (attempt {failures} of {})",
                            a.err,
                            st.offset,
                            wait.as_millis(),
                            self.opts.retries
                        ),
                    });
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn attempt(
        &self,
        url: &str,
        sink: &mut Sink<'_>,
        st: &mut ResumeState,
        reporter: &dyn Reporter,
        job: &str,
    ) -> std::result::Result<(), AttemptError> {
        use reqwest::header::{IF_RANGE, RANGE};
        let mut req = self.client.get(url);
        if st.offset > 0 {
            req = req.header(RANGE, format!("bytes={}-", st.offset));
            if let Some(v) = st.if_range() {
                req = req.header(IF_RANGE, v);
            }
        }
        let idle = self.opts.idle_timeout;
        let resp = match tokio::time::timeout(idle + self.opts.connect_timeout, req.send()).await {
            Err(_) => {
                return Err(AttemptError {
                    err: AcquireError::Timeout {
                        url: url.into(),
                        msg: format!(
                            "no response within {} s",
                            (idle + self.opts.connect_timeout).as_secs()
                        ),
                    },
                    retry: true,
                })
            }
            Ok(Err(e)) => return Err(classify_reqwest(url, &e, self.opts.ca_file.as_deref())),
            Ok(Ok(r)) => r,
        };
        let mut skip = accept_status(url, &resp, sink, st)?;
        sink.remember(&PartialMeta {
            url: url.into(),
            etag: st.etag.clone(),
            last_modified: st.last_modified.clone(),
            total: st.total,
        })?;
        let mut resp = resp;
        loop {
            let chunk = match tokio::time::timeout(idle, resp.chunk()).await {
                Err(_) => {
                    return Err(AttemptError {
                        err: AcquireError::Timeout {
                            url: url.into(),
                            msg: format!(
                                "no data for {} s at byte {}",
                                idle.as_secs_f32(),
                                st.offset
                            ),
                        },
                        retry: true,
                    })
                }
                Ok(Err(e)) => {
                    let mut a = classify_reqwest(url, &e, self.opts.ca_file.as_deref());
                    if let AcquireError::Network { msg, .. } = &mut a.err {
                        *msg = format!("connection lost at byte {}: {msg}", st.offset);
                    }
                    a.retry = true;
                    return Err(a);
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(c))) => c,
            };
            let mut data = chunk;
            if skip > 0 {
                let n = (skip as usize).min(data.len());
                data = data.slice(n..);
                skip -= n as u64;
            }
            if !data.is_empty() {
                let n = data.len() as u64;
                sink.write(data).await?;
                st.offset += n;
                reporter.report(Event::Progress {
                    job: job.into(),
                    phase: Phase::Download,
                    done: st.offset,
                    total: st.total,
                });
            }
        }
        if let Some(t) = st.total {
            if st.offset < t {
                return Err(AttemptError {
                    err: AcquireError::Network {
                        url: url.into(),
                        msg: format!("connection closed at byte {} of {t}", st.offset),
                    },
                    retry: true,
                });
            }
        }
        Ok(())
    }
}

/// What a response's status means for the resume state `st`: how many bytes of the body to
/// skip (a 200 to a resumed request, for the same file), or why this attempt ends and whether
/// another may follow.
fn accept_status(
    url: &str,
    resp: &reqwest::Response,
    sink: &mut Sink<'_>,
    st: &mut ResumeState,
) -> std::result::Result<u64, AttemptError> {
    use reqwest::header::{CONTENT_RANGE, ETAG, LAST_MODIFIED};
    let status = resp.status().as_u16();
    let header = |n: reqwest::header::HeaderName| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let etag = header(ETAG);
    let last_modified = header(LAST_MODIFIED);
    let mut skip = 0u64;
    match status {
        206 => {
            let cr = header(CONTENT_RANGE).unwrap_or_default();
            let (start, total) = parse_content_range(&cr).ok_or_else(|| AcquireError::Network {
                url: url.into(),
                msg: format!("206 with an unusable Content-Range {cr:?}"),
            })?;
            if start != st.offset {
                return Err(AcquireError::Network {
                    url: url.into(),
                    msg: format!(
                        "asked to resume at byte {}, server sent from {start}",
                        st.offset
                    ),
                }
                .into());
            }
            st.total = total.or(st.total);
        }
        200 => {
            let same = st.offset > 0
                && (etag.is_some() || last_modified.is_some())
                && etag == st.etag
                && last_modified == st.last_modified;
            if st.offset > 0 {
                if sink.restart()? {
                    st.offset = 0;
                } else if same {
                    skip = st.offset;
                } else {
                    return Err(AcquireError::Network {
                        url: url.into(),
                        msg: "the file changed on the server while it was being streamed (or the server cannot resume); the stream is incomplete".into(),
                    }
                    .into());
                }
            }
            st.etag = etag;
            st.last_modified = last_modified;
            st.total = resp.content_length();
        }
        416 if st.offset > 0 => {
            // Our partial is not a prefix of what is there now.
            if sink.restart()? {
                st.offset = 0;
                st.total = None;
                return Err(AttemptError {
                    err: AcquireError::Status {
                        url: url.into(),
                        status,
                    },
                    retry: true,
                });
            }
            return Err(AcquireError::Status {
                url: url.into(),
                status,
            }
            .into());
        }
        408 | 429 | 500..=599 => {
            return Err(AttemptError {
                err: AcquireError::Status {
                    url: url.into(),
                    status,
                },
                retry: true,
            })
        }
        _ => {
            return Err(AcquireError::Status {
                url: url.into(),
                status,
            }
            .into())
        }
    }
    Ok(skip)
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AcquireError::io("tokio runtime", e))
}

/// HTTPS always; plain HTTP only when the digest is pinned (it is then checked end to end).
pub(crate) fn check_scheme(url: &str, allow_http: bool) -> Result<()> {
    let u = reqwest::Url::parse(url)
        .map_err(|e| AcquireError::Usage(format!("{url}: not a valid URL: {e}")))?;
    match u.scheme() {
        "https" => Ok(()),
        "http" if allow_http => Ok(()),
        "http" => Err(AcquireError::InsecureUrl { url: url.into() }),
        s => Err(AcquireError::Usage(format!(
            "{url}: unsupported URL scheme {s:?} (use https://)"
        ))),
    }
}

fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((start.parse().ok()?, total))
}

/// The rustls error in `e`, also when tokio-rustls and hyper wrapped it in (nested) io::Errors,
/// whose `source()` skips the error they carry.
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(t) = e.downcast_ref::<rustls::Error>() {
        return Some(t);
    }
    let inner = e.downcast_ref::<std::io::Error>()?.get_ref()?;
    rustls_error(inner)
}

/// Turns a reqwest error into our error class by walking its causes (reqwest folds DNS, TLS
/// and refused connections into one "connect" error).
fn classify_reqwest(url: &str, e: &reqwest::Error, ca_file: Option<&Path>) -> AttemptError {
    let mut chain = Vec::new();
    let mut tls = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(t) = rustls_error(c) {
            tls = Some(t);
        }
        let s = c.to_string();
        if !chain.iter().any(|x: &String| x.contains(&s)) {
            chain.push(s);
        }
        cur = c.source();
    }
    let root = chain.last().cloned().unwrap_or_default();
    let all = chain.join(": ").to_ascii_lowercase();
    let url = url.to_string();
    if e.is_redirect() {
        return AcquireError::Network {
            url,
            msg: chain.join(": "),
        }
        .into();
    }
    if all.contains("dns error") || all.contains("failed to lookup address") {
        return AttemptError {
            err: AcquireError::Dns { url, msg: root },
            retry: false,
        };
    }
    if let Some(t) = tls {
        let host = reqwest::Url::parse(&url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        let msg = super::tls::explain(t, &host, ca_file);
        return AcquireError::Tls { url, msg }.into();
    }
    if all.contains("certificate") || all.contains("tls handshake") {
        let msg = format!("{root} (for a private mirror, pass its CA certificate with --ca-file)");
        return AcquireError::Tls { url, msg }.into();
    }
    if e.is_timeout() {
        return AttemptError {
            err: AcquireError::Timeout { url, msg: root },
            retry: true,
        };
    }
    if e.is_connect() {
        return AttemptError {
            err: AcquireError::Connect { url, msg: root },
            retry: true,
        };
    }
    AttemptError {
        err: AcquireError::Network {
            url,
            msg: chain.join(": "),
        },
        retry: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some((100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn schemes() {
        assert!(check_scheme("https://x/y", false).is_ok());
        assert!(matches!(
            check_scheme("http://x/y", false),
            Err(AcquireError::InsecureUrl { .. })
        ));
        assert!(check_scheme("http://x/y", true).is_ok());
        assert!(check_scheme("ftp://x/y", true).is_err());
    }
}
