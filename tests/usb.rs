//! USB recovery protocols end to end, against the simulated devices in `sbcflash::usb::sim`
//! (there is no USB bus on CI machines). Every protocol runs through the same `Transport` trait
//! the rusb code uses; the simulated devices decode the wire bytes themselves.

mod common;

use sbcflash::exit::{Classify, Exit};
use sbcflash::progress::{Event, Recorder};
use sbcflash::usb::discovery::Bus;
use sbcflash::usb::fastboot::{self, Fastboot};
use sbcflash::usb::flash::{self, MemSource, Outcome, Via, ViaOptions};
use sbcflash::usb::rkloader::{self, Loader, CRC16, CRC32_RK};
use sbcflash::usb::rockusb::{self, LoaderSession, StorageIndex, Timeouts};
use sbcflash::usb::sim::fastboot::FastbootDevice;
use sbcflash::usb::sim::fel::{FelDevice, DRAM_BASE};
use sbcflash::usb::sim::rockusb::{RkMode, RockchipBoard, EMMC, SPI_NOR};
use sbcflash::usb::sim::usbboot::{RpiBoard, Stage};
use sbcflash::usb::sim::{lock, Fault, FaultKind, SimBus, SimHandle, Trigger};
use sbcflash::usb::{fel, usbboot, Error, Transport, TransportError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Records every transfer (direction, bytes) while forwarding to the real (simulated) device.
struct Rec<T: Transport> {
    inner: T,
    log: Vec<(&'static str, Vec<u8>, u16)>,
}

impl<T: Transport> Rec<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            log: Vec::new(),
        }
    }
    fn of(&self, kind: &str) -> Vec<&Vec<u8>> {
        self.log
            .iter()
            .filter(|(k, _, _)| *k == kind)
            .map(|(_, d, _)| d)
            .collect()
    }
}

impl<T: Transport> Transport for Rec<T> {
    fn control_out(
        &mut self,
        rt: u8,
        req: u8,
        v: u16,
        i: u16,
        data: &[u8],
        to: Duration,
    ) -> Result<usize, TransportError> {
        self.log.push(("control_out", data.to_vec(), i));
        self.inner.control_out(rt, req, v, i, data, to)
    }
    fn control_in(
        &mut self,
        rt: u8,
        req: u8,
        v: u16,
        i: u16,
        buf: &mut [u8],
        to: Duration,
    ) -> Result<usize, TransportError> {
        let n = self.inner.control_in(rt, req, v, i, buf, to)?;
        self.log.push(("control_in", buf[..n].to_vec(), i));
        Ok(n)
    }
    fn bulk_out(&mut self, data: &[u8], to: Duration) -> Result<usize, TransportError> {
        self.log.push(("bulk_out", data.to_vec(), 0));
        self.inner.bulk_out(data, to)
    }
    fn bulk_in(&mut self, buf: &mut [u8], to: Duration) -> Result<usize, TransportError> {
        let n = self.inner.bulk_in(buf, to)?;
        self.log.push(("bulk_in", buf[..n].to_vec(), 0));
        Ok(n)
    }
}

/// An in-memory image as an owned extent stream.
fn mem(name: &str, data: Vec<u8>) -> Box<dyn sbcflash::image::ExtentSource> {
    Box::new(MemSource::new(name, data))
}

/// A real image file through the image module's format detection (raw + holes here).
fn open_real(path: &Path) -> Box<dyn sbcflash::image::ExtentSource> {
    sbcflash::image::open::open_image(path, &Default::default())
        .unwrap()
        .source
}

fn shared<D>(d: D) -> Arc<Mutex<D>> {
    Arc::new(Mutex::new(d))
}

fn handle<D: sbcflash::usb::sim::SimDevice + 'static>(d: &Arc<Mutex<D>>) -> SimHandle {
    SimHandle::new(d.clone())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sbcflash-usb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct TmpDir(PathBuf);
impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A real NixOS-like image (MBR, FAT + ext4 made by sfdisk/mkfs) and its bytes.
fn nixos_image(name: &str, mib: u64) -> Option<(TmpDir, PathBuf, Vec<u8>)> {
    if !common::require(false, &["sfdisk", "mkfs.vfat", "mcopy", "mkfs.ext4"]) {
        return None;
    }
    let dir = TmpDir(tmpdir(name));
    let img = common::make_nixos_like_image(&dir.0, "nixos.img", mib, common::Table::Mbr);
    let bytes = std::fs::read(&img).unwrap();
    Some((dir, img, bytes))
}

fn fast_timeouts() -> Timeouts {
    Timeouts {
        control: Duration::from_secs(1),
        bulk: Duration::from_secs(1),
        probe: Duration::from_millis(200),
    }
}

// ---------------------------------------------------------------- test vectors

#[test]
fn crc_check_values_from_the_reference() {
    assert_eq!(CRC16.checksum(b"123456789"), 0x29b1);
    assert_eq!(CRC32_RK.checksum(b"123456789"), 0x889a_9615);
    let mut ks = [0u8; 16];
    rkloader::rc4(&mut ks);
    assert_eq!(
        ks[..4],
        [0x6e, 0x26, 0x2c, 0xf3],
        "RC4 keystream of the Rockchip key"
    );
}

/// Maskrom chunking edge cases (rockusb/tests/maskrom.rs, rkdeveloptool): the simulated ROM
/// reassembles the transfers and checks the CRC-16 itself.
#[test]
fn maskrom_chunking_edge_cases() {
    // (payload length, expected control transfer sizes)
    let cases: &[(usize, &[usize])] = &[
        (3, &[5]),
        (4, &[6]),
        (4094, &[4096, 1]),
        (4095, &[4096, 2]),
        (4096, &[4096, 2]),
        (4097, &[4096, 3]),
        (8190, &[4096, 4096, 1]),
        (8191, &[4096, 4096, 2]),
    ];
    for &(len, transfers) in cases {
        let board = shared(RockchipBoard::rk3588(1 << 20));
        let data = pattern(len, 0x5a);
        let loader = Loader::from_raw(("ddr", data.clone()), ("plug", data.clone()), false);
        let mut t = handle(&board);
        rockusb::download_loader(&mut t, &loader, &fast_timeouts(), &mut |_, _| {}).unwrap();
        let b = lock(&board);
        assert_eq!(b.downloads.len(), 2, "len {len}");
        for (d, area) in b.downloads.iter().zip([0x471u16, 0x472]) {
            assert_eq!(d.area, area);
            assert!(d.crc_ok, "len {len}: ROM saw a bad CRC");
            assert_eq!(d.transfers, transfers, "len {len}: transfer sizes");
            let mut expect = data.clone();
            if len % 4096 == 4095 {
                expect.push(0); // pad so the CRC starts a fresh transfer
            }
            assert_eq!(d.payload, expect, "len {len}: payload");
        }
        // After 0x472 the board left the bus and came back as a loader.
        assert_eq!(b.mode, RkMode::Loader);
    }
}

#[test]
fn maskrom_crc_is_appended_big_endian() {
    let board = shared(RockchipBoard::rk3588(1 << 20));
    let mut t = Rec::new(handle(&board));
    let loader = Loader::from_raw(
        ("ddr", b"123456789".to_vec()),
        ("plug", b"123456789".to_vec()),
        false,
    );
    rockusb::download_loader(&mut t, &loader, &fast_timeouts(), &mut |_, _| {}).unwrap();
    let sent = t.of("control_out");
    assert_eq!(sent[0].as_slice(), b"123456789\x29\xb1");
    assert_eq!(t.log[0].2, 0x471);
    assert_eq!(t.log[1].2, 0x472);
}

#[test]
fn cbw_and_csw_layouts() {
    let mut board = RockchipBoard::rk3588(64 << 20);
    board.mode = RkMode::Loader;
    let board = shared(board);
    let mut t = Rec::new(handle(&board));
    let mut s = LoaderSession::open(&mut t, fast_timeouts()).unwrap();
    assert_eq!(s.capacity, Some(64 << 20));
    assert_eq!(s.chip.as_deref(), Some("3588"));
    s.write_lba(0x0001_0203, &[0xab; 1024]).unwrap();
    drop(s);
    let outs = t.of("bulk_out");
    let cbw = outs[outs.len() - 2];
    assert_eq!(cbw.len(), 31);
    assert_eq!(&cbw[0..4], b"USBC");
    assert_eq!(&cbw[8..12], &1024u32.to_le_bytes(), "transfer length LE");
    assert_eq!(cbw[12], 0x00, "direction OUT");
    assert_eq!(cbw[13], 0, "LUN");
    assert_eq!(cbw[14], 0x0a, "CB length");
    assert_eq!(cbw[15], 0x15, "WRITE_LBA");
    assert_eq!(&cbw[17..21], &[0x00, 0x01, 0x02, 0x03], "LBA big-endian");
    assert_eq!(&cbw[22..24], &[0x00, 0x02], "sector count big-endian");
    assert!(cbw[24..].iter().all(|&b| b == 0));
    let ins = t.of("bulk_in");
    let csw = ins[ins.len() - 1];
    assert_eq!(csw.len(), 13);
    assert_eq!(&csw[0..4], b"USBS");
    assert_eq!(&csw[4..8], &cbw[4..8], "CSW echoes the CBW tag");
    assert_eq!(&csw[8..12], &[0, 0, 0, 0], "residue");
    assert_eq!(csw[12], 0, "status good");
    assert_eq!(
        &lock(&board).storage(EMMC)[0x10203 * 512..0x10203 * 512 + 1024],
        &[0xab; 1024][..]
    );
}

// ---------------------------------------------------------------- Rockchip sessions

/// A simulated bus with just `dev` on it.
fn bus_of<D: sbcflash::usb::sim::SimDevice + 'static>(dev: &Arc<Mutex<D>>) -> SimBus {
    let mut bus = SimBus::new();
    bus.attach(dev.clone());
    bus
}

fn merged_loader(dir: &Path) -> PathBuf {
    let file = rkloader::build_merged(
        "RK3588",
        &pattern(9000, 1),
        &pattern(70_000, 2),
        &[&pattern(3000, 3)],
    );
    let p = dir.join("rk3588_spl_loader.bin");
    std::fs::write(&p, file).unwrap();
    p
}

fn rk_opts(via: Via, loader: Vec<PathBuf>) -> ViaOptions {
    let mut o = ViaOptions::new(via);
    o.loader = loader;
    o.storage = Some(StorageIndex::Emmc);
    o.timeouts = fast_timeouts();
    o.reenumerate_timeout = Duration::from_secs(5);
    o
}

/// maskrom → loader → write a real FAT+ext4 image → read back → reset; the simulated eMMC
/// (initially garbage) must equal the image.
#[test]
fn rockusb_full_session_maskrom_to_written_flash() {
    let Some((dir, img, bytes)) = nixos_image("rk-session", 48) else {
        return;
    };
    let board = shared(RockchipBoard::rk3588(64 << 20));
    let bus = bus_of(&board);
    let rec = Recorder(Mutex::new(Vec::new()));
    let src = open_real(&img);
    let out = flash::write_via(
        &bus,
        &rk_opts(Via::Maskrom, vec![merged_loader(&dir.0)]),
        src,
        &rec,
    )
    .unwrap();
    let b = lock(&board);
    assert_eq!(b.downloads.len(), 2);
    assert!(b.downloads.iter().all(|d| d.crc_ok));
    assert_eq!(
        b.downloads[0].payload.len(),
        10240,
        "0x471 entry padded to 2 KiB"
    );
    let flash = b.storage(EMMC);
    assert!(
        flash[..bytes.len()] == bytes[..],
        "simulated eMMC differs from the image"
    );
    assert_eq!(b.resets, vec![0], "board reset at the end");
    // READ_LBA happened: the read-back really ran.
    assert!(b.commands.contains(&0x14));
    match out {
        Outcome::Written {
            image_size,
            verified,
            ..
        } => {
            assert_eq!(image_size, bytes.len() as u64);
            assert!(verified);
        }
        o => panic!("unexpected {o:?}"),
    }
    let ev = rec.0.lock().unwrap();
    let phases: Vec<String> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Finish { phase, .. } => Some(phase.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(phases[0], "loader");
    assert!(phases.contains(&"write".to_string()), "{phases:?}");
    assert!(phases.contains(&"verify".to_string()), "{phases:?}");
}

/// Unmapped ranges are not sent; the flash keeps its old bytes there.
#[test]
fn rockusb_skips_unmapped_ranges() {
    use sbcflash::image::{Extent, ExtentKind, ExtentSource, ImageError};
    struct Src(Vec<Extent>, usize);
    impl ExtentSource for Src {
        fn size_hint(&self) -> Option<u64> {
            Some(3 << 20)
        }
        fn next_extent(&mut self, buf: &mut [u8]) -> Result<Option<Extent>, ImageError> {
            let Some(e) = self.0.get(self.1).copied() else {
                return Ok(None);
            };
            self.1 += 1;
            if e.kind == ExtentKind::Data {
                buf[..e.len as usize].fill(0x77);
            }
            Ok(Some(e))
        }
        fn describe(&self) -> String {
            "test".into()
        }
    }
    let mib = 1u64 << 20;
    let src = Box::new(Src(
        vec![
            Extent {
                offset: 0,
                len: mib,
                kind: ExtentKind::Data,
            },
            Extent {
                offset: mib,
                len: mib,
                kind: ExtentKind::Skip,
            },
            Extent {
                offset: 2 * mib,
                len: mib,
                kind: ExtentKind::Zero,
            },
        ],
        0,
    ));
    let mut board = RockchipBoard::rk3588(8 << 20);
    board.mode = RkMode::Loader;
    let before = board.storage(EMMC).to_vec();
    let board = shared(board);
    let bus = bus_of(&board);
    let out = write_silently(&bus, &rk_opts(Via::Usb, vec![]), src).unwrap();
    let b = lock(&board);
    let f = b.storage(EMMC);
    assert!(f[..mib as usize].iter().all(|&x| x == 0x77));
    assert_eq!(
        f[mib as usize..2 * mib as usize],
        before[mib as usize..2 * mib as usize],
        "Skip range untouched"
    );
    assert!(
        f[2 * mib as usize..3 * mib as usize]
            .iter()
            .all(|&x| x == 0),
        "Zero range written as zeroes"
    );
    // The Zero range went over the cable: written, not skipped (the lab's first run said
    // "wrote 3145728 bytes (0 skipped) of a 25165824-byte image" for 21 MiB of written holes).
    assert!(
        matches!(out, Outcome::Written { bytes_written, bytes_skipped, image_size, .. }
            if bytes_skipped == mib && bytes_written == 2 * mib && image_size == 3 * mib),
        "{out:?}"
    );
}

#[test]
fn rockusb_spi_nor_storage_is_selected_and_checked() {
    let mut board = RockchipBoard::rk3588(8 << 20);
    board.mode = RkMode::Loader;
    board.add_storage(SPI_NOR, 1 << 20);
    let board = shared(board);
    let bus = bus_of(&board);
    let mut o = rk_opts(Via::Usb, vec![]);
    o.storage = Some(StorageIndex::MtdBlkSpiNor);
    let src = mem("spi.bin", pattern(300_000, 9));
    write_silently(&bus, &o, src).unwrap();
    assert_eq!(
        &lock(&board).storage(SPI_NOR)[..300_000],
        &pattern(300_000, 9)[..]
    );
    // A medium the loader does not have: it silently stays put, and we notice.
    let mut o = rk_opts(Via::Usb, vec![]);
    o.storage = Some(StorageIndex::Sd0);
    lock(&board).mode = RkMode::Loader;
    let e = write_silently(&bus, &o, mem("x", vec![1; 512])).unwrap_err();
    assert!(
        e.to_string().contains("did not switch to storage 'sd0'"),
        "{e}"
    );
}

#[test]
fn rockusb_loader_mode_when_maskrom_needed_and_the_reverse() {
    let dir = TmpDir(tmpdir("rk-modes"));
    let loader = merged_loader(&dir.0);
    // Board already running a loader; --via maskrom.
    let mut b = RockchipBoard::rk3588(4 << 20);
    b.mode = RkMode::Loader;
    let board = shared(b);
    let e = write_silently(
        &bus_of(&board),
        &rk_opts(Via::Maskrom, vec![loader.clone()]),
        mem("x", vec![1; 4096]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("already in loader mode"), "{e}");
    assert_eq!(e.exit(), Exit::Refused);
    // A board in maskrom with no loader to give it.
    let board = shared(RockchipBoard::rk3588(4 << 20));
    let e = write_silently(
        &bus_of(&board),
        &rk_opts(Via::Usb, vec![]),
        mem("x", vec![1; 4096]),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("is in maskrom: it needs a loader"),
        "{e}"
    );
    // Talking rockusb to a maskrom board directly.
    let mut t = handle(&board);
    let e = LoaderSession::open(&mut t, fast_timeouts()).err().unwrap();
    assert!(e.to_string().contains("in maskrom"), "{e}");
    // Downloading to a loader: the control request stalls on the first transfer.
    let mut b = RockchipBoard::rk3588(4 << 20);
    b.mode = RkMode::Loader;
    let board = shared(b);
    let l = Loader::from_raw(("a", vec![1; 10]), ("b", vec![2; 10]), false);
    let e = rockusb::download_loader(&mut handle(&board), &l, &fast_timeouts(), &mut |_, _| {})
        .unwrap_err();
    assert!(e.to_string().contains("already in loader mode"), "{e}");
}

/// rkdeveloptool#88 / RK3576: bcdUSB says maskrom but a loader runs. The probe decides.
#[test]
fn rockusb_bcd_heuristic_is_confirmed_by_probe() {
    let mut b = RockchipBoard::rk3588(4 << 20);
    b.mode = RkMode::Loader;
    b.loader_bcd = 0x0200;
    let board = shared(b);
    let bus = bus_of(&board);
    assert_eq!(
        bus.list().unwrap()[0].mode,
        sbcflash::usb::discovery::Mode::Maskrom
    );
    let src = mem("x", pattern(8192, 4));
    write_silently(&bus, &rk_opts(Via::Usb, vec![]), src).unwrap();
    assert!(
        lock(&board).downloads.is_empty(),
        "no loader download to a running loader"
    );
}

#[test]
fn rockusb_bad_loader_files() {
    let dir = TmpDir(tmpdir("rk-badloader"));
    let board = shared(RockchipBoard::rk3588(4 << 20));
    let run = |files: Vec<PathBuf>| {
        write_silently(
            &bus_of(&board),
            &rk_opts(Via::Maskrom, files),
            mem("x", vec![1; 512]),
        )
        .unwrap_err()
    };
    // A raw rkbin miniloader where a boot_merger file is required.
    let raw = dir.0.join("rk3588_miniloader_v1.bin");
    std::fs::write(&raw, pattern(5000, 7)).unwrap();
    let e = run(vec![raw]);
    assert!(e.to_string().contains("rk3588_miniloader_v1.bin"), "{e}");
    assert!(
        e.to_string().contains("not a boot_merger loader file"),
        "{e}"
    );
    assert_eq!(e.exit(), Exit::BadInput);
    // CRC32 wrong.
    let good = std::fs::read(merged_loader(&dir.0)).unwrap();
    let mut bad = good.clone();
    bad[3000] ^= 0x40;
    let p = dir.0.join("corrupt.bin");
    std::fs::write(&p, &bad).unwrap();
    let e = run(vec![p]);
    assert!(e.to_string().contains("CRC32 mismatch"), "{e}");
    // Loader for another SoC.
    let other = rkloader::build_merged("RK3568", &[1; 100], &[2; 100], &[]);
    let p = dir.0.join("rk3568.bin");
    std::fs::write(&p, other).unwrap();
    let e = run(vec![p]);
    assert!(
        e.to_string()
            .contains("loader is for RK3568 but the board is RK3588"),
        "{e}"
    );
    // Nothing reached the ROM in any of these.
    assert!(lock(&board).downloads.is_empty());
}

#[test]
fn rockusb_raw_471_472_pair_is_accepted() {
    let dir = TmpDir(tmpdir("rk-raw"));
    let (a, b) = (dir.0.join("usb471.bin"), dir.0.join("usb472.bin"));
    std::fs::write(&a, pattern(4095, 1)).unwrap();
    std::fs::write(&b, pattern(20_000, 2)).unwrap();
    let board = shared(RockchipBoard::rk3588(4 << 20));
    let src = mem("x", pattern(4096, 3));
    write_silently(&bus_of(&board), &rk_opts(Via::Maskrom, vec![a, b]), src).unwrap();
    let bd = lock(&board);
    assert_eq!(bd.downloads[1].payload, pattern(20_000, 2));
    assert_eq!(&bd.storage(EMMC)[..4096], &pattern(4096, 3)[..]);
}

#[test]
fn rockusb_device_not_coming_back_after_loader() {
    let dir = TmpDir(tmpdir("rk-noreturn"));
    let mut b = RockchipBoard::rk3588(4 << 20);
    b.comes_back = false;
    let board = shared(b);
    let mut o = rk_opts(Via::Maskrom, vec![merged_loader(&dir.0)]);
    o.reenumerate_timeout = Duration::from_millis(300);
    let e = write_silently(&bus_of(&board), &o, mem("x", vec![1; 512])).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("come back in loader mode"), "{e}");
    assert_eq!(e.exit(), Exit::Timeout);
}

#[test]
fn rockusb_write_past_end_of_storage_is_refused() {
    let mut b = RockchipBoard::rk3588(1 << 20);
    b.mode = RkMode::Loader;
    let before = b.storage(EMMC).to_vec();
    let board = shared(b);
    let e = write_silently(
        &bus_of(&board),
        &rk_opts(Via::Usb, vec![]),
        mem("big.img", pattern(2 << 20, 1)),
    )
    .unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");
    assert_eq!(e.exit(), Exit::Refused);
    assert_eq!(lock(&board).storage(EMMC), &before[..], "nothing written");
}

/// Mainline U-Boot's rockusb: READ_FLASH_INFO fails; the write still works (size unknown).
#[test]
fn rockusb_mainline_uboot_without_flash_info() {
    let mut b = RockchipBoard::rk3588(4 << 20);
    b.mode = RkMode::Loader;
    b.no_flash_info = true;
    let board = shared(b);
    let mut o = rk_opts(Via::Usb, vec![]);
    o.storage = None;
    let src = mem("x", pattern(100_000, 5));
    write_silently(&bus_of(&board), &o, src).unwrap();
    assert_eq!(
        &lock(&board).storage(EMMC)[..100_000],
        &pattern(100_000, 5)[..]
    );
}

fn loader_board_with(fault: Fault) -> Arc<Mutex<RockchipBoard>> {
    let mut b = RockchipBoard::rk3588(8 << 20);
    b.mode = RkMode::Loader;
    let board = shared(b);
    use sbcflash::usb::sim::SimDevice;
    lock(&board).faults().add(fault);
    board
}

/// `flash::write_via` without progress output.
fn write_silently(
    bus: &SimBus,
    o: &ViaOptions,
    src: Box<dyn sbcflash::image::ExtentSource>,
) -> Result<Outcome, Error> {
    flash::write_via(bus, o, src, &sbcflash::progress::Silent)
}

/// A loader-mode board with `kind` armed at `at`, and the error a 4 MiB write to it ends in.
fn write_4mib_with_fault(at: Trigger, kind: FaultKind) -> (Arc<Mutex<RockchipBoard>>, Error) {
    let board = loader_board_with(Fault { at, kind });
    let e = write_4mib(&board).expect_err("the fault must fail the write");
    (board, e)
}

fn write_4mib(board: &Arc<Mutex<RockchipBoard>>) -> Result<Outcome, Error> {
    let mut o = rk_opts(Via::Usb, vec![]);
    o.storage = None;
    write_silently(&bus_of(board), &o, mem("img", pattern(4 << 20, 0x33)))
}

#[test]
fn rockusb_fault_cable_drop_mid_write_says_how_far() {
    let (board, e) = write_4mib_with_fault(Trigger::AfterBulkOut(1 << 20), FaultKind::Vanish);
    let msg = e.to_string();
    assert!(msg.contains("WRITE_LBA failed at offset"), "{msg}");
    assert!(msg.contains("device disconnected"), "{msg}");
    assert_eq!(e.exit(), Exit::Io);
    use sbcflash::usb::sim::SimDevice;
    assert_eq!(lock(&board).faults().fired, vec![FaultKind::Vanish]);
    // The partition-table MiB is written last, so it was never written.
    let b = lock(&board);
    assert_ne!(&b.storage(EMMC)[..4096], &pattern(4096, 0x33)[..]);
}

#[test]
fn rockusb_fault_csw_failed_status() {
    let (_, e) = write_4mib_with_fault(Trigger::AfterBulkOut(2 << 20), FaultKind::FailStatus);
    assert!(e.to_string().contains("CSW status FAILED"), "{e}");
    assert!(e.to_string().contains("failed at offset"), "{e}");
}

#[test]
fn rockusb_fault_stall_and_timeout() {
    let (_, e) = write_4mib_with_fault(Trigger::AfterBulkOut(512 << 10), FaultKind::Stall);
    assert!(e.to_string().contains("stalled"), "{e}");
    let (_, e) = write_4mib_with_fault(Trigger::AfterBulkOut(3 << 20), FaultKind::Timeout);
    assert!(e.to_string().contains("timed out"), "{e}");
    assert_eq!(
        e.exit(),
        Exit::Timeout,
        "a USB timeout mid-pipeline keeps its exit class"
    );
}

#[test]
fn rockusb_fault_short_read_during_verify() {
    let (_, e) = write_4mib_with_fault(Trigger::AfterBulkIn(1 << 20), FaultKind::ShortRead);
    let msg = e.to_string();
    assert!(
        msg.contains("READ_LBA failed") && msg.contains("short read"),
        "{msg}"
    );
}

/// A flash that acknowledges a write but keeps the old bytes is caught by the read-back.
#[test]
fn rockusb_verify_catches_a_lying_flash() {
    let mut b = RockchipBoard::rk3588(8 << 20);
    b.mode = RkMode::Loader;
    b.drop_write_at_lba = Some(3072);
    let board = shared(b);
    let e = write_4mib(&board).unwrap_err();
    assert!(e.to_string().contains("verification FAILED"), "{e}");
    assert_eq!(e.exit(), Exit::Verify);
}

// ---------------------------------------------------------------- fastboot

#[test]
fn fastboot_replies_info_fail_data() {
    let dev = shared(FastbootDevice::uboot(1 << 20, &[("root", 1 << 20)]));
    let mut t = Rec::new(handle(&dev));
    let mut fb = Fastboot::new(&mut t);
    assert_eq!(fb.max_download_size().unwrap(), 1 << 20);
    let e = fb.getvar("nonsense").unwrap_err();
    assert!(e.to_string().contains("Variable not implemented"), "{e}");
    fb.download(&[7u8; 5000], &mut |_| {}).unwrap();
    fb.flash("root").unwrap();
    assert_eq!(fb.messages, vec!["writing 'root'"]);
    let e = fb.flash("nope").unwrap_err();
    assert!(e.to_string().contains("'flash:nope' failed"), "{e}");
    drop(fb);
    let outs = t.of("bulk_out");
    assert_eq!(outs[0].as_slice(), b"getvar:max-download-size");
    assert_eq!(outs[2].as_slice(), b"download:00001388");
    let ins = t.of("bulk_in");
    assert_eq!(ins[0].as_slice(), b"OKAY0x00100000");
    assert_eq!(ins[2].as_slice(), b"DATA00001388");
    assert_eq!(&lock(&dev).partitions["root"][..5000], &[7u8; 5000][..]);
}

/// Real img2simg output, cut under a small max-download-size by android-sparse-image's
/// splitter, flashed piece by piece: the partition equals the raw image.
#[test]
fn fastboot_img2simg_output_split_under_max_size() {
    if !common::require(false, &["img2simg"]) {
        return;
    }
    let Some((dir, img, raw)) = nixos_image("fb-simg", 48) else {
        return;
    };
    let simg = dir.0.join("nixos.simg");
    common::run(std::process::Command::new("img2simg").arg(&img).arg(&simg));
    let sparse = std::fs::read(&simg).unwrap();
    assert!(fastboot::is_sparse(&sparse));
    let max = 4 << 20;
    let pieces = fastboot::split_sparse_file("nixos.simg", &sparse, max).unwrap();
    assert!(
        pieces.len() > 1,
        "expected several pieces, got {}",
        pieces.len()
    );
    assert!(pieces.iter().all(|p| p.len() <= max as usize));
    let dev = shared(FastbootDevice::uboot(max, &[("root", 64 << 20)]));
    let mut t = handle(&dev);
    let mut fb = Fastboot::new(&mut t);
    for p in &pieces {
        fb.download(p, &mut |_| {}).unwrap();
        fb.flash("root").unwrap();
    }
    assert!(lock(&dev).partitions["root"][..raw.len()] == raw[..]);
    // Too small a limit for one of its chunks.
    let e = fastboot::split_sparse_file("nixos.simg", &sparse, 1000).unwrap_err();
    assert!(e.to_string().contains("max-download-size"), "{e}");
}

/// The whole `write --via fastboot` path: extents re-encoded into sparse pieces.
#[test]
fn fastboot_full_session_sparse_pieces() {
    let Some((_dir, _img, raw)) = nixos_image("fb-session", 48) else {
        return;
    };
    let max = 3 << 20;
    let dev = shared(FastbootDevice::uboot(
        max,
        &[("root", 64 << 20), ("boot", 1 << 20)],
    ));
    let bus = bus_of(&dev);
    let mut o = ViaOptions::new(Via::Fastboot);
    o.partition = Some("root".into());
    let out = write_silently(&bus, &o, mem("nixos.img", raw.clone())).unwrap();
    let d = lock(&dev);
    assert!(
        d.partitions["root"][..raw.len()] == raw[..],
        "partition differs from image"
    );
    assert!(d.downloads.len() > 1 && d.downloads.iter().all(|&n| n <= max as usize));
    assert!(d.commands.iter().filter(|c| *c == "flash:root").count() == d.downloads.len());
    assert_eq!(d.commands.last().map(String::as_str), Some("reboot"));
    // Written counts image bytes in RAW chunks only, not the sparse headers (the lab showed
    // 520 header bytes counted as written and missing from skipped).
    let data = raw
        .chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count() as u64
        * 4096;
    assert!(
        matches!(
            out,
            Outcome::Written { verified: false, bytes_written, bytes_skipped, image_size, .. }
                if bytes_written == data && bytes_skipped == image_size - data
        ),
        "{out:?}, {data} data bytes"
    );
}

#[test]
fn fastboot_limits_and_faults() {
    // max-download-size too small for one block.
    let dev = shared(FastbootDevice::uboot(2000, &[("root", 1 << 20)]));
    let mut o = ViaOptions::new(Via::Fastboot);
    o.partition = Some("root".into());
    let e = write_silently(&bus_of(&dev), &o, mem("x", pattern(8192, 1))).unwrap_err();
    assert!(
        e.to_string()
            .contains("max-download-size is 2000 bytes, too small"),
        "{e}"
    );
    // Partition smaller than the image.
    let dev = shared(FastbootDevice::uboot(1 << 20, &[("root", 4096)]));
    let e = write_silently(&bus_of(&dev), &o, mem("x", pattern(8192, 1))).unwrap_err();
    assert!(
        e.to_string().contains("partition 'root' holds 4096 bytes"),
        "{e}"
    );
    // Cable drop in the middle of the second piece.
    let dev = shared(FastbootDevice::uboot(1 << 20, &[("root", 8 << 20)]));
    {
        use sbcflash::usb::sim::SimDevice;
        lock(&dev).faults().add(Fault {
            at: Trigger::AfterBulkOut(1_500_000),
            kind: FaultKind::Vanish,
        });
    }
    let e = write_silently(&bus_of(&dev), &o, mem("x", pattern(4 << 20, 2))).unwrap_err();
    assert!(matches!(e, Error::Interrupted { .. }), "{e}");
    assert!(e.to_string().contains("sparse piece 2"), "{e}");
    // FAIL reply from flash.
    let dev = shared(FastbootDevice::uboot(1 << 20, &[("root", 8 << 20)]));
    {
        use sbcflash::usb::sim::SimDevice;
        lock(&dev).fail_next_status();
    }
    let e = write_silently(&bus_of(&dev), &o, mem("x", pattern(4096, 2))).unwrap_err();
    assert!(e.to_string().contains("injected failure"), "{e}");
}

/// Lichee Pi 4A: the TH1520 ROM takes U-Boot into `ram`, reboots into it, and U-Boot's
/// fastboot then flashes uboot and root.
#[test]
fn fastboot_th1520_ram_then_uboot_session() {
    let Some((_dir, _img, raw)) = nixos_image("fb-th1520", 40) else {
        return;
    };
    let uboot_bin = pattern(700_000, 0x42);
    let mut rom = FastbootDevice::uboot(64 << 20, &[("ram", 1 << 20)]);
    rom.report_sizes = false;
    rom.reboots_into = Some(Box::new(|d: &mut FastbootDevice| {
        // U-Boot, run from RAM, comes back with the eMMC partitions.
        d.max_download = 8 << 20;
        d.report_sizes = true;
        d.partitions.insert("uboot".into(), vec![0; 1 << 20]);
        d.partitions.insert("root".into(), vec![0xee; 48 << 20]);
    }));
    let dev = shared(rom);
    let bus = bus_of(&dev);
    let mut o = ViaOptions::new(Via::Fastboot);
    o.partition = Some("ram".into());
    write_silently(&bus, &o, mem("u-boot-with-spl.bin", uboot_bin.clone())).unwrap();
    // The ROM got raw bytes (no sparse header) since it fits one download.
    assert_eq!(&lock(&dev).partitions["ram"][..700_000], &uboot_bin[..]);
    for (part, data) in [("uboot", uboot_bin.clone()), ("root", raw.clone())] {
        o.partition = Some(part.into());
        o.reset = part == "root";
        write_silently(&bus, &o, mem(part, data)).unwrap();
    }
    let d = lock(&dev);
    assert_eq!(&d.partitions["uboot"][..700_000], &uboot_bin[..]);
    assert!(d.partitions["root"][..raw.len()] == raw[..]);
}

// ---------------------------------------------------------------- rpiboot

#[test]
fn usbboot_full_session_rom_file_server_mass_storage() {
    let dir = TmpDir(tmpdir("rpi"));
    let d = &dir.0;
    std::fs::create_dir_all(d.join("2711")).unwrap();
    std::fs::write(d.join("2711/bootcode4.bin"), pattern(52_000, 1)).unwrap();
    std::fs::write(d.join("config.txt"), b"boot_ramdisk=1\n").unwrap();
    std::fs::write(d.join("bootmain"), pattern(40_000, 2)).unwrap();
    std::fs::write(d.join("boot.img"), pattern(3 << 20, 3)).unwrap();
    let mut board = RpiBoard::cm4(&[
        "config.txt",
        "bootmain",
        "boot.img",
        "missing.bin",
        "../etc/passwd",
    ]);
    board
        .script
        .insert(0, (0, "*MAC_ADDR*dc:a6:32:01:02:03".into()));
    let board = shared(board);
    let mut bus = SimBus::new();
    bus.attach(board.clone());
    bus.map_block("1-1.3", PathBuf::from("/dev/sim-emmc"));
    let mut o = ViaOptions::new(Via::Usbboot);
    o.usbboot_dir = Some(d.clone());
    o.reenumerate_timeout = Duration::from_secs(5);
    let out = write_silently(&bus, &o, mem("unused", vec![])).unwrap();
    assert_eq!(
        out,
        Outcome::BlockDevice {
            device: "0a5c:2711 at 1-1.3".into(),
            path: PathBuf::from("/dev/sim-emmc")
        }
    );
    let b = lock(&board);
    assert_eq!(b.stage, Stage::MassStorage);
    assert_eq!(b.second_stage.as_deref(), Some(&pattern(52_000, 1)[..]));
    assert_eq!(
        b.files["boot.img"].as_deref(),
        Some(&pattern(3 << 20, 3)[..])
    );
    assert_eq!(
        b.files["config.txt"].as_deref(),
        Some(&b"boot_ramdisk=1\n"[..])
    );
    assert_eq!(b.files["missing.bin"], None);
    assert_eq!(b.files["../etc/passwd"], None, "path traversal refused");
    assert!(b.sizes.contains(&("boot.img".into(), 3 << 20)));
    assert!(b.sizes.contains(&("missing.bin".into(), 0)));
}

/// rpiboot takes a file request of any length (it ignores the count libusb returns) and ends
/// the file server when the device leaves the bus: a second stage that boots on without Done.
#[test]
fn usbboot_short_requests_and_a_second_stage_that_boots_on_without_done() {
    let dir = TmpDir(tmpdir("rpi-short"));
    let d = &dir.0;
    std::fs::create_dir_all(d.join("2711")).unwrap();
    std::fs::write(d.join("2711/bootcode4.bin"), pattern(52_000, 1)).unwrap();
    std::fs::write(d.join("boot.img"), pattern(100_000, 3)).unwrap();
    let mut board = RpiBoard::cm4(&["boot.img"]);
    board.short_requests = true;
    board.boot_without_done();
    let board = shared(board);
    let mut bus = SimBus::new();
    bus.attach(board.clone());
    bus.map_block("1-1.3", PathBuf::from("/dev/sim-emmc"));
    let mut o = ViaOptions::new(Via::Usbboot);
    o.usbboot_dir = Some(d.clone());
    o.reenumerate_timeout = Duration::from_secs(5);
    let out = write_silently(&bus, &o, mem("unused", vec![])).unwrap();
    assert!(matches!(out, Outcome::BlockDevice { .. }), "{out:?}");
    let b = lock(&board);
    assert_eq!(b.stage, Stage::MassStorage);
    assert_eq!(
        b.files["boot.img"].as_deref(),
        Some(&pattern(100_000, 3)[..])
    );
}

#[test]
fn usbboot_rom_rejection_and_wire_format() {
    let board = shared(RpiBoard::cm4(&[]));
    {
        use sbcflash::usb::sim::SimDevice;
        lock(&board).fail_next_status();
    }
    let mut t = Rec::new(handle(&board));
    let e = usbboot::boot_rom(&mut t, &pattern(20_000, 1)).unwrap_err();
    assert!(e.to_string().contains("rejected the second stage"), "{e}");
    // Boot message: i32 LE length + 20 zero bytes, after a zero-data control OUT.
    let bulk = t.of("bulk_out");
    assert_eq!(bulk[0].len(), 24);
    assert_eq!(&bulk[0][..4], &20_000i32.to_le_bytes());
    assert!(bulk[1..].iter().all(|c| c.len() <= 16 * 1024));
    assert!(t.of("control_out").iter().all(|d| d.is_empty()));
}

// ---------------------------------------------------------------- FEL

#[test]
fn fel_version_write_read_exec() {
    let dev = shared(FelDevice::d1(1 << 20));
    let mut t = Rec::new(handle(&dev));
    let v = fel::version(&mut t).unwrap();
    assert_eq!(v.soc_id, 0x1859);
    assert_eq!(v.scratchpad, 0x7e00);
    assert_eq!(fel::soc_name(&mut t, &v).unwrap(), "D1/D1s (RISC-V)");
    // AWUC framing of the first request.
    let awuc = t.of("bulk_out")[0].clone();
    assert_eq!(awuc.len(), 32);
    assert_eq!(&awuc[..4], b"AWUC");
    assert_eq!(&awuc[8..12], &16u32.to_le_bytes());
    assert_eq!(&awuc[12..16], &[0, 0, 0, 0x0c]);
    assert_eq!(&awuc[16..18], &[0x12, 0]);
    let data = pattern(200_000, 0x11);
    fel::write(&mut t, DRAM_BASE + 0x1000, &data, &mut |_| {}).unwrap();
    let mut back = vec![0u8; data.len()];
    fel::read(&mut t, DRAM_BASE + 0x1000, &mut back, &mut |_| {}).unwrap();
    assert_eq!(back, data);
    fel::exec(&mut t, DRAM_BASE + 0x1000).unwrap();
    let d = lock(&dev);
    assert_eq!(&d.dram[0x1000..0x1000 + data.len()], &data[..]);
    assert_eq!(d.executed, vec![DRAM_BASE + 0x1000]);
}

#[test]
fn fel_faults() {
    let dev = shared(FelDevice::d1(1 << 20));
    {
        use sbcflash::usb::sim::SimDevice;
        lock(&dev).faults().add(Fault {
            at: Trigger::AfterBulkOut(150_000),
            kind: FaultKind::Vanish,
        });
    }
    let mut t = handle(&dev);
    let e = fel::write(&mut t, DRAM_BASE, &pattern(300_000, 1), &mut |_| {}).unwrap_err();
    assert!(
        matches!(e, Error::Interrupted { done, .. } if done > 0 && done < 300_000),
        "{e}"
    );
    let dev = shared(FelDevice::d1(1 << 20));
    {
        use sbcflash::usb::sim::SimDevice;
        lock(&dev).faults().add(Fault {
            at: Trigger::Transfer(4),
            kind: FaultKind::ShortRead,
        });
    }
    let e = fel::version(&mut handle(&dev)).unwrap_err();
    assert!(e.to_string().contains("short FEL read"), "{e}");
}

#[test]
fn fel_cli_against_simulated_bus() {
    use clap::Parser;
    let dev = shared(FelDevice::d1(1 << 20));
    let bus = bus_of(&dev);
    let cli = sbcflash::cli::Cli::try_parse_from([
        "sbcflash", "fel", "--board", "nezha", "read", "0", "16",
    ])
    .unwrap();
    let sbcflash::cli::Command::Fel(a) = cli.command else {
        panic!("not fel")
    };
    let code = sbcflash::cli::usb::run_fel_on(&bus, a, &cli.global).unwrap();
    assert_eq!(code, Exit::Ok);
    let empty = SimBus::new();
    let cli = sbcflash::cli::Cli::try_parse_from(["sbcflash", "fel", "version"]).unwrap();
    let sbcflash::cli::Command::Fel(a) = cli.command else {
        panic!("not fel")
    };
    let e = sbcflash::cli::usb::run_fel_on(&empty, a, &cli.global).unwrap_err();
    assert!(
        e.to_string().contains("no Allwinner board in FEL mode"),
        "{e}"
    );
    assert_eq!(sbcflash::cli::classify(&e), Exit::Environment);
}

// ---------------------------------------------------------------- discovery, udev, CLI

#[test]
fn simulated_bus_lists_every_protocol() {
    let mut bus = SimBus::new();
    bus.attach(shared(RockchipBoard::rk3588(1 << 20)));
    bus.attach(shared(FastbootDevice::uboot(1 << 20, &[])));
    bus.attach(shared(RpiBoard::cm4(&[])));
    bus.attach(shared(FelDevice::d1(1 << 10)));
    let l = bus.list().unwrap();
    let v: Vec<(String, String)> = l.iter().map(|f| (f.id(), f.mode.to_string())).collect();
    assert_eq!(
        v,
        [
            ("0a5c:2711".to_string(), "ROM".to_string()),
            ("2207:350b".into(), "maskrom".into()),
            ("1f3a:efe8".into(), "FEL".into()),
            ("2345:7654".into(), "fastboot".into()),
        ]
    );
    let j = serde_json::to_value(&l[1]).unwrap();
    assert_eq!(j["vid"], "2207");
    assert_eq!(j["protocol"], "rockusb");
    assert_eq!(j["soc"], "RK3588");
}

#[test]
fn udev_rules_file_matches_the_id_tables() {
    let committed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join(sbcflash::usb::udev::RULES_PATH),
    )
    .expect("udev-rules/70-sbcflash.rules is committed");
    let rendered = sbcflash::usb::udev::render();
    assert!(
        committed == rendered,
        "udev-rules/70-sbcflash.rules is stale: regenerate with `sbcflash usb udev-rules > {}`",
        sbcflash::usb::udev::RULES_PATH
    );
    for needle in [
        "ATTR{idVendor}==\"2207\", MODE",
        "ATTR{idProduct}==\"2711\"",
        "ATTR{idProduct}==\"2712\"",
        "ATTR{idProduct}==\"2763\"",
        "ATTR{idProduct}==\"2764\"",
        "ATTR{idVendor}==\"1f3a\", ATTR{idProduct}==\"efe8\"",
        "ATTR{idVendor}==\"2345\", ATTR{idProduct}==\"7654\"",
        "TAG+=\"uaccess\"",
        "ATTR{power/control}=\"on\"",
    ] {
        assert!(rendered.contains(needle), "missing {needle}");
    }
}

/// The real rusb path, on a machine without a USB bus: an empty list and success.
#[test]
fn usb_list_real_bus_is_empty_not_an_error() {
    let out = common::run(common::sbcflash().args(["usb"]));
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = common::run(common::sbcflash().args(["--json", "usb", "list"]));
    common::json::assert_documented(&String::from_utf8_lossy(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["devices"], serde_json::json!([]));
    // The library call agrees.
    let bus = sbcflash::usb::discovery::RusbBus::new();
    assert!(bus.list().unwrap().is_empty());
}

/// `write --via` wiring through the real (empty) bus: clear errors, right exit codes.
#[test]
fn write_via_cli_errors_without_a_board() {
    let dir = TmpDir(tmpdir("via-cli"));
    let img = dir.0.join("x.img");
    // A disk image as far as the writer's first look goes: an empty MBR.
    let mut mbr = vec![0u8; 8192];
    mbr[510..512].copy_from_slice(&[0x55, 0xAA]);
    std::fs::write(&img, mbr).unwrap();
    let out = common::sbcflash()
        .args(["write", "--via", "usb"])
        .arg(&img)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(Exit::Environment.code() as i32),
        "{err}"
    );
    assert!(
        err.contains("no Rockchip board in maskrom or loader mode found"),
        "{err}"
    );
    let out = common::sbcflash()
        .args(["write", "--via", "maskrom", "--board", "opi5"])
        .arg(&img)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(Exit::Usage.code() as i32), "{err}");
    assert!(
        err.contains("--via maskrom needs --loader") && err.contains("rk3588_spl_loader"),
        "{err}"
    );
    let out = common::sbcflash()
        .args(["write", "--via", "fastboot", "--board", "opi5"])
        .arg(&img)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("recovers over rockusb"), "{err}");
}

/// The whole Raspberry Pi path as `write --via usbboot` runs it: rpiboot boots the mass-storage
/// gadget on the simulated board, the board's storage appears as a block device (here a real
/// loop device standing in for the CM4's eMMC, the only part a CI machine cannot have), and the
/// normal block writer writes and reads it back with all its safety checks.
#[test]
fn usbboot_then_block_writer_on_a_loop_device() {
    if !common::require(true, &["losetup"]) {
        return;
    }
    let dir = TmpDir(tmpdir("rpi-e2e"));
    let d = &dir.0;
    std::fs::create_dir_all(d.join("2711")).unwrap();
    std::fs::write(d.join("2711/bootcode4.bin"), pattern(52_000, 1)).unwrap();
    std::fs::write(d.join("bootmain"), pattern(40_000, 2)).unwrap();
    // The image: data at the start (a partition table's place), a hole, data at the end.
    let img_path = d.join("image.img");
    let mut img = pattern(8 << 20, 7);
    img[(2 << 20)..(6 << 20)].fill(0);
    std::fs::write(&img_path, &img).unwrap();
    let emmc = common::LoopDev::new_sparse(d, "emmc.bin", 16 << 20);
    // Stale bytes that a correct write must replace (the zero range included).
    std::fs::write(&emmc.backing, pattern(16 << 20, 0x5a)).unwrap();

    let board = shared(RpiBoard::cm4(&["bootmain"]));
    let mut bus = SimBus::new();
    bus.attach(board.clone());
    bus.map_block("1-1.3", emmc.path().to_path_buf());
    let mut o = ViaOptions::new(Via::Usbboot);
    o.usbboot_dir = Some(d.clone());
    o.reenumerate_timeout = Duration::from_secs(5);
    let out = write_silently(&bus, &o, mem("unused", vec![])).unwrap();
    let Outcome::BlockDevice { path, .. } = out else {
        panic!("usbboot must hand back a block device, got {out:?}");
    };
    assert_eq!(path, emmc.path());
    assert_eq!(lock(&board).stage, Stage::MassStorage);

    let opened =
        sbcflash::image::open_image(&img_path, &sbcflash::image::OpenOptions::default()).unwrap();
    let policy = sbcflash::target::Policy {
        image_size: opened.logical_size,
        force: false,
        image_paths: vec![img_path.clone()],
    };
    let target = sbcflash::target::open(&path, &policy).unwrap();
    let mut sink = target.into_sink().unwrap();
    let opts = sbcflash::write::WriteOptions {
        expected_blake3: Some(*blake3::hash(&img).as_bytes()),
        job: "cm4".into(),
        ..Default::default()
    };
    let report = sbcflash::write::run(
        opened.source,
        sink.as_mut(),
        &opts,
        &sbcflash::progress::Silent,
    )
    .unwrap();
    drop(sink);
    assert!(report.digest_checked);
    assert!(report.verified_bytes.is_some(), "the read-back ran");
    let on_disk = std::fs::read(&emmc.backing).unwrap();
    assert!(on_disk[..img.len()] == img[..], "eMMC holds the image");
}

/// `--bootloader` over rockusb: the placed files go through the same session after the image
/// (the claimed `Sink`), are read back over READ_LBA, and the board is reset only after them.
/// An unaligned length exercises the sector read-modify-write at both ends.
#[test]
fn rockusb_places_bootloader_files_after_the_image_in_the_same_session() {
    let dir = TmpDir(tmpdir("rk-place"));
    let mut b = RockchipBoard::rk3588(16 << 20);
    b.mode = RkMode::Loader;
    let board = shared(b);
    let idb = pattern(100_001, 0x51);
    let itb = pattern(300 * 1024, 0x52);
    let (pi, pt) = (dir.0.join("idbloader.img"), dir.0.join("u-boot.itb"));
    std::fs::write(&pi, &idb).unwrap();
    std::fs::write(&pt, &itb).unwrap();
    let mut o = rk_opts(Via::Usb, vec![]);
    o.storage = None;
    o.placements = vec![
        sbcflash::board::PlacedFile {
            path: pi,
            offset: 2 << 20,
            len: idb.len() as u64,
            slot: "idbloader.img".into(),
        },
        sbcflash::board::PlacedFile {
            path: pt,
            offset: 8 << 20,
            len: itb.len() as u64,
            slot: "u-boot.itb".into(),
        },
    ];
    let image = pattern(1 << 20, 0x33);
    write_silently(&bus_of(&board), &o, mem("img", image.clone())).unwrap();
    let b = lock(&board);
    let flash = b.storage(EMMC);
    assert!(flash[..image.len()] == image[..], "image");
    assert!(
        flash[2 << 20..(2 << 20) + idb.len()] == idb[..],
        "idbloader"
    );
    assert!(
        flash[8 << 20..(8 << 20) + itb.len()] == itb[..],
        "u-boot.itb"
    );
    assert_eq!(b.resets.len(), 1, "one reset, at the end");
}

/// `write --via usb --delta`: the board's storage is read over rockusb (READ_LBA) and only
/// the 4 MiB unit that differs goes over the cable (plus the first MiB, cleared first and
/// written last); the same image again sends no WRITE_LBA at all.
#[test]
fn rockusb_delta_sends_only_what_differs() {
    let mib = 1usize << 20;
    let mut a = pattern(12 * mib, 3);
    a[510] = 0x55;
    a[511] = 0xAA;
    let mut b = a.clone();
    b[9 * mib..9 * mib + 4096].fill(0xEE);
    let mut board = RockchipBoard::rk3588(16 << 20);
    board.mode = RkMode::Loader;
    let board = shared(board);
    let bus = bus_of(&board);
    let mut o = rk_opts(Via::Usb, vec![]);
    o.reset = false;
    write_silently(&bus, &o, mem("a.img", a)).unwrap();
    o.delta = true;
    let writes = |board: &Arc<Mutex<RockchipBoard>>| {
        lock(board).commands.iter().filter(|&&c| c == 0x15).count()
    };
    lock(&board).commands.clear();
    let out = write_silently(&bus, &o, mem("b.img", b.clone())).unwrap();
    assert_eq!(
        &lock(&board).storage(EMMC)[..b.len()],
        &b[..],
        "storage != b"
    );
    assert!(
        matches!(out, Outcome::Written { bytes_written, bytes_skipped, verified: true, .. }
            if bytes_written <= 4 * mib as u64 + 2 * mib as u64 && bytes_written > 0
                && bytes_skipped >= 7 * mib as u64),
        "{out:?}"
    );
    let sent = writes(&board);
    assert!(sent > 0, "nothing written");
    lock(&board).commands.clear();
    let out = write_silently(&bus, &o, mem("b.img", b.clone())).unwrap();
    assert_eq!(writes(&board), 0, "an unchanged board was written: {out:?}");
    assert!(
        lock(&board).commands.contains(&0x14),
        "the storage was not read"
    );
    assert!(
        matches!(
            out,
            Outcome::Written {
                bytes_written: 0,
                ..
            }
        ),
        "{out:?}"
    );
}
