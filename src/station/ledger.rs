//! The ledger: one SQLite file (WAL) that is the station's only state.
//!
//! Every job inserts its row (and takes its serial number from the counter) in one transaction
//! before it touches the device, and updates the row when it ends, so a crash or power cut
//! leaves "started, never finished", never nothing, and a serial is never handed out twice.
//! The station holds an exclusive `flock` on the ledger file for its whole run, so a second
//! station on the same ledger refuses to start; readers (`station report`) need no lock.
//! Schema changes are numbered migrations recorded in `PRAGMA user_version`.

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::StationError;

/// Numbered schema steps; index + 1 is the version they lead to. Never edit a shipped step.
const MIGRATIONS: &[&str] = &[
    // 1: units and the serial counter.
    r#"
    CREATE TABLE units (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        unit_serial     TEXT NOT NULL,
        attempt         INTEGER NOT NULL,
        slot            TEXT NOT NULL,
        devnode         TEXT,
        id_serial       TEXT,
        id_path         TEXT,
        diskseq         TEXT,
        board           TEXT,
        image           TEXT,
        image_blake3    TEXT,
        seq             INTEGER,
        hostname        TEXT,
        identity_json   TEXT,
        started_at      TEXT NOT NULL,
        ended_at        TEXT,
        bytes_written   INTEGER,
        bytes_skipped   INTEGER,
        throughput_bps  REAL,
        result          TEXT NOT NULL CHECK (result IN ('started','pass','fail','interrupted')),
        failure_reason  TEXT,
        tool_version    TEXT NOT NULL,
        station_host    TEXT,
        station_pid     INTEGER
    );
    CREATE INDEX units_started ON units(started_at);
    CREATE INDEX units_serial ON units(unit_serial);
    CREATE TABLE counters (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    "#,
    // 2: the public half of a station-made SSH host key (never the private one).
    r#"
    ALTER TABLE units ADD COLUMN host_key TEXT;
    ALTER TABLE units ADD COLUMN host_key_fingerprint TEXT;
    "#,
    // 3: the digest chain (issue #16): who signed the image, and the image's blake3 as read
    // back from the unit (before its identity files were added).
    r#"
    ALTER TABLE units ADD COLUMN signature_key_id TEXT;
    ALTER TABLE units ADD COLUMN readback_blake3 TEXT;
    "#,
    // 4: boot acceptance (`[slot.boot]`): result, stage, time to login, console transcript.
    r#"
    ALTER TABLE units ADD COLUMN boot_result TEXT;
    ALTER TABLE units ADD COLUMN boot_stage TEXT;
    ALTER TABLE units ADD COLUMN boot_login_seconds REAL;
    ALTER TABLE units ADD COLUMN boot_transcript TEXT;
    ALTER TABLE units ADD COLUMN boot_transcript_blake3 TEXT;
    "#,
    // 5: the outbox for a central ledger: a unit id made here, a revision per change and the
    // revision delivered; the blocks of serials leased from the central ledger.
    r#"
    ALTER TABLE units ADD COLUMN uid TEXT;
    ALTER TABLE units ADD COLUMN rev INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE units ADD COLUMN delivered_rev INTEGER NOT NULL DEFAULT 0;
    UPDATE units SET uid = lower(hex(randomblob(16))) WHERE uid IS NULL;
    CREATE UNIQUE INDEX units_uid ON units(uid);
    CREATE INDEX units_undelivered ON units(id) WHERE rev > delivered_rev;
    CREATE TABLE serial_leases (
        id     INTEGER PRIMARY KEY,
        first  INTEGER NOT NULL,
        last   INTEGER NOT NULL,
        next   INTEGER NOT NULL,
        state  TEXT NOT NULL CHECK (state IN ('active','returned','abandoned'))
    );
    "#,
    // 6: ranges written again after reading back wrong (`rewrites`).
    r#"
    ALTER TABLE units ADD COLUMN retried_ranges INTEGER;
    "#,
];

/// Name of the serial counter row.
const SEQ: &str = "unit_seq";

/// What is known about a unit when its job starts.
#[derive(Debug, Clone, Default)]
pub struct NewUnit {
    pub slot: String,
    pub devnode: Option<String>,
    pub id_serial: Option<String>,
    pub id_path: Option<String>,
    pub diskseq: Option<String>,
    pub board: Option<String>,
    pub image: Option<String>,
    pub image_blake3: Option<String>,
    /// The key that signed the image, its manifest or its bmap (`minisign:ID`, `ssh:SHA256:…`,
    /// `openpgp:FINGERPRINT`).
    pub signature_key_id: Option<String>,
}

/// How a job ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub pass: bool,
    pub failure_reason: Option<String>,
    pub bytes_written: u64,
    pub bytes_skipped: u64,
    pub throughput_bps: Option<f64>,
    /// blake3 of the logical image as read back from the unit after the write.
    pub readback_blake3: Option<String>,
    /// Ranges written again after reading back wrong.
    pub retried_ranges: u64,
}

/// A ledger row, for reports.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    pub(crate) id: i64,
    pub unit_serial: String,
    pub(crate) attempt: i64,
    pub slot: String,
    pub devnode: Option<String>,
    pub(crate) id_serial: Option<String>,
    pub id_path: Option<String>,
    pub(crate) diskseq: Option<String>,
    pub(crate) board: Option<String>,
    pub(crate) image: Option<String>,
    pub(crate) image_blake3: Option<String>,
    pub(crate) seq: Option<i64>,
    pub(crate) hostname: Option<String>,
    pub(crate) identity_json: Option<String>,
    pub(crate) started_at: String,
    pub ended_at: Option<String>,
    pub(crate) bytes_written: Option<i64>,
    pub(crate) bytes_skipped: Option<i64>,
    pub(crate) throughput_bps: Option<f64>,
    pub result: String,
    pub failure_reason: Option<String>,
    pub(crate) tool_version: String,
    pub(crate) station_host: Option<String>,
    pub(crate) station_pid: Option<i64>,
    /// `ssh-ed25519 BASE64` of the unit's station-made host key.
    pub(crate) host_key: Option<String>,
    pub(crate) host_key_fingerprint: Option<String>,
    pub(crate) signature_key_id: Option<String>,
    pub(crate) readback_blake3: Option<String>,
    /// Boot acceptance: `pass`/`fail`, null when the slot has none.
    pub(crate) boot_result: Option<String>,
    pub(crate) boot_stage: Option<String>,
    pub(crate) boot_login_seconds: Option<f64>,
    pub(crate) boot_transcript: Option<String>,
    pub(crate) boot_transcript_blake3: Option<String>,
    pub(crate) retried_ranges: Option<i64>,
}

/// Column names in report order (CSV header).
pub(crate) const COLUMNS: &[&str] = &[
    "id",
    "unit_serial",
    "attempt",
    "slot",
    "devnode",
    "id_serial",
    "id_path",
    "diskseq",
    "board",
    "image",
    "image_blake3",
    "seq",
    "hostname",
    "identity_json",
    "started_at",
    "ended_at",
    "bytes_written",
    "bytes_skipped",
    "throughput_bps",
    "result",
    "failure_reason",
    "tool_version",
    "station_host",
    "station_pid",
    "host_key",
    "host_key_fingerprint",
    "signature_key_id",
    "readback_blake3",
    "boot_result",
    "boot_stage",
    "boot_login_seconds",
    "boot_transcript",
    "boot_transcript_blake3",
    "retried_ranges",
];

/// Asked for more serials when the leased ones ran out (the central ledger's lease).
pub(crate) type Refill = Box<dyn FnMut() -> Result<(), String> + Send>;

/// An open, locked ledger (the station's writer).
pub struct Ledger {
    path: PathBuf,
    conn: Connection,
    /// Serials come from leased blocks (a central ledger), not the local counter.
    leased: Option<Refill>,
    /// Holds the exclusive flock for as long as the ledger is open.
    _lock: nix::fcntl::Flock<File>,
}

fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> StationError + '_ {
    move |e| StationError::Ledger {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

fn station_host() -> Option<String> {
    super::identity::host_name()
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Ledger {
    /// Opens (creating if needed) and locks the ledger, migrates it, and marks rows left
    /// "started" by a previous run (which must have died: it no longer holds the lock) as
    /// interrupted. Returns the ledger and how many rows were marked.
    pub fn open(path: &Path) -> Result<(Ledger, usize), StationError> {
        let err = db_err(path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StationError::Ledger {
                path: path.display().to_string(),
                msg: format!("create directory {}: {e}", dir.display()),
            })?;
        }
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| StationError::Ledger {
                path: path.display().to_string(),
                msg: e.to_string(),
            })?;
        // SQLite locks with fcntl; flock is a separate lock on Linux, used only between
        // station processes.
        let lock = match crate::acquire::cache::try_flock(lock) {
            Ok(Some(l)) => l,
            Ok(None) => {
                return Err(StationError::LedgerBusy {
                    path: path.display().to_string(),
                })
            }
            Err(e) => {
                return Err(StationError::Ledger {
                    path: path.display().to_string(),
                    msg: format!("lock: {e}"),
                })
            }
        };
        let mut conn = Connection::open(path).map_err(&err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(&err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(&err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StationError::Ledger {
                path: path.display().to_string(),
                msg: format!("could not switch to WAL (journal_mode is {mode})"),
            });
        }
        // FULL: each committed row survives a power cut, not just a crash.
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
            .map_err(&err)?;
        migrate(&mut conn, path)?;
        let stale = conn
            .execute(
                "UPDATE units SET result='interrupted', rev=rev+1, failure_reason=
                   'station stopped before the job ended (crash, kill or power loss); the unit is not done'
                 WHERE result='started'",
                [],
            )
            .map_err(&err)?;
        Ok((
            Ledger {
                path: path.to_path_buf(),
                conn,
                leased: None,
                _lock: lock,
            },
            stale,
        ))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Takes serials from leased blocks from now on (a central ledger); `refill` leases
    /// another block when none is left.
    pub fn use_leased_serials(&mut self, refill: Refill) {
        self.leased = Some(refill);
    }

    /// Serials left in active leases.
    pub(crate) fn free_serials(&self) -> Result<u64, StationError> {
        super::outbox::free_serials(&self.conn).map_err(db_err(&self.path))
    }

    /// Records a unit that was not flashed (no name, no serial), as FAIL with the reason.
    fn record_unnamed(&self, unit: &NewUnit, reason: &str) -> Result<(), StationError> {
        self.conn
            .execute(
                "INSERT INTO units(unit_serial, attempt, slot, devnode, id_serial, id_path,
                   diskseq, board, image, image_blake3, started_at, ended_at, result,
                   failure_reason, tool_version, station_host, station_pid, uid)
                 VALUES ('-',1,?1,?2,?3,?4,?5,?6,?7,?8,?9,?9,'fail',?10,?11,?12,?13,
                   lower(hex(randomblob(16))))",
                params![
                    unit.slot,
                    unit.devnode,
                    unit.id_serial,
                    unit.id_path,
                    unit.diskseq,
                    unit.board,
                    unit.image,
                    unit.image_blake3,
                    now(),
                    reason,
                    env!("CARGO_PKG_VERSION"),
                    station_host(),
                    std::process::id() as i64,
                ],
            )
            .map_err(db_err(&self.path))?;
        Ok(())
    }

    /// The next counter value (without taking it), for `--dry-run`.
    #[cfg(test)] // only the unit tests use it
    pub(crate) fn peek_seq(&self, start: u64) -> Result<u64, StationError> {
        peek_seq(&self.conn, start).map_err(db_err(&self.path))
    }

    /// Starts a unit: takes the next counter value if `needs_seq`, lets `identity` derive the
    /// unit's (serial, hostname, identity JSON) from it, and inserts the row, all in one
    /// transaction. Returns the row id and whatever `identity` produced.
    pub fn start_unit<T>(
        &mut self,
        unit: &NewUnit,
        needs_seq: bool,
        seq_start: u64,
        identity: impl FnOnce(Option<u64>) -> Result<(String, String, String, T), String>,
    ) -> Result<Result<(i64, T), String>, StationError> {
        if needs_seq && self.leased.is_some() && self.free_serials()? == 0 {
            let refilled = match self.leased.as_mut() {
                Some(refill) => refill(),
                None => Ok(()),
            };
            if let Err(why) = refilled {
                let reason = format!(
                    "no serial number: none left from the central ledger's leases and none could be leased ({why}); the unit was not flashed"
                );
                self.record_unnamed(unit, &reason)?;
                return Ok(Err(reason));
            }
        }
        let err = db_err(&self.path);
        let leased = self.leased.is_some();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(&err)?;
        let seq = if needs_seq && leased {
            match super::outbox::take_serial(&tx).map_err(&err)? {
                Some(s) => Some(s),
                None => {
                    drop(tx);
                    let reason =
                        "no serial number: the leased serials ran out; the unit was not flashed"
                            .to_string();
                    self.record_unnamed(unit, &reason)?;
                    return Ok(Err(reason));
                }
            }
        } else if needs_seq {
            let next = peek_seq(&tx, seq_start).map_err(&err)?;
            tx.execute(
                "INSERT INTO counters(name, value) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                params![SEQ, next as i64],
            )
            .map_err(&err)?;
            Some(next)
        } else {
            None
        };
        let (serial, hostname, json, extra) = match identity(seq) {
            Ok(v) => v,
            Err(reason) => {
                // A unit that cannot be named is still recorded (as failed, with the reason);
                // the counter value is not consumed.
                drop(tx);
                self.record_unnamed(unit, &format!("identity: {reason}"))?;
                return Ok(Err(reason));
            }
        };
        let attempt: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM units WHERE unit_serial=?1",
                [&serial],
                |r| r.get(0),
            )
            .map_err(&err)?;
        tx.execute(
            "INSERT INTO units(unit_serial, attempt, slot, devnode, id_serial, id_path, diskseq,
               board, image, image_blake3, seq, hostname, identity_json, started_at, result,
               tool_version, station_host, station_pid, uid)
             VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,'started',?15,?16,?17,
               lower(hex(randomblob(16))))",
            params![
                serial,
                attempt + 1,
                unit.slot,
                unit.devnode,
                unit.id_serial,
                unit.id_path,
                unit.diskseq,
                unit.board,
                unit.image,
                unit.image_blake3,
                seq.map(|s| s as i64),
                hostname,
                json,
                now(),
                env!("CARGO_PKG_VERSION"),
                station_host(),
                std::process::id() as i64,
            ],
        )
        .map_err(&err)?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "UPDATE units SET signature_key_id=?2 WHERE id=?1",
            params![id, unit.signature_key_id],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(Ok((id, extra)))
    }

    /// Records the public half of the unit's station-made host key, before the key goes to
    /// the unit (a row without it never had one written).
    pub(crate) fn record_host_key(
        &mut self,
        id: i64,
        public: &str,
        fingerprint: &str,
    ) -> Result<(), StationError> {
        self.conn
            .execute(
                "UPDATE units SET host_key=?2, host_key_fingerprint=?3, rev=rev+1 WHERE id=?1",
                params![id, public, fingerprint],
            )
            .map_err(db_err(&self.path))?;
        Ok(())
    }

    /// Rows not yet delivered to the central ledger (0 without one).
    pub(crate) fn backlog(&self) -> rusqlite::Result<u64> {
        super::outbox::backlog(&self.conn)
    }

    /// Records how a unit's job ended.
    pub fn finish_unit(&mut self, id: i64, o: &Outcome) -> Result<(), StationError> {
        self.conn
            .execute(
                "UPDATE units SET ended_at=?2, result=?3, failure_reason=?4, bytes_written=?5,
                   bytes_skipped=?6, throughput_bps=?7, retried_ranges=?8,
                   readback_blake3=COALESCE(?9, readback_blake3), rev=rev+1 WHERE id=?1",
                params![
                    id,
                    now(),
                    if o.pass { "pass" } else { "fail" },
                    o.failure_reason,
                    o.bytes_written as i64,
                    o.bytes_skipped as i64,
                    o.throughput_bps,
                    o.retried_ranges as i64,
                    o.readback_blake3,
                ],
            )
            .map_err(db_err(&self.path))?;
        Ok(())
    }

    /// Records a unit's boot acceptance (before [`Ledger::finish_unit`]).
    pub(crate) fn record_boot(
        &mut self,
        id: i64,
        b: &super::boot::BootRecord,
    ) -> Result<(), StationError> {
        self.conn
            .execute(
                "UPDATE units SET boot_result=?2, boot_stage=?3, boot_login_seconds=?4,
                   boot_transcript=?5, boot_transcript_blake3=?6, rev=rev+1 WHERE id=?1",
                params![
                    id,
                    if b.pass { "pass" } else { "fail" },
                    b.stage,
                    b.login_seconds,
                    b.transcript.display().to_string(),
                    b.transcript_blake3,
                ],
            )
            .map_err(db_err(&self.path))?;
        Ok(())
    }
}

fn peek_seq(conn: &Connection, start: u64) -> rusqlite::Result<u64> {
    let cur: Option<i64> = conn
        .query_row("SELECT value FROM counters WHERE name=?1", [SEQ], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(match cur {
        Some(v) => (v as u64 + 1).max(start),
        None => start,
    })
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StationError> {
    let err = db_err(path);
    let have: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(&err)?;
    let want = MIGRATIONS.len() as i64;
    if have > want {
        return Err(StationError::Ledger {
            path: path.display().to_string(),
            msg: format!(
                "schema version {have} is newer than this sbcflash understands ({want}); use a newer sbcflash"
            ),
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(have as usize) {
        let tx = conn.transaction().map_err(&err)?;
        tx.execute_batch(step).map_err(&err)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .map_err(&err)?;
        tx.commit().map_err(&err)?;
    }
    Ok(())
}

/// Reads rows started at or after `since` (RFC 3339 or YYYY-MM-DD), without locking: the
/// station may be running.
pub fn report(path: &Path, since: Option<&str>) -> Result<Vec<Row>, StationError> {
    let err = db_err(path);
    if !path.exists() {
        return Err(StationError::Ledger {
            path: path.display().to_string(),
            msg: "no such ledger".into(),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(&err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(&err)?;
    let sql = format!(
        "SELECT {} FROM units WHERE started_at >= ?1 ORDER BY id",
        COLUMNS.join(", ")
    );
    let mut st = conn.prepare(&sql).map_err(&err)?;
    let rows = st
        .query_map([since.unwrap_or("")], row_from)
        .map_err(&err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(&err)?;
    Ok(rows)
}

/// A `units` row selected as [`COLUMNS`] (first), as a report row.
pub(super) fn row_from(r: &rusqlite::Row) -> rusqlite::Result<Row> {
    Ok(Row {
        id: r.get(0)?,
        unit_serial: r.get(1)?,
        attempt: r.get(2)?,
        slot: r.get(3)?,
        devnode: r.get(4)?,
        id_serial: r.get(5)?,
        id_path: r.get(6)?,
        diskseq: r.get(7)?,
        board: r.get(8)?,
        image: r.get(9)?,
        image_blake3: r.get(10)?,
        seq: r.get(11)?,
        hostname: r.get(12)?,
        identity_json: r.get(13)?,
        started_at: r.get(14)?,
        ended_at: r.get(15)?,
        bytes_written: r.get(16)?,
        bytes_skipped: r.get(17)?,
        throughput_bps: r.get(18)?,
        result: r.get(19)?,
        failure_reason: r.get(20)?,
        tool_version: r.get(21)?,
        station_host: r.get(22)?,
        station_pid: r.get(23)?,
        host_key: r.get(24)?,
        host_key_fingerprint: r.get(25)?,
        signature_key_id: r.get(26)?,
        readback_blake3: r.get(27)?,
        boot_result: r.get(28)?,
        boot_stage: r.get(29)?,
        boot_login_seconds: r.get(30)?,
        boot_transcript: r.get(31)?,
        boot_transcript_blake3: r.get(32)?,
        retried_ranges: r.get(33)?,
    })
}

/// The next serial counter value, read without locking (for `--dry-run`).
pub(crate) fn peek_seq_readonly(path: &Path, start: u64) -> Result<u64, StationError> {
    if !path.exists() {
        return Ok(start);
    }
    let err = db_err(path);
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(&err)?;
    let has: bool = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name='counters'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )
        .map_err(&err)?;
    if !has {
        return Ok(start);
    }
    peek_seq(&conn, start).map_err(&err)
}

impl Row {
    /// The row as CSV fields in [`COLUMNS`] order.
    pub(crate) fn csv_fields(&self) -> Vec<String> {
        let o = |v: &Option<String>| v.clone().unwrap_or_default();
        let i = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
        vec![
            self.id.to_string(),
            self.unit_serial.clone(),
            self.attempt.to_string(),
            self.slot.clone(),
            o(&self.devnode),
            o(&self.id_serial),
            o(&self.id_path),
            o(&self.diskseq),
            o(&self.board),
            o(&self.image),
            o(&self.image_blake3),
            i(self.seq),
            o(&self.hostname),
            o(&self.identity_json),
            self.started_at.clone(),
            o(&self.ended_at),
            i(self.bytes_written),
            i(self.bytes_skipped),
            self.throughput_bps
                .map(|v| format!("{v:.0}"))
                .unwrap_or_default(),
            self.result.clone(),
            o(&self.failure_reason),
            self.tool_version.clone(),
            o(&self.station_host),
            i(self.station_pid),
            o(&self.host_key),
            o(&self.host_key_fingerprint),
            o(&self.signature_key_id),
            o(&self.readback_blake3),
            o(&self.boot_result),
            o(&self.boot_stage),
            self.boot_login_seconds
                .map(|v| format!("{v:.2}"))
                .unwrap_or_default(),
            o(&self.boot_transcript),
            o(&self.boot_transcript_blake3),
            i(self.retried_ranges),
        ]
    }
}

/// `known_hosts` lines for the units that passed with a station-made host key: the latest
/// such row per hostname, the serial as the comment.
pub(crate) fn known_hosts(rows: &[Row]) -> Vec<String> {
    let mut latest: std::collections::BTreeMap<&str, &Row> = std::collections::BTreeMap::new();
    for r in rows.iter().filter(|r| r.result == "pass") {
        if let (Some(h), Some(_)) = (&r.hostname, &r.host_key) {
            latest.insert(h.as_str(), r);
        }
    }
    let mut v: Vec<&Row> = latest.into_values().collect();
    v.sort_by_key(|r| r.id);
    v.iter()
        .filter_map(|r| {
            Some(format!(
                "{} {} {}",
                r.hostname.as_deref()?,
                r.host_key.as_deref()?,
                r.unit_serial
            ))
        })
        .collect()
}

/// RFC 4180 quoting: fields with a comma, quote or line break are quoted, quotes doubled.
pub(crate) fn csv_line(fields: &[String]) -> String {
    fields
        .iter()
        .map(|f| {
            if f.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                f.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(slot: &str) -> NewUnit {
        NewUnit {
            slot: slot.into(),
            ..Default::default()
        }
    }

    /// A ledger at schema 1 (the first migration only) in `dir` with one finished row,
    /// serial `OLD-1`, as an older sbcflash left it.
    fn schema_1_ledger(dir: &Path) -> PathBuf {
        let p = dir.join("l.sqlite");
        let c = Connection::open(&p).unwrap();
        c.execute_batch(MIGRATIONS[0]).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        c.execute(
            "INSERT INTO units(unit_serial, attempt, slot, started_at, result, tool_version)
             VALUES ('OLD-1', 1, 's1', '2026-01-01T00:00:00Z', 'pass', '0.1')",
            [],
        )
        .unwrap();
        p
    }

    fn start(l: &mut Ledger, slot: &str) -> (i64, u64) {
        l.start_unit(&unit(slot), true, 100, |seq| {
            let s = seq.unwrap();
            Ok((format!("U{s}"), format!("u{s}"), "{}".into(), s))
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn host_keys_are_recorded_and_exported_for_passed_units() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.sqlite");
        let (mut l, _) = Ledger::open(&p).unwrap();
        let pass = Outcome {
            pass: true,
            ..Default::default()
        };
        let (a, _) = start(&mut l, "s1");
        l.record_host_key(a, "ssh-ed25519 AAAAold", "SHA256:old")
            .unwrap();
        l.finish_unit(a, &pass).unwrap();
        let (b, _) = start(&mut l, "s2");
        l.record_host_key(b, "ssh-ed25519 AAAAfail", "SHA256:fail")
            .unwrap();
        l.finish_unit(b, &Outcome::default()).unwrap();
        let (c, _) = start(&mut l, "s3");
        l.finish_unit(c, &pass).unwrap();
        let rows = report(&p, None).unwrap();
        assert_eq!(rows[0].host_key_fingerprint.as_deref(), Some("SHA256:old"));
        assert_eq!(rows[2].host_key, None);
        assert_eq!(rows[0].csv_fields().len(), COLUMNS.len());
        // failed units and units without a key are not exported
        assert_eq!(known_hosts(&rows), vec!["u100 ssh-ed25519 AAAAold U100"]);
    }

    #[test]
    fn a_version_1_ledger_gains_the_host_key_columns_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = schema_1_ledger(dir.path());
        let (mut l, _) = Ledger::open(&p).unwrap();
        l.record_host_key(1, "ssh-ed25519 AAAAx", "SHA256:x")
            .unwrap();
        let rows = report(&p, None).unwrap();
        assert_eq!(rows[0].unit_serial, "OLD-1");
        assert_eq!(rows[0].host_key.as_deref(), Some("ssh-ed25519 AAAAx"));
    }

    #[test]
    fn rows_counter_lock_and_crash_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.sqlite");
        let (mut l, stale) = Ledger::open(&p).unwrap();
        assert_eq!(stale, 0);
        let (a, sa) = start(&mut l, "s1");
        let (_b, sb) = start(&mut l, "s2");
        assert_eq!((sa, sb), (100, 101));
        l.finish_unit(
            a,
            &Outcome {
                pass: true,
                bytes_written: 10,
                ..Default::default()
            },
        )
        .unwrap();
        // A second station on the same ledger is refused while the first holds it.
        assert!(matches!(
            Ledger::open(&p),
            Err(StationError::LedgerBusy { .. })
        ));
        // Reports work while the station holds the lock.
        let rows = report(&p, None).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].result, "pass");
        assert_eq!(rows[1].result, "started");
        drop(l); // as if the process died: the lock goes with it
        let (mut l, stale) = Ledger::open(&p).unwrap();
        assert_eq!(stale, 1);
        let rows = report(&p, None).unwrap();
        assert_eq!(rows[1].result, "interrupted");
        assert!(rows[1].ended_at.is_none());
        let (_, sc) = start(&mut l, "s1");
        assert_eq!(sc, 102, "counter never repeats");
        assert_eq!(peek_seq_readonly(&p, 1).unwrap(), 103);
    }

    /// A ledger from before `retried_ranges` (schema 1, one finished row) gains the column:
    /// the old row reads null, a new row records its rewritten ranges.
    #[test]
    fn schema_1_ledger_gains_retried_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let p = schema_1_ledger(dir.path());
        let (mut l, _) = Ledger::open(&p).unwrap();
        let (id, _) = start(&mut l, "s");
        l.finish_unit(
            id,
            &Outcome {
                pass: true,
                retried_ranges: 2,
                ..Default::default()
            },
        )
        .unwrap();
        let rows = report(&p, None).unwrap();
        assert_eq!(rows[0].retried_ranges, None);
        assert_eq!(rows[1].retried_ranges, Some(2));
        assert_eq!(rows[1].csv_fields().last().map(String::as_str), Some("2"));
    }

    #[test]
    fn failed_identity_is_recorded_without_using_the_counter() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.sqlite");
        let (mut l, _) = Ledger::open(&p).unwrap();
        let r = l
            .start_unit(&unit("s"), true, 1, |_| {
                Err::<(String, String, String, ()), _>("no card serial".into())
            })
            .unwrap();
        assert!(r.is_err());
        let rows = report(&p, None).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].result, "fail");
        assert!(rows[0]
            .failure_reason
            .as_deref()
            .unwrap()
            .contains("no card serial"));
        assert_eq!(l.peek_seq(1).unwrap(), 1);
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(
            csv_line(&["a".into(), "b,c".into(), "d\"e".into()]),
            "a,\"b,c\",\"d\"\"e\""
        );
    }
}
