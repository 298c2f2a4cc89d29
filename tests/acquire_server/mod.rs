//! A small HTTPS server on 127.0.0.1 for download tests: a CA made for the test (rcgen), a
//! leaf certificate for 127.0.0.1/localhost, HTTP/1.1 with Range + If-Range, and routes that
//! misbehave on purpose (drop mid-file, wrong bytes, stall, error status, redirect).
//! Runs on its own tokio runtime; dropped = shut down (no stray tasks or sockets).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug)]
pub enum Behavior {
    /// Serve the body, honouring Range/If-Range.
    Normal,
    /// The first `times` requests send only `n` bytes of their range, then cut the connection.
    DropAfter { n: u64, times: usize },
    /// Serve the body with one byte flipped in the middle.
    WrongBytes,
    /// Send the headers and 4 KiB, then nothing (until shutdown).
    Stall,
    /// Answer with this status and an empty body.
    Status(u16),
    /// 302 to another path.
    Redirect(String),
    /// Ignore Range (always 200 with the full body).
    NoRange,
}

#[derive(Clone, Debug)]
pub struct Logged {
    pub path: String,
    pub range: Option<String>,
    pub if_range: Option<String>,
}

struct Route {
    body: Arc<Vec<u8>>,
    /// Computed once when the route is added, not per request (hashing a large body on every
    /// request delayed the first byte, for curl and sbcflash alike).
    etag: String,
    behavior: Behavior,
    served: usize,
}

pub struct TestServer {
    pub addr: SocketAddr,
    /// PEM of the test CA, to pass with --ca-file.
    pub ca_file: PathBuf,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    pub log: Arc<Mutex<Vec<Logged>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl TestServer {
    pub fn start(dir: &Path) -> TestServer {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sbcflash test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut leaf_params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf_params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        let ca_file = dir.join("test-ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Self::serve(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            ca_file,
        )
    }

    /// A server presenting `cert_pem` (e.g. a self-signed certificate from `openssl req -x509`)
    /// with its key; `ca_file` is that certificate, as a user would pass it with --ca-file.
    pub fn start_with_cert(dir: &Path, cert_pem: &[u8], key_pem: &[u8]) -> TestServer {
        let certs: Vec<_> = rustls_pemfile::certs(&mut &cert_pem[..])
            .collect::<Result<_, _>>()
            .expect("certificate PEM");
        let key = rustls_pemfile::private_key(&mut &key_pem[..])
            .expect("key PEM")
            .expect("a private key");
        let ca_file = dir.join("server-cert.pem");
        std::fs::write(&ca_file, cert_pem).unwrap();
        Self::serve(certs, key, ca_file)
    }

    fn serve(
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
        ca_file: PathBuf,
    ) -> TestServer {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let routes: Arc<Mutex<HashMap<String, Route>>> = Default::default();
        let log: Arc<Mutex<Vec<Logged>>> = Default::default();
        let (r2, l2) = (routes.clone(), log.clone());
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acc = acceptor.clone();
                let (r, l) = (r2.clone(), l2.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acc.accept(tcp).await {
                        let _ = serve(tls, r, l).await;
                    }
                });
            }
        });
        TestServer {
            addr,
            ca_file,
            routes,
            log,
            rt: Some(rt),
        }
    }

    pub fn add(&self, path: &str, body: Arc<Vec<u8>>, behavior: Behavior) {
        self.routes.lock().unwrap().insert(
            path.to_string(),
            Route {
                etag: etag_of(&body),
                body,
                behavior,
                served: 0,
            },
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.addr.port())
    }

    pub fn requests(&self, path: &str) -> Vec<Logged> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.path == path)
            .cloned()
            .collect()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn etag_of(body: &[u8]) -> String {
    format!("\"{}\"", &blake3::hash(body).to_hex()[..16])
}

async fn serve<S>(
    mut s: S,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    log: Arc<Mutex<Vec<Logged>>>,
) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await?;
        if n == 0 || req.len() > 65536 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&req).to_string();
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let path = first.split(' ').nth(1).unwrap_or("/").to_string();
    let mut headers = HashMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range = headers.get("range").cloned();
    let if_range = headers.get("if-range").cloned();
    log.lock().unwrap().push(Logged {
        path: path.clone(),
        range: range.clone(),
        if_range: if_range.clone(),
    });
    let (body, etag, behavior, nth) = {
        let mut r = routes.lock().unwrap();
        match r.get_mut(&path) {
            Some(route) => {
                route.served += 1;
                (
                    route.body.clone(),
                    route.etag.clone(),
                    route.behavior.clone(),
                    route.served,
                )
            }
            None => (
                Arc::new(Vec::new()),
                String::new(),
                Behavior::Status(404),
                1,
            ),
        }
    };
    let status_line = |code: u16| {
        let reason = match code {
            200 => "OK",
            206 => "Partial Content",
            302 => "Found",
            404 => "Not Found",
            416 => "Range Not Satisfiable",
            500 => "Internal Server Error",
            _ => "Status",
        };
        format!("HTTP/1.1 {code} {reason}\r\n")
    };
    match &behavior {
        Behavior::Status(code) => {
            let r = format!(
                "{}Content-Length: 0\r\nConnection: close\r\n\r\n",
                status_line(*code)
            );
            s.write_all(r.as_bytes()).await?;
            return s.shutdown().await;
        }
        Behavior::Redirect(to) => {
            let r = format!(
                "{}Location: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                status_line(302)
            );
            s.write_all(r.as_bytes()).await?;
            return s.shutdown().await;
        }
        _ => {}
    }
    let total = body.len() as u64;
    let mut start = 0u64;
    let honour =
        !matches!(behavior, Behavior::NoRange) && if_range.as_ref().is_none_or(|v| *v == etag);
    if let (Some(r), true) = (&range, honour) {
        if let Some(n) = r.strip_prefix("bytes=").and_then(|x| x.strip_suffix('-')) {
            start = n.parse().unwrap_or(0);
        }
    }
    if start > total {
        let r = format!(
            "{}Content-Range: bytes */{total}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            status_line(416)
        );
        s.write_all(r.as_bytes()).await?;
        return s.shutdown().await;
    }
    let head = if start > 0 {
        format!(
            "{}Content-Range: bytes {start}-{}/{total}\r\n",
            status_line(206),
            total.saturating_sub(1)
        )
    } else {
        status_line(200)
    };
    let hdr = format!(
        "{head}Content-Length: {}\r\nETag: {etag}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
        total - start
    );
    s.write_all(hdr.as_bytes()).await?;
    // Served straight from the shared body (no per-request copy of the file), in 256 KiB
    // writes like a file server's sendfile-sized chunks; the wrong-bytes route flips one byte
    // of the middle on the way out.
    let data = &body[start as usize..];
    let flip = matches!(behavior, Behavior::WrongBytes).then(|| data.len() / 2);
    let limit = match behavior {
        Behavior::DropAfter { n, times } if nth <= times => Some(n as usize),
        Behavior::Stall => Some(4096),
        _ => None,
    };
    let end = limit.map_or(data.len(), |l| l.min(data.len()));
    let mut at = 0;
    for c in data[..end].chunks(256 * 1024) {
        match flip {
            Some(m) if (at..at + c.len()).contains(&m) => {
                let mut c = c.to_vec();
                c[m - at] ^= 0x5a;
                s.write_all(&c).await?;
            }
            _ => s.write_all(c).await?,
        }
        at += c.len();
    }
    s.flush().await?;
    if matches!(behavior, Behavior::Stall) {
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    }
    if limit.is_some() {
        // Cut the connection without a TLS close_notify: a dropped link.
        return Ok(());
    }
    s.shutdown().await
}

/// Deterministic pseudo-random bytes (xorshift), so failures are reproducible.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}
