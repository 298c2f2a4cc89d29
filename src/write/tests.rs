//! Pipeline tests with an in-memory source and a regular-file sink (no root needed).

use super::verify::READ_BACK_DEPTH;
use super::*;
use crate::image::scan::tests::{bmap_for, mapped_only};
use crate::progress::Silent;
use std::io::Read;

/// A source over an in-memory image described as (kind, bytes) runs; Data runs are cut to the
/// caller's buffer.
struct MemSource {
    runs: Vec<(ExtentKind, Vec<u8>)>,
    run: usize,
    within: usize,
    offset: u64,
    fail_at: Option<u64>,
}

impl MemSource {
    fn new(runs: Vec<(ExtentKind, Vec<u8>)>) -> Self {
        Self {
            runs,
            run: 0,
            within: 0,
            offset: 0,
            fail_at: None,
        }
    }
    fn logical(&self) -> Vec<u8> {
        self.runs
            .iter()
            .flat_map(|(k, b)| match k {
                ExtentKind::Data => b.clone(),
                _ => vec![0; b.len()],
            })
            .collect()
    }
}

impl ExtentSource for MemSource {
    fn size_hint(&self) -> Option<u64> {
        Some(self.runs.iter().map(|r| r.1.len() as u64).sum())
    }
    fn next_extent(&mut self, buf: &mut [u8]) -> Result<Option<Extent>, ImageError> {
        if let Some(f) = self.fail_at {
            if self.offset >= f {
                return Err(ImageError::Corrupt {
                    path: "mem".into(),
                    offset: self.offset,
                    msg: "test failure".into(),
                });
            }
        }
        let Some((kind, bytes)) = self.runs.get(self.run) else {
            return Ok(None);
        };
        let rest = bytes.len() - self.within;
        let n = match kind {
            ExtentKind::Data => rest.min(buf.len()),
            _ => rest,
        };
        if *kind == ExtentKind::Data {
            buf[..n].copy_from_slice(&bytes[self.within..self.within + n]);
        }
        let ext = Extent {
            offset: self.offset,
            len: n as u64,
            kind: *kind,
        };
        self.offset += n as u64;
        self.within += n;
        if self.within == bytes.len() {
            self.run += 1;
            self.within = 0;
        }
        Ok(Some(ext))
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn sample() -> MemSource {
    MemSource::new(vec![
        (ExtentKind::Data, pattern(1536 * 1024 + 7, 1)),
        (ExtentKind::Zero, vec![0; 3 << 20]),
        (ExtentKind::Data, pattern(9 << 20, 2)),
        (ExtentKind::Skip, vec![0; 2 << 20]),
        (ExtentKind::Zero, vec![0; 4096]),
        (ExtentKind::Data, pattern(5000, 3)),
    ])
}

fn small_opts() -> WriteOptions {
    WriteOptions {
        buffer_size: 1 << 20,
        buffers: 3,
        ..Default::default()
    }
}

fn read_all(p: &std::path::Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(p)
        .and_then(|mut f| f.read_to_end(&mut v))
        .expect("read target");
    v
}

#[test]
fn file_target_gets_the_logical_image_and_digest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("out.img");
    // Pre-fill with garbage longer than the image: it must be punched and truncated.
    let mut sink = file_sink(&p, &vec![0xA5u8; 20 << 20]);
    let src = sample();
    let expect = src.logical();
    let opts = WriteOptions {
        expected_blake3: Some(*blake3::hash(&expect).as_bytes()),
        ..small_opts()
    };
    let rep = run(Box::new(src), &mut sink, &opts, &Silent).expect("write");
    assert_eq!(read_all(&p), expect);
    assert_eq!(rep.image_size, expect.len() as u64);
    assert_eq!(rep.blake3, blake3::hash(&expect).to_hex().to_string());
    assert!(rep.verified_bytes.is_some());
    assert_eq!(rep.bytes_skipped, 2 << 20);
}

/// The read-back digest (for the station's ledger) is the image's blake3 recomputed from what
/// the medium returned, ranges fed in order while several reads are in flight.
#[test]
fn read_back_digest_equals_the_image_digest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("out.img");
    let mut sink = file_sink(&p, &vec![0xA5u8; 20 << 20]);
    let src = sample();
    let expect = src.logical();
    let opts = WriteOptions {
        readback_digest: true,
        ..small_opts()
    };
    let rep = run(Box::new(src), &mut sink, &opts, &Silent).expect("write");
    assert!(rep.ranges.len() > READ_BACK_DEPTH, "{}", rep.ranges.len());
    assert_eq!(
        rep.readback_blake3.as_deref(),
        Some(blake3::hash(&expect).to_hex().as_str())
    );
    // Off by default: `write` does not pay for it.
    let rep = run(Box::new(sample()), &mut sink, &small_opts(), &Silent).expect("write");
    assert_eq!(rep.readback_blake3, None);
}

#[test]
fn wrong_digest_fails_and_leaves_the_head_unwritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("out.img");
    let mut sink = file_sink(&p, &[]);
    let opts = WriteOptions {
        expected_blake3: Some([7u8; 32]),
        ..small_opts()
    };
    let err = run(Box::new(sample()), &mut sink, &opts, &Silent).expect_err("must fail");
    assert!(matches!(err, WriteError::Digest { .. }), "{err}");
    assert_eq!(err.exit(), crate::exit::Exit::Verify);
    let got = read_all(&p);
    assert!(got.len() >= 1 << 20);
    assert!(
        got[..1 << 20].iter().all(|&b| b == 0),
        "head must not be written"
    );
}

#[test]
fn source_errors_propagate_and_head_stays_unwritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("out.img");
    let mut sink = file_sink(&p, &[]);
    let mut src = sample();
    src.fail_at = Some(6 << 20);
    let err = run(Box::new(src), &mut sink, &small_opts(), &Silent).expect_err("must fail");
    assert!(err.to_string().contains("at offset"), "{err}");
    assert_eq!(err.exit(), crate::exit::Exit::BadInput);
    let got = read_all(&p);
    assert!(got.iter().take(1 << 20).all(|&b| b == 0));
}

#[test]
fn cancel_reports_interrupted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sink = file_sink(&dir.path().join("o"), &[]);
    let opts = small_opts();
    opts.cancel.store(true, Ordering::Relaxed);
    let err = run(Box::new(sample()), &mut sink, &opts, &Silent).expect_err("must fail");
    assert_eq!(err.exit(), crate::exit::Exit::Interrupted);
}

#[test]
fn read_back_names_the_first_bad_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("out.img");
    let mut sink = file_sink(&p, &[]);
    let opts = WriteOptions {
        verify: true,
        ..small_opts()
    };
    let rep = run(Box::new(sample()), &mut sink, &opts, &Silent).expect("write");
    // Corrupt one byte inside the second data run (at 6 MiB).
    corrupt(&p, &[(6 << 20) + 5]);
    let err = read_back(&mut sink, &rep.ranges, &opts, &Silent).expect_err("mismatch");
    match err {
        WriteError::Mismatch { offset, len, .. } => {
            assert!(
                offset <= (6 << 20) + 5 && (6 << 20) + 5 < offset + len,
                "{offset} {len}"
            )
        }
        e => panic!("unexpected {e}"),
    }
    // Comparing against the image directly finds it too.
    let err =
        compare_with_image(Box::new(sample()), &mut sink, &opts, &Silent).expect_err("mismatch");
    assert!(
        matches!(err, WriteError::Mismatch { offset, .. } if offset == 6 << 20),
        "{err}"
    );
}

#[test]
fn range_digests_stay_few_for_fragmented_images() {
    // 4 KiB of data every 8 KiB: gaps are merged, so ranges ≈ size / max range.
    let mut runs = Vec::new();
    for i in 0..512 {
        runs.push((ExtentKind::Data, pattern(4096, i as u8)));
        runs.push((ExtentKind::Zero, vec![0; 4096]));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sink = file_sink(&dir.path().join("o"), &[]);
    let rep = run(
        Box::new(MemSource::new(runs)),
        &mut sink,
        &small_opts(),
        &Silent,
    )
    .expect("write");
    assert!(rep.ranges.len() <= 5, "{} ranges", rep.ranges.len());
}

/// A sink over the file `p` (named by its file name), created holding just `prefill`:
/// garbage the write must replace, or zeros that tell written from unwritten.
fn file_sink(p: &std::path::Path, prefill: &[u8]) -> FileSink {
    std::fs::write(p, prefill).expect("prefill");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .expect("open");
    let name = p.file_name().expect("file name").to_string_lossy();
    FileSink::new(f, name).expect("sink")
}

/// Flips the byte at each of `offsets` in the written file to 0xEE, behind the sink's back.
fn corrupt(p: &std::path::Path, offsets: &[u64]) {
    let fw = std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .expect("open");
    for &at in offsets {
        std::os::unix::fs::FileExt::write_at(&fw, &[0xEE], at).expect("corrupt");
    }
    fw.sync_all().expect("sync");
}

/// 12 MiB: data, a zero MiB inside the second mapped range, unmapped tails.
fn bmapped_image() -> (Vec<u8>, crate::image::Bmap) {
    let mut img = pattern(12 << 20, 9);
    img[(5 << 20)..(6 << 20)].fill(0);
    let bmap = bmap_for(&img, &[(0, 511), (1024, 2047), (2560, 2815)]);
    (img, bmap)
}

fn stream_source(img: Vec<u8>, bmap: crate::image::Bmap) -> Box<dyn ExtentSource> {
    crate::image::from_reader(
        Box::new(std::io::Cursor::new(img)),
        "t.img",
        None,
        Some(bmap),
    )
    .expect("open stream")
}

#[test]
fn lent_buffers_and_off_thread_range_checks_write_the_mapped_image() {
    let (img, bmap) = bmapped_image();
    let masked = mapped_only(&img, &bmap);
    let mut src = stream_source(img.clone(), bmap.clone());
    assert!(src.shares_buffers());
    assert!(
        src.take_range_checker().is_some(),
        "checks go to the pipeline"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("out.img");
    let mut sink = file_sink(&p, &[]);
    let opts = WriteOptions {
        expected_blake3: Some(*blake3::hash(&masked).as_bytes()),
        ..Default::default()
    };
    let rep = run(stream_source(img, bmap), &mut sink, &opts, &Silent).expect("write");
    assert!(read_all(&p) == masked);
    assert!(rep.verified_bytes.is_some() && rep.digest_checked);
}

#[test]
fn bad_bmap_range_checksum_off_thread_fails_and_never_writes_the_head() {
    let (mut img, bmap) = bmapped_image();
    img[(4 << 20) + 4097] ^= 0x40; // inside the second mapped range (blocks 1024-2047)
                                   // The source alone no longer checks once the checker is taken: the pipeline must.
    let mut src = stream_source(img.clone(), bmap.clone());
    let checker = src.take_range_checker();
    assert!(checker.is_some());
    let mut buf = vec![0u8; 4 << 20];
    while src
        .next_extent(&mut buf)
        .expect("unchecked stream")
        .is_some()
    {}

    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("out.img");
    let mut sink = file_sink(&p, &vec![0u8; 12 << 20]);
    let err = run(stream_source(img, bmap), &mut sink, &small_opts(), &Silent)
        .expect_err("bad range must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("checksum mismatch") && msg.contains("4194304..8388608"),
        "{msg}"
    );
    assert_eq!(err.exit(), crate::exit::Exit::BadInput);
    assert!(
        read_all(&p)[..1 << 20].iter().all(|&b| b == 0),
        "head must not be written"
    );
}

#[test]
fn parallel_read_back_reports_the_lowest_bad_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("out.img");
    let mut sink = file_sink(&p, &[]);
    let opts = small_opts();
    let rep = run(Box::new(sample()), &mut sink, &opts, &Silent).expect("write");
    assert!(
        rep.ranges.len() > READ_BACK_DEPTH,
        "{} ranges",
        rep.ranges.len()
    );
    assert!(sink.medium_reader().is_some());
    // Two bad ranges, the later one corrupted first: the lower offset must be reported.
    corrupt(&p, &[(13 << 20) + 77, (7 << 20) + 3]);
    for _ in 0..5 {
        match read_back(&mut sink, &rep.ranges, &opts, &Silent).expect_err("mismatch") {
            WriteError::Mismatch { offset, len, .. } => {
                assert!(
                    offset <= (7 << 20) + 3 && (7 << 20) + 3 < offset + len,
                    "{offset}"
                )
            }
            e => panic!("unexpected {e}"),
        }
    }
}
