//! Which HTTPS servers a download trusts, and what to tell the user when one is not trusted.
//!
//! Trust is the public web PKI (Mozilla's roots, built in) plus the certificates of
//! `--ca-file`. A certificate in that file that is byte for byte the server's own certificate
//! (a self-signed one, as `openssl req -x509` makes for a lab mirror) is trusted as a pinned
//! certificate, as `curl --cacert` does; its host name and validity dates are still checked.
//! rustls refuses such a certificate as a chain (`CaUsedAsEndEntity`), so the pin is checked
//! here only after the ordinary chain verification failed.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};
use std::path::Path;
use std::sync::Arc;

/// The client configuration for downloads: web PKI roots, the `--ca-file` certificates as extra
/// roots and as pins, HTTP/2 and HTTP/1.1 offered by ALPN (as reqwest's own configuration).
pub(crate) fn client_config(
    pinned: Vec<CertificateDer<'static>>,
) -> Result<rustls::ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // A certificate webpki cannot use as a trust anchor can still be a pin.
    let _ = roots.add_parsable_certificates(pinned.iter().cloned());
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| Error::General(format!("TLS verifier: {e}")))?;
    let verifier = Arc::new(PinningVerifier { inner, pinned });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The web PKI verifier, then the pins.
#[derive(Debug)]
struct PinningVerifier {
    inner: Arc<WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let chain = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        let Err(chain_err) = chain else {
            return chain;
        };
        if !self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return Err(chain_err);
        }
        // Pinned: the user gave exactly this certificate. Name and dates still apply; the
        // handshake signature (checked below) proves the server holds its key.
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_name(&parsed, server_name)?;
        let (not_before, not_after) = validity(end_entity.as_ref())
            .ok_or(Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let t = now.as_secs();
        if t < not_before {
            return Err(Error::InvalidCertificate(
                CertificateError::NotValidYetContext {
                    time: now,
                    not_before: UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                        not_before,
                    )),
                },
            ));
        }
        if t > not_after {
            return Err(Error::InvalidCertificate(
                CertificateError::ExpiredContext {
                    time: now,
                    not_after: UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                        not_after,
                    )),
                },
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// One DER element: (tag, contents, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let v = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        rest = &rest[n..];
        v
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The certificate's notBefore and notAfter as Unix seconds (RFC 5280 §4.1.2.5).
fn validity(cert: &[u8]) -> Option<(u64, u64)> {
    let (0x30, cert, _) = der(cert)? else {
        return None;
    };
    let (0x30, tbs, _) = der(cert)? else {
        return None;
    };
    let mut rest = tbs;
    // [0] version (optional), serialNumber, signature, issuer, then validity.
    if rest.first() == Some(&0xa0) {
        rest = der(rest)?.2;
    }
    for _ in 0..3 {
        rest = der(rest)?.2;
    }
    let (0x30, val, _) = der(rest)? else {
        return None;
    };
    let (t1, a, rest) = der(val)?;
    let (t2, b, _) = der(rest)?;
    Some((der_time(t1, a)?, der_time(t2, b)?))
}

/// UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ) as Unix seconds.
fn der_time(tag: u8, v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if s.len() == 12 => {
            let yy: i64 = s[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        0x18 if s.len() == 14 => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    let n = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day, h, m, sec) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + m * 60 + sec).ok()
}

/// `DnsName("a.example")` (how rustls lists a certificate's names) as `a.example`.
fn unwrap_name(p: &str) -> &str {
    match (p.find('('), p.rfind(')')) {
        (Some(a), Some(b)) if a < b => p[a + 1..b].trim_matches('"'),
        _ => p,
    }
}

/// A refused TLS connection in plain words, with what to do about it.
pub(crate) fn explain(e: &Error, host: &str, ca_file: Option<&Path>) -> String {
    let ca = ca_file.map(|p| p.display().to_string());
    let date = |t: &UnixTime| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.as_secs()),
        )
        .to_string()
    };
    let Error::InvalidCertificate(c) = e else {
        return format!("the TLS handshake with {host} failed: {e}");
    };
    match c {
        CertificateError::UnknownIssuer => match &ca {
            Some(ca) => format!(
                "the server's certificate was issued by no authority this machine trusts: not by a certificate in {ca}, nor by a public one, and it is not the certificate in {ca} either; pass the CA certificate that issued it, or the server's own certificate, with --ca-file"
            ),
            None => "the server's certificate was issued by no authority this machine trusts; for a private mirror, pass its CA certificate (or the server's own self-signed certificate) with --ca-file".to_string(),
        },
        CertificateError::NotValidForName => format!(
            "the server's certificate is not valid for the name {host}; use the host name the certificate was made for, or reissue it with {host} in its subjectAltName"
        ),
        CertificateError::NotValidForNameContext { presented, .. } => format!(
            "the server's certificate is not valid for the name {host} (it names {}); use a name it lists, or reissue it with {host} in its subjectAltName",
            if presented.is_empty() {
                "nothing usable".to_string()
            } else {
                presented.iter().map(|p| unwrap_name(p)).collect::<Vec<_>>().join(", ")
            }
        ),
        CertificateError::Expired => "the server's certificate has expired; renew it on the server (or check this machine's clock)".to_string(),
        CertificateError::ExpiredContext { time, not_after } => format!(
            "the server's certificate expired on {} (it is now {}); renew it on the server (or check this machine's clock)",
            date(not_after),
            date(time)
        ),
        CertificateError::NotValidYet => "the server's certificate is not valid yet; check this machine's clock, or the certificate's start date".to_string(),
        CertificateError::NotValidYetContext { time, not_before } => format!(
            "the server's certificate is only valid from {} (it is now {}); check this machine's clock, or the certificate's start date",
            date(not_before),
            date(time)
        ),
        CertificateError::BadSignature => "the server's certificate has a signature that does not verify; the certificate or its issuer's is damaged or forged".to_string(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "the server's certificate is not made for TLS servers (extended key usage); reissue it with serverAuth".to_string()
        }
        CertificateError::Revoked => "the server's certificate has been revoked by its issuer; the server needs a new one".to_string(),
        CertificateError::Other(o) if format!("{o:?}").contains("CaUsedAsEndEntity") => {
            format!(
                "{host} presents a CA certificate as its own certificate{}; pass exactly that certificate with --ca-file to pin it, or give the server a certificate issued by that CA",
                match &ca {
                    Some(ca) => format!(" and it is not the one in {ca}"),
                    None => String::new(),
                }
            )
        }
        other => format!("the server's certificate was refused: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_times_are_unix_seconds() {
        assert_eq!(der_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(der_time(0x17, b"000229120000Z"), Some(951_825_600));
        assert_eq!(der_time(0x18, b"20380119031408Z"), Some(2_147_483_648));
        assert_eq!(der_time(0x17, b"701301000000Z"), None);
        assert_eq!(der_time(0x17, b"7001010000Z"), None);
    }
}
