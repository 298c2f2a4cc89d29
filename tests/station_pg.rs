//! A line of stations on one central PostgreSQL ledger, against real peers: PostgreSQL from
//! Debian's package (a fresh cluster per test, TLS with its own certificate, SCRAM passwords),
//! Debian's systemd-udevd, loop devices as cards, several `sbcflash station` processes.
//!
//! Every test that starts udevd has `udevd` in its name (nextest runs those one at a time);
//! under plain `cargo test` a lock serialises them too.

mod common;

use common::pg::Postgres;
use common::station::{
    backing, is_msg, is_start, read_range, udevd_present, udevd_serial, write_loop_config, Station,
    StationCmd, Throttle,
};
use common::{make_nixos_like_image, require, run, sbcflash, LoopDev, Table, Udevd};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// Layout of `make_nixos_like_image`: FAT "FIRMWARE" at 8 MiB, 16 MiB long; ext4 after.
const FAT_OFF: u64 = 8 * MIB;
const FAT_LEN: u64 = 16 * MIB;
const IMG_MIB: u64 = 48;
/// A watchdog against a hung peer, not a performance threshold.
const WATCHDOG: Duration = Duration::from_secs(600);
const PASSWORD: &str = "line-s3cret";

const TOOLS: &[&str] = &[
    "losetup",
    "udevadm",
    "sfdisk",
    "mkfs.vfat",
    "mkfs.ext4",
    "mcopy",
    "mtype",
    "psql",
    "setpriv",
];

/// Root, the tools, and PostgreSQL's server binaries (not on PATH in Debian).
fn ready(udevd: bool) -> bool {
    if !require(true, TOOLS) {
        return false;
    }
    if udevd && !udevd_present() && !require(true, &["systemd-udevd"]) {
        return false;
    }
    if common::pg::bin_dir().is_none() {
        let msg = "test needs PostgreSQL's server (Debian package postgresql; run scripts/setup-debian.sh)";
        assert!(
            !common::in_ci(),
            "{msg}; under CI=true this must not be skipped"
        );
        eprintln!("SKIPPED: {msg}");
        return false;
    }
    true
}

/// A station of the line named `name` (in failure messages), with the ledger's password.
fn spawn(name: &str, dir: &Path, config: &Path, args: &[&str]) -> Station {
    StationCmd::new(dir, config)
        .name(name)
        .env("SBCFLASH_LEDGER_PASSWORD", PASSWORD)
        .watchdog(WATCHDOG)
        .spawn(args)
}

/// A station config on the central ledger `url` in `dir`, one slot per backing file.
fn write_config(
    dir: &Path,
    image: &Path,
    url: &str,
    name: &str,
    extra: &str,
    slots: &[(String, PathBuf)],
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let head = format!(
        r#"board = "orangepi-5"
ledger = "{url}"
outbox = "outbox.sqlite"
station_name = "{name}"
serial_lease = 20
log_dir = "logs"
image = "{}"
{extra}
[identity]
serial = "LINE-{{seq:05}}"
hostname = "{{serial_lower}}"
[[identity.file]]
path = "sbcflash/identity.json"
template = '{{"serial": "{{serial}}", "slot": "{{slot}}"}}'
"#,
        image.display()
    );
    let slots: Vec<(&str, &Path)> = slots
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_path()))
        .collect();
    write_loop_config(dir, &head, &slots)
}

/// The line's report through the CLI (`--ledger URL`), as JSON rows.
fn line_report(pg: &Postgres, url: &str, extra: &[&str]) -> Vec<Value> {
    let o = run(sbcflash()
        .env("SBCFLASH_LEDGER_PASSWORD", PASSWORD)
        .args([
            "station",
            "report",
            "--format",
            "json",
            "--ledger",
            url,
            "--ca-file",
        ])
        .arg(&pg.cert)
        .args(extra));
    let v: Value = serde_json::from_slice(&o.stdout).expect("report is JSON");
    v.as_array().expect("report is an array").clone()
}

/// A flashed unit: byte for byte the image outside the FAT partition, and its identity file
/// (read by mtools) names `serial`.
fn check_unit(img: &Path, dev: &Path, serial: &str, slot: &str) {
    run(Command::new("blockdev").arg("--flushbufs").arg(dev));
    let len = std::fs::metadata(img).unwrap().len();
    common::assert_same_prefix(img, dev, FAT_OFF);
    let tail = len - FAT_OFF - FAT_LEN;
    assert!(
        read_range(img, FAT_OFF + FAT_LEN, tail) == read_range(dev, FAT_OFF + FAT_LEN, tail),
        "{}: differs from the image after the FAT partition",
        dev.display()
    );
    let o = run(Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{}", dev.display(), FAT_OFF))
        .arg("::sbcflash/identity.json"));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!(r#"{{"serial": "{serial}", "slot": "{slot}"}}"#),
        "{}",
        dev.display()
    );
}

/// Waits (watchdog only) until `sql` on the line's database returns `want`.
fn wait_sql(pg: &Postgres, sql: &str, want: &str) {
    let t0 = Instant::now();
    loop {
        if pg.psql("line", sql) == want {
            return;
        }
        assert!(
            t0.elapsed() < WATCHDOG,
            "{sql}: never {want}; last {}",
            pg.psql("line", sql)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Three stations, ten slots each, one database: 15 units flashed with the database up, the
/// database stopped, 15 more flashed on leased serials (rows wait in the outboxes, the status
/// line says so), the database started again, the backlog delivered. Then 30 rows, 30 distinct
/// serials, every lease accounted for, every card's bytes checked.
#[test]
fn station_pg_udevd_three_stations_thirty_units_through_a_database_outage() {
    if !ready(true) {
        return;
    }
    let _serial = udevd_serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut pg = Postgres::start_new(&dir.join("pg"));
    pg.create_db("line", "station", PASSWORD);
    let url = pg.url("station", "line");
    let img = make_nixos_like_image(dir, "nixos.img", IMG_MIB, Table::Mbr);
    let ca = format!("ledger_ca_file = \"{}\"", pg.cert.display());

    let names = ["a", "b", "c"];
    let mut cards: BTreeMap<(String, String), PathBuf> = BTreeMap::new();
    let mut configs = Vec::new();
    for n in names {
        let sdir = dir.join(format!("st-{n}"));
        std::fs::create_dir_all(&sdir).unwrap();
        let slots: Vec<(String, PathBuf)> = (1..=10)
            .map(|i| {
                let slot = format!("{n}{i}");
                let b = backing(&sdir, &format!("{slot}.card"), 64 * MIB);
                cards.insert((n.to_string(), slot.clone()), b.clone());
                (slot, b)
            })
            .collect();
        configs.push(write_config(&sdir, &img, &url, n, &ca, &slots));
    }
    let _udevd = Udevd::start();
    let mut stations: Vec<Station> = names
        .iter()
        .zip(&configs)
        .map(|(n, c)| spawn(n, c.parent().unwrap(), c, &[]))
        .collect();
    for st in &mut stations {
        st.wait_for("station ready", |v| is_msg(v, "station", "station ready"));
        st.wait_for("central ledger", |v| is_msg(v, "station", "central ledger"));
    }

    // Round 1, database up: five cards per station.
    let mut devs: BTreeMap<(String, String), LoopDev> = BTreeMap::new();
    let attach = |devs: &mut BTreeMap<(String, String), LoopDev>,
                  range: std::ops::RangeInclusive<u32>| {
        for n in names {
            for i in range.clone() {
                let key = (n.to_string(), format!("{n}{i}"));
                devs.insert(key.clone(), LoopDev::attach(&cards[&key], &[]));
            }
        }
    };
    attach(&mut devs, 1..=5);
    for st in &mut stations {
        st.wait_for("5 PASS", |v| is_msg(v, "station", "count: 5 PASS, 0 FAIL"));
    }

    // The database goes away; each station says so and keeps flashing on its leased serials.
    pg.stop();
    for st in &mut stations {
        st.wait_for("database unreachable", |v| {
            is_msg(v, "station", "flashing goes on with leased serials")
        });
    }
    attach(&mut devs, 6..=10);
    for st in &mut stations {
        let v = st.wait_for("10 PASS", |v| {
            is_msg(v, "station", "count: 10 PASS, 0 FAIL")
        });
        let text = v["text"].as_str().unwrap();
        assert!(text.contains("(database unreachable)"), "{text}");
        let backlog: u64 = text
            .split("backlog ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no backlog in the status line: {text}"));
        assert!(backlog > 0, "{text}");
    }

    // Back: the outboxes are delivered.
    pg.start();
    wait_sql(&pg, "SELECT COUNT(*) FROM units WHERE result='pass'", "30");
    for st in &mut stations {
        st.wait_for("reachable again", |v| {
            is_msg(v, "station", "reachable again")
        });
    }
    for st in &stations {
        st.signal(nix::sys::signal::Signal::SIGTERM);
    }
    for st in &mut stations {
        let status = st.wait_exit();
        assert!(status.success(), "{status}\n{}\n{}", st.dump(), st.stderr());
        assert!(
            st.seen.iter().any(|v| is_msg(
                v,
                "station",
                "every row delivered, unused serials returned"
            )),
            "{}",
            st.dump()
        );
    }

    let rows = line_report(&pg, &url, &[]);
    assert_eq!(rows.len(), 30, "{rows:#?}");
    let serials: BTreeSet<&str> = rows
        .iter()
        .map(|r| r["unit_serial"].as_str().unwrap())
        .collect();
    assert_eq!(serials.len(), 30, "a serial was handed out twice");
    let seqs: BTreeSet<i64> = rows.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs.len(), 30);
    let uids: BTreeSet<&str> = rows.iter().map(|r| r["uid"].as_str().unwrap()).collect();
    assert_eq!(uids.len(), 30, "a row delivered twice");
    for r in &rows {
        assert_eq!(r["result"], "pass", "{r:#}");
        let key = (
            r["station"].as_str().unwrap().to_string(),
            r["slot"].as_str().unwrap().to_string(),
        );
        check_unit(
            &img,
            devs[&key].path(),
            r["unit_serial"].as_str().unwrap(),
            &key.1,
        );
    }
    for n in names {
        let mine = line_report(&pg, &url, &["--station", n]);
        assert_eq!(mine.len(), 10);
        assert!(mine.iter().all(|r| r["station"] == n));
    }
    // Every serial lies in a block used by its own station; nothing is still leased.
    assert_eq!(
        pg.psql(
            "line",
            "SELECT COUNT(*) FROM serial_leases WHERE state='leased'"
        ),
        "0"
    );
    assert_eq!(
        pg.psql(
            "line",
            "SELECT COUNT(*) FROM units u WHERE NOT EXISTS (SELECT 1 FROM serial_leases l
               WHERE l.state='used' AND l.station=u.station AND u.seq BETWEEN l.first AND l.last)"
        ),
        "0"
    );
    assert_eq!(
        pg.psql("line", "SELECT MAX(version) FROM sbcflash_schema"),
        "2"
    );
    // The station ledger's later columns reach the line too: each unit's read-back digest
    // (the digest chain) equals the image's.
    assert_eq!(
        pg.psql(
            "line",
            "SELECT COUNT(*) FROM units WHERE readback_blake3 IS DISTINCT FROM image_blake3"
        ),
        "0"
    );

    // The line's status: three stations, stopped, nothing waiting, ten PASS each today.
    let o = run(sbcflash()
        .env("SBCFLASH_LEDGER_PASSWORD", PASSWORD)
        .args(["--json", "station", "status", "--ledger", &url, "--ca-file"])
        .arg(&pg.cert));
    let st: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(st.len(), 3, "{st:#?}");
    for s in &st {
        assert_eq!(s["event"], "station-status");
        assert_eq!(s["state"], "stopped", "{s:#}");
        assert_eq!(s["backlog"], 0, "{s:#}");
        assert_eq!(s["units_today"], 10, "{s:#}");
        assert_eq!(s["pass_today"], 10, "{s:#}");
    }
    let rows = common::json::schema_rows();
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        common::json::match_row(&rows, l).unwrap();
    }
    // The same rows as --json lines, as docs/json.md documents them.
    let o = run(sbcflash()
        .env("SBCFLASH_LEDGER_PASSWORD", PASSWORD)
        .args(["--json", "station", "report", "--ledger", &url, "--ca-file"])
        .arg(&pg.cert));
    let lines: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 30);
    for l in &lines {
        let i = common::json::match_row(&rows, l).unwrap();
        assert!(rows[i].fields.iter().any(|f| f == "station"), "{l}");
    }
    // CSV: the station ledger's columns, then the station's.
    let o = run(sbcflash()
        .env("SBCFLASH_LEDGER_PASSWORD", PASSWORD)
        .args(["station", "report", "--ledger", &url, "--ca-file"])
        .arg(&pg.cert));
    let csv = String::from_utf8_lossy(&o.stdout);
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .ends_with(",station_pid,host_key,host_key_fingerprint,signature_key_id,readback_blake3,boot_result,boot_stage,boot_login_seconds,boot_transcript,boot_transcript_blake3,retried_ranges,station,uid"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 31);
}

/// A station killed with SIGKILL mid-unit and started again: its unit is `interrupted` in the
/// central ledger, the block of serials it held is abandoned and never used again, its outbox
/// is delivered.
#[test]
fn station_pg_udevd_kill9_mid_unit_interrupted_centrally_lease_abandoned() {
    if !ready(true) {
        return;
    }
    let _serial = udevd_serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pg = Postgres::start_new(&dir.join("pg"));
    pg.create_db("line", "station", PASSWORD);
    let url = pg.url("station", "line");
    let img = make_nixos_like_image(dir, "nixos.img", IMG_MIB, Table::Mbr);
    let sdir = dir.join("st-k");
    std::fs::create_dir_all(&sdir).unwrap();
    let card = backing(&sdir, "k1.card", 64 * MIB);
    let ca = format!("ledger_ca_file = \"{}\"", pg.cert.display());
    let cfg = write_config(&sdir, &img, &url, "k", &ca, &[("k1".into(), card.clone())]);
    let _udevd = Udevd::start();
    let dev = LoopDev::attach(&card, &[]);
    Udevd::settle();
    let throttle = Throttle::new("sbcflash-pg-test");
    throttle.limit_writes(dev.path(), 2 * MIB);
    let mut st = spawn("k", &sdir, &cfg, &["--flash-present"]);
    throttle.add(st.pid());
    st.wait_for("k1 writing", |v| is_start(v, "k1", "write"));
    // The started row reaches the central ledger while the unit is being written.
    wait_sql(&pg, "SELECT result FROM units", "started");
    st.kill9();
    drop(throttle);
    let first = pg.psql("line", "SELECT seq FROM units");
    let (lease1, l1_first, l1_last) = {
        let r = pg.psql(
            "line",
            "SELECT id, first, last FROM serial_leases WHERE state='leased'",
        );
        let f: Vec<i64> = r.split('|').map(|x| x.parse().unwrap()).collect();
        (f[0], f[1], f[2])
    };

    let mut st = spawn("k", &sdir, &cfg, &["--flash-present", "--exit-after", "1"]);
    let status = st.wait_exit();
    assert!(status.success(), "{status}\n{}\n{}", st.dump(), st.stderr());
    assert!(
        st.seen.iter().any(|v| is_msg(
            v,
            "station",
            "1 serial block(s) of an earlier run abandoned"
        )),
        "{}",
        st.dump()
    );

    let rows = line_report(&pg, &url, &[]);
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let old = rows
        .iter()
        .find(|r| r["seq"].as_i64().map(|s| s.to_string()) == Some(first.clone()))
        .unwrap();
    assert_eq!(old["result"], "interrupted", "{old:#}");
    let new = rows.iter().find(|r| r["result"] == "pass").unwrap();
    let new_seq = new["seq"].as_i64().unwrap();
    assert!(
        !(l1_first..=l1_last).contains(&new_seq),
        "serial {new_seq} reused from the abandoned block {l1_first}..={l1_last}"
    );
    assert_eq!(
        pg.psql(
            "line",
            &format!("SELECT state FROM serial_leases WHERE id={lease1}")
        ),
        "abandoned"
    );
    // Abandoned serials are never handed out again: nothing in the block is free.
    assert_eq!(
        pg.psql(
            "line",
            &format!("SELECT COUNT(*) FROM serial_leases WHERE state<>'abandoned' AND first <= {l1_last} AND last >= {l1_first}")
        ),
        "0"
    );
    // The clean stop returned the unused tail of its block; the next lease anywhere takes it
    // (and the station took nothing else).
    assert_eq!(
        pg.psql(
            "line",
            "SELECT COUNT(*) FROM serial_leases WHERE state='leased'"
        ),
        "0"
    );
    let pw = dir.join("password");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let db = sbcflash::station::central::Db::new(&url, Some(&pg.cert), Some(&pw)).unwrap();
    let mut c = db.connect().unwrap();
    let next = sbcflash::station::central::lease(&db, &mut c, "other", 20, 1).unwrap();
    assert_eq!(next.first as i64, new_seq + 1, "{next:?}");
    assert_eq!(
        pg.psql(
            "line",
            &format!(
                "SELECT station, state FROM serial_leases WHERE id={}",
                next.id
            )
        ),
        "other|leased"
    );
    check_unit(&img, dev.path(), new["unit_serial"].as_str().unwrap(), "k1");
    // The outbox holds the same two rows, all delivered.
    let local = run(sbcflash()
        .args(["station", "report", "--format", "json", "--ledger"])
        .arg(sdir.join("outbox.sqlite")));
    let local: Vec<Value> = serde_json::from_slice(&local.stdout).unwrap();
    assert_eq!(local.len(), 2);
    assert_eq!(
        pg.psql("line", "SELECT backlog FROM stations WHERE name='k'"),
        "0"
    );
}

/// Wrong password, untrusted certificate, a role that may not create the schema, a password
/// in the URL: each stops the station before it flashes anything, with the documented exit
/// code and a message that says what to fix (and never the password).
#[test]
fn station_pg_wrong_password_wrong_ca_refused_migration_flash_nothing() {
    if !ready(false) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pg = Postgres::start_new(&dir.join("pg"));
    pg.create_db("line", "station", PASSWORD);
    // A role on a database it does not own: PostgreSQL 15 lets it connect, not create tables.
    pg.psql(
        "postgres",
        &format!("CREATE ROLE clerk LOGIN PASSWORD '{PASSWORD}'"),
    );
    pg.psql("postgres", "CREATE DATABASE owned_by_postgres");
    let img = make_nixos_like_image(dir, "nixos.img", IMG_MIB, Table::Mbr);
    let other = dir.join("other.crt");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    std::fs::write(&other, p.self_signed(&key).unwrap().pem()).unwrap();

    let cases: Vec<(&str, String, PathBuf, &str, i32, &str)> = vec![
        (
            "password",
            pg.url("station", "line"),
            pg.cert.clone(),
            "wrong-password",
            8,
            "password authentication failed",
        ),
        (
            "ca",
            pg.url("station", "line"),
            other.clone(),
            PASSWORD,
            8,
            "TLS",
        ),
        (
            "migration",
            pg.url("clerk", "owned_by_postgres"),
            pg.cert.clone(),
            PASSWORD,
            8,
            "migration refused",
        ),
        (
            "url",
            format!("postgresql://station:{PASSWORD}@127.0.0.1:{}/line", pg.port),
            pg.cert.clone(),
            PASSWORD,
            3,
            "carries a password",
        ),
    ];
    for (name, url, ca, pw, code, needle) in cases {
        let sdir = dir.join(name);
        std::fs::create_dir_all(&sdir).unwrap();
        let card = backing(&sdir, "e1.card", 64 * MIB);
        let extra = format!("ledger_ca_file = \"{}\"", ca.display());
        let cfg = write_config(
            &sdir,
            &img,
            &url,
            name,
            &extra,
            &[("e1".into(), card.clone())],
        );
        let o = sbcflash()
            .env("SBCFLASH_CACHE_DIR", sdir.join("cache"))
            .env("SBCFLASH_LEDGER_PASSWORD", pw)
            .args([
                "station",
                "--flash-present",
                "--exit-after",
                "1",
                "--config",
            ])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{name}: {err}");
        assert!(err.contains(needle), "{name}: {err}");
        assert!(
            !err.contains(PASSWORD) && !err.contains("wrong-password"),
            "{name}: the password is never shown: {err}"
        );
        // Nothing flashed, no unit recorded.
        assert!(
            std::fs::read(&card).unwrap().iter().all(|b| *b == 0),
            "{name}: card written"
        );
        let outbox = sdir.join("outbox.sqlite");
        if outbox.exists() {
            let r = run(sbcflash()
                .args(["station", "report", "--format", "json", "--ledger"])
                .arg(&outbox));
            let v: Vec<Value> = serde_json::from_slice(&r.stdout).unwrap();
            assert!(v.is_empty(), "{name}: {v:#?}");
        }
    }
    // A dry run names the central ledger and touches nothing (no connection needed).
    let sdir = dir.join("dry");
    let card = backing(dir, "dry.card", 64 * MIB);
    let extra = format!("ledger_ca_file = \"{}\"", pg.cert.display());
    let cfg = write_config(
        &sdir,
        &img,
        &pg.url("station", "line"),
        "dry",
        &extra,
        &[("d1".into(), card)],
    );
    let o = run(sbcflash()
        .env("SBCFLASH_CACHE_DIR", sdir.join("cache"))
        .args(["station", "--dry-run", "--config"])
        .arg(&cfg));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!(
            "ledger: {} (station \"dry\"",
            pg.url("station", "line")
        )) && out.contains("serials leased from it at start")
            && out.contains("next unit: LINE-00001"),
        "{out}"
    );
    // The refused migration left no table behind.
    assert_eq!(
        pg.psql(
            "owned_by_postgres",
            "SELECT COUNT(*) FROM pg_tables WHERE schemaname='public'"
        ),
        "0"
    );
    assert_eq!(
        pg.psql(
            "line",
            "SELECT COUNT(*) FROM pg_tables WHERE tablename='units'"
        ),
        "0"
    );
}

/// BENCHMARKS.md's numbers (`cargo test --test station_pg bench -- --ignored --nocapture`):
/// rows per second the courier's delivery path (outbox → upsert over TLS on loopback → marked
/// delivered) moves, and what a unit's two ledger writes cost with leased serials against the
/// plain SQLite ledger. Prints; asserts only that every row arrived.
#[test]
#[ignore = "benchmark; prints numbers for BENCHMARKS.md"]
fn station_pg_bench_delivery_and_time_per_unit() {
    use sbcflash::station::central::{self, Db};
    use sbcflash::station::ledger::{Ledger, NewUnit, Outcome};
    use sbcflash::station::outbox;
    if !ready(false) {
        return;
    }
    let n: usize = std::env::var("PG_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pg = Postgres::start_new(&dir.join("pg"));
    pg.create_db("line", "station", PASSWORD);
    std::env::set_var("SBCFLASH_LEDGER_PASSWORD", PASSWORD);
    let db = Db::new(&pg.url("station", "line"), Some(&pg.cert), None).unwrap();
    let mut c = db.connect().unwrap();
    central::migrate(&db, &mut c).unwrap();

    let unit = |i: usize| NewUnit {
        slot: format!("s{}", i % 4),
        devnode: Some("/dev/sdx".into()),
        board: Some("orangepi-5".into()),
        image: Some("/srv/nixos.img".into()),
        image_blake3: Some("ab".repeat(32)),
        ..Default::default()
    };
    let pass = Outcome {
        pass: true,
        bytes_written: 1 << 30,
        ..Default::default()
    };
    let per_unit = |l: &mut Ledger| {
        let t0 = Instant::now();
        for i in 0..n {
            let (id, _) = l
                .start_unit(&unit(i), true, 1, |seq| {
                    let s = seq.unwrap();
                    Ok((
                        format!("LINE-{s:06}"),
                        format!("line-{s:06}"),
                        "{}".into(),
                        (),
                    ))
                })
                .unwrap()
                .unwrap();
            l.finish_unit(id, &pass).unwrap();
        }
        t0.elapsed().as_secs_f64() / n as f64
    };

    // The plain SQLite ledger.
    let (mut plain, _) = Ledger::open(&dir.join("plain.sqlite")).unwrap();
    let t_plain = per_unit(&mut plain);

    // The outbox: serials from leases, leased beforehand in blocks of 20 as the courier does
    // in the background (a lease taken inline, when a job finds none, is counted below).
    let path = dir.join("outbox.sqlite");
    let (mut l, _) = Ledger::open(&path).unwrap();
    {
        let local = outbox::open(&path).unwrap();
        for _ in 0..n.div_ceil(20) {
            outbox::add_lease(&local, central::lease(&db, &mut c, "bench", 20, 1).unwrap())
                .unwrap();
        }
    }
    let leases = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let (url, cert, path, leases) = (
            pg.url("station", "line"),
            pg.cert.clone(),
            path.clone(),
            leases.clone(),
        );
        l.use_leased_serials(Box::new(move || {
            let db = Db::new(&url, Some(&cert), None).map_err(|e| e.to_string())?;
            let mut c = db.connect().map_err(|e| e.to_string())?;
            let lease = central::lease(&db, &mut c, "bench", 20, 1).map_err(|e| e.to_string())?;
            let local = outbox::open(&path).map_err(|e| e.to_string())?;
            outbox::add_lease(&local, lease).map_err(|e| e.to_string())?;
            leases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }));
    }
    let t_leased = per_unit(&mut l);

    // Delivery: what the courier does, batch by batch.
    let mut local = outbox::open(&path).unwrap();
    let t0 = Instant::now();
    let mut delivered = 0;
    loop {
        let rows = outbox::pending(&local, 500).unwrap();
        if rows.is_empty() {
            break;
        }
        central::deliver(&db, &mut c, "bench", &rows).unwrap();
        outbox::mark_delivered(&mut local, &rows).unwrap();
        delivered += rows.len();
    }
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(delivered, n);
    assert_eq!(
        pg.psql("line", "SELECT COUNT(DISTINCT seq) FROM units"),
        n.to_string()
    );
    // Once more: nothing pending, nothing changes (idempotent).
    assert!(outbox::pending(&local, 500).unwrap().is_empty());

    // One lease round trip (connect + TLS + transaction), as a station pays every 20 units.
    let t1 = Instant::now();
    let reps = 50;
    for _ in 0..reps {
        let mut c = db.connect().unwrap();
        central::lease(&db, &mut c, "bench", 20, 1).unwrap();
    }
    let t_lease = t1.elapsed().as_secs_f64() / reps as f64;
    println!(
        "rows={n} delivered in {secs:.3}s: {:.0} rows/s; per unit (start+finish): sqlite {:.2} ms, outbox with leases {:.2} ms ({} leases taken inline); lease with a new TLS connection {:.1} ms",
        n as f64 / secs,
        t_plain * 1e3,
        t_leased * 1e3,
        leases.load(std::sync::atomic::Ordering::Relaxed),
        t_lease * 1e3,
    );
}
