//! Carries the outbox to the central ledger: a thread that delivers undelivered rows, keeps
//! the station's serial leases topped up and sends heartbeats, and rides through database
//! outages (the jobs never wait for it; they flash on leased serials while it retries).

use crossbeam_channel::{Receiver, Sender};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::central::{self, CentralConfig, Db};
use super::ledger::Refill;
use super::{outbox, ui::Ui, StationError};
use crate::progress::Level;

/// Rows per delivery transaction.
const BATCH: usize = 500;
/// How often the courier looks at the outbox when nothing wakes it.
const TICK: Duration = Duration::from_secs(1);

fn local_err(path: &Path) -> impl Fn(rusqlite::Error) -> StationError + '_ {
    move |e| StationError::Ledger {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

/// The running courier.
pub(crate) struct Courier {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    wake: Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    db: Db,
    cfg: CentralConfig,
    outbox: PathBuf,
    seq_start: u64,
    needs_seq: bool,
    ui: Arc<Ui>,
}

/// What the start found.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Started {
    pub(crate) schema_version: u32,
    /// Serial blocks a previous run held (crash): abandoned, never reused.
    pub(crate) abandoned: u64,
    /// Rows delivered from the outbox at start.
    pub(crate) delivered: u64,
}

impl Courier {
    /// Connects, migrates, abandons the leases a previous run left, leases the first block and
    /// delivers the outbox. Any failure here stops the station before it flashes anything:
    /// the database must be there at start (it may go away later).
    pub(crate) fn start(
        cfg: &CentralConfig,
        outbox_path: &Path,
        seq_start: u64,
        needs_seq: bool,
        ui: Arc<Ui>,
    ) -> Result<(Courier, Started), StationError> {
        let db = Db::new(
            &cfg.url,
            cfg.ca_file.as_deref(),
            cfg.password_file.as_deref(),
        )?;
        let mut c = db.connect()?;
        let schema_version = central::migrate(&db, &mut c)?;
        let le = local_err(outbox_path);
        let mut local = outbox::open(outbox_path).map_err(&le)?;
        // Central first: if it fails, the local blocks stay active and are abandoned next time.
        let abandoned = central::abandon(&db, &mut c, &cfg.station)?;
        outbox::abandon_all(&local).map_err(&le)?;
        let shared = Arc::new(Shared {
            db,
            cfg: cfg.clone(),
            outbox: outbox_path.to_path_buf(),
            seq_start,
            needs_seq,
            ui,
        });
        let backlog = outbox::backlog(&local).map_err(&le)?;
        central::heartbeat(&shared.db, &mut c, &cfg.station, "running", backlog, true)?;
        let delivered = shared.deliver_all(&mut c, &mut local)?;
        if needs_seq {
            shared.top_up(&mut c, &local)?;
        }
        shared.beat(&mut c, &local)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (wake, rx) = crossbeam_channel::bounded(1);
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("courier".into())
                .spawn(move || shared.run(Some(c), local, &stop, rx))
                .map_err(|e| StationError::Environment(format!("start the courier thread: {e}")))?
        };
        Ok((
            Courier {
                shared,
                stop,
                wake,
                thread: Some(thread),
            },
            Started {
                schema_version,
                abandoned,
                delivered,
            },
        ))
    }

    /// For [`super::ledger::Ledger::use_leased_serials`]: leases a block at once (its own
    /// connection) when a job finds none left.
    pub(crate) fn refill(&self) -> Refill {
        let shared = self.shared.clone();
        Box::new(move || {
            let le = local_err(&shared.outbox);
            let mut c = shared.db.connect().map_err(|e| e.to_string())?;
            let local = outbox::open(&shared.outbox)
                .map_err(&le)
                .map_err(|e| e.to_string())?;
            shared.lease_one(&mut c, &local).map_err(|e| e.to_string())
        })
    }

    /// A clean stop: the last rows delivered, unused serials returned, heartbeat `stopped`.
    /// Returns the rows left in the outbox (the database is away): delivered on the next start.
    pub(crate) fn shutdown(mut self) -> Result<u64, StationError> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.try_send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let s = &self.shared;
        let le = local_err(&s.outbox);
        let mut local = outbox::open(&s.outbox).map_err(&le)?;
        let mut c = s.db.connect()?;
        s.deliver_all(&mut c, &mut local)?;
        for (lease, next) in outbox::active_leases(&local).map_err(&le)? {
            central::return_lease(&s.db, &mut c, &s.cfg.station, lease, next)?;
            outbox::set_lease_state(&local, lease.id, "returned").map_err(&le)?;
        }
        let left = outbox::backlog(&local).map_err(&le)?;
        central::heartbeat(&s.db, &mut c, &s.cfg.station, "stopped", left, false)?;
        Ok(left)
    }
}

impl Drop for Courier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.try_send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn run(
        &self,
        mut client: Option<postgres::Client>,
        mut local: rusqlite::Connection,
        stop: &AtomicBool,
        wake: Receiver<()>,
    ) {
        let mut down_said = false;
        while !stop.load(Ordering::Relaxed) {
            let _ = wake.recv_timeout(TICK);
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let c = match client.as_mut() {
                Some(c) => c,
                None => match self.db.connect() {
                    Ok(c) => {
                        if down_said {
                            self.ui.say(
                                Level::Info,
                                format!("central ledger {} reachable again", self.db.url()),
                            );
                            down_said = false;
                        }
                        client.insert(c)
                    }
                    Err(e) => {
                        if !down_said {
                            self.ui.say(
                                Level::Warn,
                                format!("{e}; flashing goes on with leased serials, rows wait in the outbox"),
                            );
                            down_said = true;
                        }
                        let n = outbox::backlog(&local).unwrap_or(0);
                        self.ui.set_backlog(n, false);
                        continue;
                    }
                },
            };
            let round = self.deliver_all(c, &mut local).and_then(|_| {
                if self.needs_seq {
                    self.top_up(c, &local)?;
                }
                self.beat(c, &local)
            });
            if let Err(e) = round {
                tracing::warn!("central ledger: {e}");
                client = None;
                let n = outbox::backlog(&local).unwrap_or(0);
                self.ui.set_backlog(n, false);
            }
        }
    }

    fn beat(
        &self,
        c: &mut postgres::Client,
        local: &rusqlite::Connection,
    ) -> Result<(), StationError> {
        let n = outbox::backlog(local).map_err(local_err(&self.outbox))?;
        central::heartbeat(&self.db, c, &self.cfg.station, "running", n, false)?;
        self.ui.set_backlog(n, true);
        Ok(())
    }

    fn lease_one(
        &self,
        c: &mut postgres::Client,
        local: &rusqlite::Connection,
    ) -> Result<(), StationError> {
        let l = central::lease(
            &self.db,
            c,
            &self.cfg.station,
            self.cfg.serial_lease,
            self.seq_start,
        )?;
        // A crash between the two commits leaves the block leased centrally and unknown here:
        // abandoned at the next start, never used twice.
        outbox::add_lease(local, l).map_err(local_err(&self.outbox))
    }

    fn top_up(
        &self,
        c: &mut postgres::Client,
        local: &rusqlite::Connection,
    ) -> Result<(), StationError> {
        let free = outbox::free_serials(local).map_err(local_err(&self.outbox))?;
        if free < self.cfg.serial_lease.div_ceil(2) {
            self.lease_one(c, local)?;
        }
        Ok(())
    }

    /// Delivers until the outbox is empty; returns the rows delivered.
    fn deliver_all(
        &self,
        c: &mut postgres::Client,
        local: &mut rusqlite::Connection,
    ) -> Result<u64, StationError> {
        let le = local_err(&self.outbox);
        let mut n = 0;
        loop {
            let rows = outbox::pending(local, BATCH).map_err(&le)?;
            if rows.is_empty() {
                return Ok(n);
            }
            central::deliver(&self.db, c, &self.cfg.station, &rows)?;
            outbox::mark_delivered(local, &rows).map_err(&le)?;
            n += rows.len() as u64;
        }
    }
}
