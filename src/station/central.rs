//! The central PostgreSQL ledger of a line of stations: schema and migrations, serial leases,
//! idempotent delivery of unit rows, heartbeats, and the line's reports.
//!
//! Each station keeps its own SQLite ledger as the outbox (see [`super::outbox`]); this module
//! only speaks to PostgreSQL. Serial numbers come from one counter row, handed out in blocks
//! (leases) in one transaction each, so no serial is ever given twice: a block is `leased` to
//! one station, then `used` (and its unused tail `returned` for the next lease) on a clean
//! shutdown, or `abandoned` (never reused) when the station restarts after a crash.

use postgres::{Client, NoTls};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ledger::{Row, COLUMNS};
use super::StationError;
use crate::exit::Exit;

/// Numbered schema steps; index + 1 is the version they lead to. Never edit a shipped step.
const MIGRATIONS: &[&str] = &[
    // 1: the line's units, the serial counter and its leases, the stations' heartbeats.
    r#"
    CREATE TABLE units (
        id              BIGSERIAL PRIMARY KEY,
        uid             TEXT NOT NULL UNIQUE,
        station         TEXT NOT NULL,
        local_id        BIGINT NOT NULL,
        rev             BIGINT NOT NULL,
        unit_serial     TEXT NOT NULL,
        attempt         BIGINT NOT NULL,
        slot            TEXT NOT NULL,
        devnode         TEXT,
        id_serial       TEXT,
        id_path         TEXT,
        diskseq         TEXT,
        board           TEXT,
        image           TEXT,
        image_blake3    TEXT,
        seq             BIGINT,
        hostname        TEXT,
        identity_json   TEXT,
        started_at      TEXT NOT NULL,
        ended_at        TEXT,
        bytes_written   BIGINT,
        bytes_skipped   BIGINT,
        throughput_bps  DOUBLE PRECISION,
        result          TEXT NOT NULL CHECK (result IN ('started','pass','fail','interrupted')),
        failure_reason  TEXT,
        tool_version    TEXT NOT NULL,
        station_host    TEXT,
        station_pid     BIGINT
    );
    CREATE INDEX units_started ON units(started_at);
    CREATE INDEX units_station ON units(station, started_at);
    CREATE INDEX units_serial ON units(unit_serial);
    CREATE TABLE counters (
        name  TEXT PRIMARY KEY,
        value BIGINT NOT NULL
    );
    CREATE TABLE serial_leases (
        id        BIGSERIAL PRIMARY KEY,
        station   TEXT NOT NULL,
        first     BIGINT NOT NULL,
        last      BIGINT NOT NULL CHECK (last >= first),
        state     TEXT NOT NULL CHECK (state IN ('leased','used','returned','abandoned')),
        leased_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        ended_at  TIMESTAMPTZ
    );
    CREATE INDEX serial_leases_state ON serial_leases(state, station);
    CREATE TABLE stations (
        name           TEXT PRIMARY KEY,
        host           TEXT,
        pid            BIGINT,
        state          TEXT NOT NULL,
        started_at     TIMESTAMPTZ NOT NULL,
        last_heartbeat TIMESTAMPTZ NOT NULL,
        backlog        BIGINT NOT NULL DEFAULT 0,
        tool_version   TEXT NOT NULL
    );
    "#,
    // 2: the station ledger's later columns: the station-made host key, the digest chain and
    // boot acceptance (SQLite ledger steps 2-4).
    r#"
    ALTER TABLE units ADD COLUMN host_key TEXT;
    ALTER TABLE units ADD COLUMN host_key_fingerprint TEXT;
    ALTER TABLE units ADD COLUMN signature_key_id TEXT;
    ALTER TABLE units ADD COLUMN readback_blake3 TEXT;
    ALTER TABLE units ADD COLUMN boot_result TEXT;
    ALTER TABLE units ADD COLUMN boot_stage TEXT;
    ALTER TABLE units ADD COLUMN boot_login_seconds DOUBLE PRECISION;
    ALTER TABLE units ADD COLUMN boot_transcript TEXT;
    ALTER TABLE units ADD COLUMN boot_transcript_blake3 TEXT;
    ALTER TABLE units ADD COLUMN retried_ranges BIGINT;
    "#,
];

/// Any lock id will do as long as every station uses the same one: it serialises migrations.
const MIGRATION_LOCK: i64 = 0x5bcf_1a54;

/// Where the line's ledger is and how a station uses it.
#[derive(Debug, Clone)]
pub(crate) struct CentralConfig {
    /// `postgresql://user@host:port/db?sslmode=require` (never with a password).
    pub(crate) url: String,
    /// Trusted in addition to the web PKI roots (a private CA, or the server's own
    /// certificate as a pin), as `--ca-file` for downloads.
    pub(crate) ca_file: Option<PathBuf>,
    /// The role's password, one line; else `$CREDENTIALS_DIRECTORY/ledger-password` (systemd
    /// credentials), else `SBCFLASH_LEDGER_PASSWORD`.
    pub(crate) password_file: Option<PathBuf>,
    /// This station's name in the line (default: the host name).
    pub(crate) station: String,
    /// Serials leased per block.
    pub(crate) serial_lease: u64,
}

/// True for `postgresql://` and `postgres://` ledgers.
pub(crate) fn is_url(s: &str) -> bool {
    s.starts_with("postgresql://") || s.starts_with("postgres://")
}

/// The URL with any password replaced, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    let Some(at) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[at..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(a) if rest[..a].contains(':') => {
            let user = &rest[..rest[..a].find(':').unwrap_or(a)];
            format!("{}{user}:***{}", &url[..at], &rest[a..])
        }
        _ => url.to_string(),
    }
}

/// A connection recipe: the parsed URL, its password and TLS trust.
pub struct Db {
    url: String,
    ca_file: Option<PathBuf>,
    cfg: postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
}

fn err(url: &str, exit: Exit, msg: impl Into<String>) -> StationError {
    StationError::Central {
        url: redact(url),
        msg: msg.into(),
        exit,
    }
}

/// The error and its causes in one line (postgres' own Display says only "db error").
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn has_rustls_cause(e: &(dyn std::error::Error + 'static)) -> Option<rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(r) = c.downcast_ref::<rustls::Error>() {
            return Some(r.clone());
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(r.clone());
            }
        }
        cur = c.source();
    }
    None
}

impl Db {
    /// Parses the URL, reads the password (never from the URL) and the CA file.
    pub fn new(
        url: &str,
        ca_file: Option<&Path>,
        password_file: Option<&Path>,
    ) -> Result<Db, StationError> {
        let mut cfg: postgres::Config = url
            .parse()
            .map_err(|e| err(url, Exit::BadInput, format!("not a PostgreSQL URL: {e}")))?;
        if cfg.get_password().is_some() {
            return Err(err(
                url,
                Exit::BadInput,
                "the URL carries a password; put it in `ledger_password_file`, a systemd credential `ledger-password` or SBCFLASH_LEDGER_PASSWORD",
            ));
        }
        if let Some(pw) = password(password_file).map_err(|m| err(url, Exit::BadInput, m))? {
            cfg.password(pw);
        }
        cfg.connect_timeout(Duration::from_secs(5));
        cfg.tcp_user_timeout(Duration::from_secs(10));
        cfg.keepalives(true);
        cfg.application_name(concat!("sbcflash/", env!("CARGO_PKG_VERSION")));
        let mut pinned = Vec::new();
        if let Some(ca) = ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                err(
                    url,
                    Exit::BadInput,
                    format!("ledger_ca_file {}: {e}", ca.display()),
                )
            })?;
            pinned = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    err(
                        url,
                        Exit::BadInput,
                        format!("{}: not a PEM certificate bundle: {e}", ca.display()),
                    )
                })?;
            if pinned.is_empty() {
                return Err(err(
                    url,
                    Exit::BadInput,
                    format!("{}: no certificate found in the file", ca.display()),
                ));
            }
        }
        let mut tls = crate::acquire::tls::client_config(pinned)
            .map_err(|e| err(url, Exit::Environment, format!("cannot set up TLS: {e}")))?;
        tls.alpn_protocols.clear();
        Ok(Db {
            url: redact(url),
            ca_file: ca_file.map(Path::to_path_buf),
            cfg,
            tls: tokio_postgres_rustls::MakeRustlsConnect::new(tls),
        })
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Connects (TLS as the URL's `sslmode` says, verified against the web PKI and the CA file).
    pub fn connect(&self) -> Result<Client, StationError> {
        let res = if self.cfg.get_ssl_mode() == postgres::config::SslMode::Disable {
            self.cfg.connect(NoTls)
        } else {
            self.cfg.connect(self.tls.clone())
        };
        res.map_err(|e| self.classify(&e, "connect"))
    }

    /// Names the cause: credentials and trust are setup problems (exit 8), the rest I/O (5).
    pub(crate) fn classify(&self, e: &postgres::Error, what: &str) -> StationError {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            let (exit, hint) = if code.starts_with("28") {
                (
                    Exit::Environment,
                    "; check the role and its password (ledger_password_file, the `ledger-password` credential or SBCFLASH_LEDGER_PASSWORD)",
                )
            } else if code == "42501" {
                (
                    Exit::Environment,
                    "; the role may not change the schema: grant it CREATE on the database's schema, or let the owner run the station once",
                )
            } else if code.starts_with("3D") {
                (Exit::Environment, "; create the database first")
            } else {
                (Exit::Io, "")
            };
            return err(
                &self.url,
                exit,
                format!("{what}: {} (SQLSTATE {code}){hint}", db.message()),
            );
        }
        if let Some(t) = has_rustls_cause(e) {
            let host = self
                .cfg
                .get_hosts()
                .first()
                .map(|h| match h {
                    postgres::config::Host::Tcp(s) => s.clone(),
                    postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_default();
            let msg = crate::acquire::tls::explain(&t, &host, self.ca_file.as_deref())
                .replace("--ca-file", "ledger_ca_file / --ca-file");
            return err(&self.url, Exit::Environment, format!("{what}: TLS: {msg}"));
        }
        err(&self.url, Exit::Io, format!("{what}: {}", chain(e)))
    }
}

/// The password from the file, the systemd credential, or the environment (in that order).
fn password(file: Option<&Path>) -> Result<Option<String>, String> {
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
            .map_err(|e| format!("password file {}: {e}", p.display()))
    };
    if let Some(p) = file {
        return read(p).map(Some);
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let p = Path::new(&dir).join("ledger-password");
        if p.exists() {
            return read(&p).map(Some);
        }
    }
    Ok(std::env::var("SBCFLASH_LEDGER_PASSWORD").ok())
}

/// Brings the schema to this version, under an advisory lock so stations starting together
/// migrate once. A database newer than this sbcflash is refused.
pub fn migrate(db: &Db, c: &mut Client) -> Result<u32, StationError> {
    let want = MIGRATIONS.len() as i32;
    let mut tx = c.transaction().map_err(|e| db.classify(&e, "migrate"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(|e| db.classify(&e, "migrate"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS sbcflash_schema (
            version      INTEGER PRIMARY KEY,
            applied_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
            tool_version TEXT NOT NULL
        )",
    )
    .map_err(|e| db.classify(&e, "migration refused (creating the schema version table)"))?;
    let have: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM sbcflash_schema", &[])
        .and_then(|r| r.try_get(0))
        .map_err(|e| db.classify(&e, "read the schema version"))?;
    if have > want {
        return Err(err(
            &db.url,
            Exit::Environment,
            format!("schema version {have} is newer than this sbcflash understands ({want}); use a newer sbcflash"),
        ));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(have as usize) {
        let v = (i + 1) as i32;
        tx.batch_execute(step)
            .map_err(|e| db.classify(&e, &format!("migration refused (schema version {v})")))?;
        tx.execute(
            "INSERT INTO sbcflash_schema(version, tool_version) VALUES ($1, $2)",
            &[&v, &env!("CARGO_PKG_VERSION")],
        )
        .map_err(|e| db.classify(&e, "record the schema version"))?;
    }
    tx.commit().map_err(|e| db.classify(&e, "migrate"))?;
    Ok(want as u32)
}

/// A block of serials leased to one station.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    pub first: u64,
    pub(crate) last: u64,
}

/// Leases a block: a returned block first (its serials were never used), else `n` new ones
/// from the counter (which starts at `seq_start`). One transaction: a block is either leased
/// to exactly one station or not at all.
pub fn lease(
    db: &Db,
    c: &mut Client,
    station: &str,
    n: u64,
    seq_start: u64,
) -> Result<Lease, StationError> {
    let e = |e: postgres::Error| db.classify(&e, "lease serials");
    let mut tx = c.transaction().map_err(e)?;
    let back = tx
        .query_opt(
            "SELECT id, first, last FROM serial_leases WHERE state='returned'
             ORDER BY first LIMIT 1 FOR UPDATE SKIP LOCKED",
            &[],
        )
        .map_err(e)?;
    let l = if let Some(r) = back {
        let id: i64 = r.get(0);
        tx.execute(
            "UPDATE serial_leases SET state='leased', station=$2, leased_at=now(), ended_at=NULL
             WHERE id=$1",
            &[&id, &station],
        )
        .map_err(e)?;
        Lease {
            id,
            first: r.get::<_, i64>(1) as u64,
            last: r.get::<_, i64>(2) as u64,
        }
    } else {
        let n = n.max(1) as i64;
        let floor = seq_start as i64 - 1;
        tx.execute(
            "INSERT INTO counters(name, value) VALUES ('unit_seq', $1) ON CONFLICT (name) DO NOTHING",
            &[&floor],
        )
        .map_err(e)?;
        let top: i64 = tx
            .query_one(
                "UPDATE counters SET value = GREATEST(value, $1) + $2 WHERE name='unit_seq'
                 RETURNING value",
                &[&floor, &n],
            )
            .map_err(e)?
            .get(0);
        let first = top - n + 1;
        let id: i64 = tx
            .query_one(
                "INSERT INTO serial_leases(station, first, last, state) VALUES ($1,$2,$3,'leased')
                 RETURNING id",
                &[&station, &first, &top],
            )
            .map_err(e)?
            .get(0);
        Lease {
            id,
            first: first as u64,
            last: top as u64,
        }
    };
    tx.commit().map_err(e)?;
    Ok(l)
}

/// Ends a lease on a clean shutdown: serials before `next` are used, the rest go back for the
/// next lease. Only a lease this station still holds is changed.
pub(crate) fn return_lease(
    db: &Db,
    c: &mut Client,
    station: &str,
    lease: Lease,
    next: u64,
) -> Result<(), StationError> {
    let e = |e: postgres::Error| db.classify(&e, "return serials");
    let mut tx = c.transaction().map_err(e)?;
    let id = lease.id;
    if next <= lease.first {
        tx.execute(
            "UPDATE serial_leases SET state='returned', ended_at=now()
             WHERE id=$1 AND station=$2 AND state='leased'",
            &[&id, &station],
        )
        .map_err(e)?;
    } else {
        let used_last = (next - 1).min(lease.last) as i64;
        let n = tx
            .execute(
                "UPDATE serial_leases SET state='used', last=$3, ended_at=now()
                 WHERE id=$1 AND station=$2 AND state='leased'",
                &[&id, &station, &used_last],
            )
            .map_err(e)?;
        if n == 1 && next <= lease.last {
            tx.execute(
                "INSERT INTO serial_leases(station, first, last, state, ended_at)
                 VALUES ($1,$2,$3,'returned',now())",
                &[&station, &(next as i64), &(lease.last as i64)],
            )
            .map_err(e)?;
        }
    }
    tx.commit().map_err(e)
}

/// Marks the blocks a previous run of this station still held as abandoned (it died before
/// returning them): their serials are never handed out again.
pub(crate) fn abandon(db: &Db, c: &mut Client, station: &str) -> Result<u64, StationError> {
    c.execute(
        "UPDATE serial_leases SET state='abandoned', ended_at=now()
         WHERE station=$1 AND state='leased'",
        &[&station],
    )
    .map_err(|e| db.classify(&e, "abandon old leases"))
}

/// A station's heartbeat: when it was last alive and how many rows wait in its outbox.
pub(crate) fn heartbeat(
    db: &Db,
    c: &mut Client,
    station: &str,
    state: &str,
    backlog: u64,
    starting: bool,
) -> Result<(), StationError> {
    let host = super::identity::host_name();
    let pid = std::process::id() as i64;
    let sql = if starting {
        "INSERT INTO stations(name, host, pid, state, started_at, last_heartbeat, backlog, tool_version)
         VALUES ($1,$2,$3,$4,now(),now(),$5,$6)
         ON CONFLICT (name) DO UPDATE SET host=excluded.host, pid=excluded.pid, state=excluded.state,
           started_at=now(), last_heartbeat=now(), backlog=excluded.backlog,
           tool_version=excluded.tool_version"
    } else {
        "INSERT INTO stations(name, host, pid, state, started_at, last_heartbeat, backlog, tool_version)
         VALUES ($1,$2,$3,$4,now(),now(),$5,$6)
         ON CONFLICT (name) DO UPDATE SET state=excluded.state, last_heartbeat=now(),
           backlog=excluded.backlog"
    };
    c.execute(
        sql,
        &[
            &station,
            &host,
            &pid,
            &state,
            &(backlog as i64),
            &env!("CARGO_PKG_VERSION"),
        ],
    )
    .map_err(|e| db.classify(&e, "heartbeat"))?;
    Ok(())
}

/// One outbox row to deliver: the unit's row, its station-made id and revision.
#[derive(Debug, Clone)]
pub struct OutRow {
    pub(crate) uid: String,
    pub(crate) rev: i64,
    pub(crate) row: Row,
}

/// Upserts rows in one transaction. Idempotent: a row already there at the same or a newer
/// revision is left as it is, so a delivery repeated after a lost acknowledgement changes
/// nothing.
pub fn deliver(
    db: &Db,
    c: &mut Client,
    station: &str,
    rows: &[OutRow],
) -> Result<(), StationError> {
    let e = |e: postgres::Error| db.classify(&e, "deliver");
    let mut tx = c.transaction().map_err(e)?;
    let st = tx
        .prepare(
            "INSERT INTO units(uid, station, local_id, rev, unit_serial, attempt, slot, devnode,
               id_serial, id_path, diskseq, board, image, image_blake3, seq, hostname,
               identity_json, started_at, ended_at, bytes_written, bytes_skipped, throughput_bps,
               result, failure_reason, tool_version, station_host, station_pid, host_key,
               host_key_fingerprint, signature_key_id, readback_blake3, boot_result, boot_stage,
               boot_login_seconds, boot_transcript, boot_transcript_blake3, retried_ranges)
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21,
               $22,$23,$24,$25,$26,$27,$28,$29,$30,$31,$32,$33,$34,$35,$36,$37)
             ON CONFLICT (uid) DO UPDATE SET rev=excluded.rev, ended_at=excluded.ended_at,
               bytes_written=excluded.bytes_written, bytes_skipped=excluded.bytes_skipped,
               throughput_bps=excluded.throughput_bps, result=excluded.result,
               failure_reason=excluded.failure_reason, host_key=excluded.host_key,
               host_key_fingerprint=excluded.host_key_fingerprint,
               signature_key_id=excluded.signature_key_id,
               readback_blake3=excluded.readback_blake3, boot_result=excluded.boot_result,
               boot_stage=excluded.boot_stage, boot_login_seconds=excluded.boot_login_seconds,
               boot_transcript=excluded.boot_transcript,
               boot_transcript_blake3=excluded.boot_transcript_blake3,
               retried_ranges=excluded.retried_ranges
             WHERE units.rev < excluded.rev",
        )
        .map_err(e)?;
    for o in rows {
        let r = &o.row;
        tx.execute(
            &st,
            &[
                &o.uid,
                &station,
                &r.id,
                &o.rev,
                &r.unit_serial,
                &r.attempt,
                &r.slot,
                &r.devnode,
                &r.id_serial,
                &r.id_path,
                &r.diskseq,
                &r.board,
                &r.image,
                &r.image_blake3,
                &r.seq,
                &r.hostname,
                &r.identity_json,
                &r.started_at,
                &r.ended_at,
                &r.bytes_written,
                &r.bytes_skipped,
                &r.throughput_bps,
                &r.result,
                &r.failure_reason,
                &r.tool_version,
                &r.station_host,
                &r.station_pid,
                &r.host_key,
                &r.host_key_fingerprint,
                &r.signature_key_id,
                &r.readback_blake3,
                &r.boot_result,
                &r.boot_stage,
                &r.boot_login_seconds,
                &r.boot_transcript,
                &r.boot_transcript_blake3,
                &r.retried_ranges,
            ],
        )
        .map_err(e)?;
    }
    tx.commit().map_err(e)
}

/// A row of the line's report: the unit's row plus the station that made it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct LineRow {
    #[serde(flatten)]
    pub(crate) row: Row,
    pub(crate) station: String,
    pub(crate) uid: String,
}

/// CSV header of the line's report: the station ledger's columns, then these.
pub(crate) const LINE_COLUMNS: &[&str] = &["station", "uid"];

impl LineRow {
    pub(crate) fn csv_fields(&self) -> Vec<String> {
        let mut f = self.row.csv_fields();
        f.push(self.station.clone());
        f.push(self.uid.clone());
        f
    }
}

/// Rows started at or after `since`, of one station or all.
pub(crate) fn report(
    db: &Db,
    c: &mut Client,
    since: Option<&str>,
    station: Option<&str>,
) -> Result<Vec<LineRow>, StationError> {
    let sql = format!(
        "SELECT {}, station, uid FROM units WHERE started_at >= $1 AND ($2::TEXT IS NULL OR station = $2)
         ORDER BY id",
        COLUMNS.join(", ")
    );
    let rows = c
        .query(&sql, &[&since.unwrap_or(""), &station])
        .map_err(|e| db.classify(&e, "report"))?;
    rows.iter()
        .map(|r| {
            Ok(LineRow {
                row: Row {
                    id: r.try_get(0)?,
                    unit_serial: r.try_get(1)?,
                    attempt: r.try_get(2)?,
                    slot: r.try_get(3)?,
                    devnode: r.try_get(4)?,
                    id_serial: r.try_get(5)?,
                    id_path: r.try_get(6)?,
                    diskseq: r.try_get(7)?,
                    board: r.try_get(8)?,
                    image: r.try_get(9)?,
                    image_blake3: r.try_get(10)?,
                    seq: r.try_get(11)?,
                    hostname: r.try_get(12)?,
                    identity_json: r.try_get(13)?,
                    started_at: r.try_get(14)?,
                    ended_at: r.try_get(15)?,
                    bytes_written: r.try_get(16)?,
                    bytes_skipped: r.try_get(17)?,
                    throughput_bps: r.try_get(18)?,
                    result: r.try_get(19)?,
                    failure_reason: r.try_get(20)?,
                    tool_version: r.try_get(21)?,
                    station_host: r.try_get(22)?,
                    station_pid: r.try_get(23)?,
                    host_key: r.try_get(24)?,
                    host_key_fingerprint: r.try_get(25)?,
                    signature_key_id: r.try_get(26)?,
                    readback_blake3: r.try_get(27)?,
                    boot_result: r.try_get(28)?,
                    boot_stage: r.try_get(29)?,
                    boot_login_seconds: r.try_get(30)?,
                    boot_transcript: r.try_get(31)?,
                    boot_transcript_blake3: r.try_get(32)?,
                    retried_ranges: r.try_get(33)?,
                },
                station: r.try_get(34)?,
                uid: r.try_get(35)?,
            })
        })
        .collect::<Result<Vec<_>, postgres::Error>>()
        .map_err(|e| db.classify(&e, "report"))
}

/// One station in `station status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct StationStatus {
    pub(crate) station: String,
    pub(crate) host: Option<String>,
    pub(crate) state: String,
    pub(crate) last_heartbeat: String,
    /// Seconds since the last heartbeat (by the database's clock).
    pub(crate) heartbeat_age_secs: f64,
    pub(crate) units_today: i64,
    pub(crate) pass_today: i64,
    pub(crate) fail_today: i64,
    /// Rows waiting in the station's outbox at its last heartbeat.
    pub(crate) backlog: i64,
}

/// Every station's last heartbeat and today's counts (UTC day).
pub(crate) fn status(db: &Db, c: &mut Client) -> Result<Vec<StationStatus>, StationError> {
    let rows = c
        .query(
            "WITH today AS (
               SELECT station, COUNT(*) AS n,
                 COUNT(*) FILTER (WHERE result='pass') AS pass,
                 COUNT(*) FILTER (WHERE result IN ('fail','interrupted')) AS fail
               FROM units WHERE started_at >= to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD')
               GROUP BY station)
             SELECT s.name, s.host, s.state,
               to_char(s.last_heartbeat AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
               EXTRACT(EPOCH FROM now() - s.last_heartbeat)::DOUBLE PRECISION,
               COALESCE(t.n, 0), COALESCE(t.pass, 0), COALESCE(t.fail, 0), s.backlog
             FROM stations s LEFT JOIN today t ON t.station = s.name ORDER BY s.name",
            &[],
        )
        .map_err(|e| db.classify(&e, "status"))?;
    rows.iter()
        .map(|r| {
            Ok(StationStatus {
                station: r.try_get(0)?,
                host: r.try_get(1)?,
                state: r.try_get(2)?,
                last_heartbeat: r.try_get(3)?,
                heartbeat_age_secs: r.try_get(4)?,
                units_today: r.try_get(5)?,
                pass_today: r.try_get(6)?,
                fail_today: r.try_get(7)?,
                backlog: r.try_get(8)?,
            })
        })
        .collect::<Result<Vec<_>, postgres::Error>>()
        .map_err(|e| db.classify(&e, "status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_the_url_is_refused() {
        let e = Db::new("postgresql://u:secret@127.0.0.1/db", None, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("carries a password"), "{e}");
        assert!(!e.contains("secret"), "the password is never echoed: {e}");
    }

    #[test]
    fn urls() {
        assert!(is_url("postgresql://h/db"));
        assert!(is_url("postgres://h/db"));
        assert!(!is_url("/var/lib/sbcflash/ledger.sqlite"));
        assert_eq!(
            redact("postgresql://u:pw@h:5432/db?sslmode=require"),
            "postgresql://u:***@h:5432/db?sslmode=require"
        );
        assert_eq!(redact("postgresql://u@h/db"), "postgresql://u@h/db");
    }
}
