//! The policy layer: a source (URL + optional published digest) becomes a verified cache
//! entry (`fetch`) or a verified one-pass stream (`write URL`), reusing the cache when the
//! digest is already there.

use super::cache::{Cache, CacheEntry, Origin};
use super::digest::{hash_reader, Pin};
use super::download::{check_scheme, DownloadOptions, Downloader};
use super::stream::{StreamCheck, VerifyingReader};
use super::{AcquireError, Result};
use crate::progress::Phase;
use crate::progress::{Event, Level, Reporter};
use std::sync::Arc;

/// Something to download: where, and what it must hash to if that is published.
#[derive(Debug, Clone)]
pub(crate) struct SourceSpec {
    pub(crate) url: String,
    pub(crate) pin: Option<Pin>,
}

impl SourceSpec {
    /// The file name as published, for display and the cache's metadata.
    pub(crate) fn file_name(&self) -> Option<String> {
        let u = reqwest::Url::parse(&self.url).ok()?;
        u.path_segments()?
            .next_back()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }
}

/// Everything a fetch or stream needs, built once by the CLI.
pub(crate) struct Acquirer {
    pub(crate) cache: Arc<Cache>,
    pub(crate) opts: DownloadOptions,
    pub(crate) require_pinned: bool,
    pub(crate) reporter: Arc<dyn Reporter>,
}

/// A fetched file, in the cache.
#[derive(Debug, Clone)]
pub(crate) struct Fetched {
    pub(crate) entry: CacheEntry,
    /// It was already in the cache: nothing was downloaded.
    pub(crate) from_cache: bool,
    pub(crate) pinned: bool,
}

impl Acquirer {
    fn job(src: &SourceSpec) -> String {
        src.file_name().unwrap_or_else(|| src.url.clone())
    }

    /// Refuses what policy forbids before any byte moves.
    fn check_policy(&self, src: &SourceSpec) -> Result<()> {
        if src.pin.is_none() && self.require_pinned {
            return Err(AcquireError::Unpinned {
                what: src.url.clone(),
            });
        }
        check_scheme(&src.url, src.pin.is_some())
    }

    fn downloader(&self, src: &SourceSpec) -> Result<Downloader> {
        let mut o = self.opts.clone();
        o.allow_http = src.pin.is_some();
        Downloader::new(o)
    }

    /// The cache entry for a pin, if present.
    pub(crate) fn lookup(&self, pin: &Pin) -> Result<Option<CacheEntry>> {
        match pin {
            Pin::Blake3(b) => self.cache.get(&hex::encode(b)),
            Pin::Sha256(s) => self.cache.find_sha256(&hex::encode(s)),
        }
    }

    /// The pinned file `src` names, if the cache has it already (its last use is now).
    fn cached(&self, src: &SourceSpec) -> Result<Option<Fetched>> {
        let Some(pin) = &src.pin else {
            return Ok(None);
        };
        let Some(entry) = self.lookup(pin)? else {
            return Ok(None);
        };
        self.cache.touch(&entry.blake3)?;
        Ok(Some(Fetched {
            entry,
            from_cache: true,
            pinned: true,
        }))
    }

    fn warn_unpinned(&self, job: &str, url: &str, b3: &str) {
        self.reporter.report(Event::Message {
            job: job.into(),
            level: Level::Warn,
            text: format!(
                "{url} is not pinned (no published digest): nothing verified its contents; its blake3 is {b3} (pin it with --blake3 {b3}, or refuse this with --require-pinned)"
            ),
        });
    }

    /// Downloads into the cache (resuming a partial one), checks the pin, commits.
    pub(crate) fn fetch(&self, src: &SourceSpec) -> Result<Fetched> {
        self.check_policy(src)?;
        let job = Self::job(src);
        if let Some(f) = self.cached(src)? {
            return Ok(f);
        }
        let partial = self.cache.partial(&src.url);
        let _dl_lock = partial.lock()?;
        // Another process may have finished the same download while we waited for the lock.
        if let Some(f) = self.cached(src)? {
            return Ok(f);
        }
        let dl = self.downloader(src)?;
        dl.download_to_partial(&src.url, &partial, &*self.reporter, &job)?;
        let mut f = super::cache::open_nofollow(&partial.data)
            .map_err(|e| AcquireError::io(&partial.data, e))?;
        let with_sha = matches!(src.pin, Some(Pin::Sha256(_)));
        self.reporter.report(Event::Start {
            job: job.clone(),
            phase: Phase::Hash,
            total: f.metadata().ok().map(|m| m.len()),
            detail: None,
        });
        let d = hash_reader(&mut f, with_sha).map_err(|e| AcquireError::io(&partial.data, e))?;
        drop(f);
        if let Some(pin) = &src.pin {
            if let Err(e) = pin.check(&src.url, &d) {
                // Wrong bytes: never cached, and not kept for a resume either.
                partial.discard();
                return Err(e);
            }
        }
        let entry = self.cache.commit(
            &partial.data,
            &d,
            Origin {
                name: src.file_name(),
                origin: Some(src.url.clone()),
                pinned: src.pin.as_ref().map(|p| p.to_string()),
            },
        )?;
        partial.discard();
        self.reporter.report(Event::Finish {
            job: job.clone(),
            phase: Phase::Hash,
            summary: serde_json::json!({ "blake3": entry.blake3, "bytes": entry.size }),
        });
        if src.pin.is_none() {
            self.warn_unpinned(&job, &src.url, &entry.blake3);
        }
        Ok(Fetched {
            entry,
            from_cache: false,
            pinned: src.pin.is_some(),
        })
    }

    /// [`Self::open_stream`] reporting its download under `job` (a streamed write uses the
    /// target's job, so the download and the write are one job with two phases).
    pub(crate) fn open_stream_as(
        &self,
        src: &SourceSpec,
        tee: bool,
        job: String,
    ) -> Result<(VerifyingReader, StreamCheck)> {
        self.check_policy(src)?;
        if let Some(pin) = &src.pin {
            if let Some(e) = self.lookup(pin)? {
                let f = self.cache.open_entry(&e)?;
                self.cache.touch(&e.blake3)?;
                tracing::info!("using cached {} for {}", e.path.display(), src.url);
                return Ok(VerifyingReader::from_reader(
                    e.path.display().to_string(),
                    Box::new(f),
                    src.pin.clone(),
                ));
            }
        }
        let dl = self.downloader(src)?;
        let with_sha = matches!(src.pin, Some(Pin::Sha256(_)));
        let (rx, th) = dl.spawn_stream(src.url.clone(), with_sha, self.reporter.clone(), job);
        let (r, c) = VerifyingReader::from_http(src.url.clone(), rx, th, src.pin.clone());
        if tee {
            c.tee_into(
                self.cache.clone(),
                Origin {
                    name: src.file_name(),
                    origin: Some(src.url.clone()),
                    pinned: None,
                },
            )?;
        }
        Ok((r, c))
    }

    /// [`Self::report_stream`] under the job the stream was opened with.
    pub(crate) fn report_stream_as(
        &self,
        src: &SourceSpec,
        res: &super::stream::StreamResult,
        job: String,
    ) {
        let b3 = res.digests.blake3_hex();
        if res.pinned.is_none() {
            self.warn_unpinned(&job, &src.url, &b3);
        }
        self.reporter.report(Event::Finish {
            job,
            phase: Phase::SourceVerify,
            summary: serde_json::json!({
                "url": src.url,
                "blake3": b3,
                "bytes": res.digests.len,
                "pinned": res.pinned.as_ref().map(|p| p.to_string()),
                "cached": res.cached.as_ref().map(|e| e.path.display().to_string()),
            }),
        });
    }
}
