//! Throughput of the image sources (not a test): `cargo run --release --example
//! image_throughput -- IMAGE [--no-bmap] [--hash] [--buf MIB]`. Pulls every extent into one
//! buffer like a sink would, optionally hashes with LogicalHasher, prints MiB/s.

use sbcflash::image::{self, ExtentKind, LogicalHasher, OpenOptions};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args
        .first()
        .ok_or_else(|| anyhow::anyhow!("usage: IMAGE [--no-bmap] [--hash] [--buf MIB]"))?;
    let no_bmap = args.iter().any(|a| a == "--no-bmap");
    let hash = args.iter().any(|a| a == "--hash");
    let buf_mib: usize = args
        .iter()
        .position(|a| a == "--buf")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(8);
    let opts = OpenOptions {
        no_bmap,
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut img = image::open_image(path.as_ref(), &opts)?;
    let mut buf = vec![0u8; buf_mib << 20];
    let mut h = LogicalHasher::new();
    let (mut data, mut zero, mut skip, mut n) = (0u64, 0u64, 0u64, 0u64);
    while let Some(e) = img.source.next_extent(&mut buf)? {
        n += 1;
        match e.kind {
            ExtentKind::Data => data += e.len,
            ExtentKind::Zero => zero += e.len,
            ExtentKind::Skip => skip += e.len,
        }
        if hash {
            h.update_extent(&e, &buf);
        }
    }
    let dt = t0.elapsed().as_secs_f64();
    let total = data + zero + skip;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "{}: {} | {n} extents, data {:.0} MiB, zero {:.0} MiB, skip {:.0} MiB | {:.3} s, {:.0} MiB/s logical, {:.0} MiB/s data{}",
        path,
        img.description,
        mib(data),
        mib(zero),
        mib(skip),
        dt,
        mib(total) / dt,
        mib(data) / dt,
        if hash {
            format!(" | blake3 {}", h.finalize().to_hex())
        } else {
            String::new()
        }
    );
    Ok(())
}
