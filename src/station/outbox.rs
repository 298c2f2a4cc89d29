//! The station's SQLite ledger seen as the outbox of a central ledger: rows not yet delivered
//! (their revision is newer than the one delivered), and the serial blocks leased from the
//! central ledger with the next serial of each.
//!
//! A serial is taken in the same SQLite transaction that inserts the unit's row, so a crash
//! can neither lose a row nor hand a serial out twice.

use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;

use super::central::{Lease, OutRow};
use super::ledger::{row_from, COLUMNS};

/// A second connection to the station's ledger (the courier's; the jobs use the [`Ledger`]'s).
///
/// [`Ledger`]: super::ledger::Ledger
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(std::time::Duration::from_secs(10))?;
    c.execute_batch("PRAGMA synchronous=FULL;")?;
    Ok(c)
}

pub(crate) fn free_serials(c: &Connection) -> rusqlite::Result<u64> {
    c.query_row(
        "SELECT COALESCE(SUM(last - next + 1), 0) FROM serial_leases
         WHERE state='active' AND next <= last",
        [],
        |r| r.get::<_, i64>(0).map(|n| n as u64),
    )
}

/// The next leased serial (oldest block first), taken; None when every block is used up.
pub(crate) fn take_serial(c: &Connection) -> rusqlite::Result<Option<u64>> {
    let next: Option<(i64, i64)> = c
        .query_row(
            "SELECT id, next FROM serial_leases WHERE state='active' AND next <= last
             ORDER BY first LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((id, seq)) = next else {
        return Ok(None);
    };
    c.execute("UPDATE serial_leases SET next = next + 1 WHERE id=?1", [id])?;
    Ok(Some(seq as u64))
}

/// Records a block just leased from the central ledger.
pub fn add_lease(c: &Connection, l: Lease) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO serial_leases(id, first, last, next, state) VALUES (?1,?2,?3,?2,'active')",
        params![l.id, l.first as i64, l.last as i64],
    )?;
    Ok(())
}

/// Active blocks and the next unused serial of each.
pub(crate) fn active_leases(c: &Connection) -> rusqlite::Result<Vec<(Lease, u64)>> {
    let mut st = c.prepare(
        "SELECT id, first, last, next FROM serial_leases WHERE state='active' ORDER BY first",
    )?;
    let v = st
        .query_map([], |r| {
            Ok((
                Lease {
                    id: r.get(0)?,
                    first: r.get::<_, i64>(1)? as u64,
                    last: r.get::<_, i64>(2)? as u64,
                },
                r.get::<_, i64>(3)? as u64,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(v)
}

pub(crate) fn set_lease_state(c: &Connection, id: i64, state: &str) -> rusqlite::Result<()> {
    c.execute(
        "UPDATE serial_leases SET state=?2 WHERE id=?1",
        params![id, state],
    )?;
    Ok(())
}

/// Blocks a previous run still held (it stopped without returning them): never used again.
pub(crate) fn abandon_all(c: &Connection) -> rusqlite::Result<usize> {
    c.execute(
        "UPDATE serial_leases SET state='abandoned' WHERE state='active'",
        [],
    )
}

/// Rows whose newest revision is not delivered yet.
pub(crate) fn backlog(c: &Connection) -> rusqlite::Result<u64> {
    c.query_row(
        "SELECT COUNT(*) FROM units WHERE rev > delivered_rev",
        [],
        |r| r.get::<_, i64>(0).map(|n| n as u64),
    )
}

/// Up to `limit` undelivered rows, oldest first.
pub fn pending(c: &Connection, limit: usize) -> rusqlite::Result<Vec<OutRow>> {
    let sql = format!(
        "SELECT {}, uid, rev FROM units WHERE rev > delivered_rev ORDER BY id LIMIT ?1",
        COLUMNS.join(", ")
    );
    let n = COLUMNS.len();
    let mut st = c.prepare(&sql)?;
    let v = st
        .query_map([limit as i64], |r| {
            Ok(OutRow {
                row: row_from(r)?,
                uid: r.get(n)?,
                rev: r.get(n + 1)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(v)
}

/// Marks the revisions just delivered (a row changed since keeps its newer revision pending).
pub fn mark_delivered(c: &mut Connection, rows: &[OutRow]) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    {
        let mut st =
            tx.prepare("UPDATE units SET delivered_rev = MAX(delivered_rev, ?2) WHERE id=?1")?;
        for o in rows {
            st.execute(params![o.row.id, o.rev])?;
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::super::ledger::{Ledger, NewUnit, Outcome};
    use super::*;

    fn start(l: &mut Ledger) -> Result<(i64, u64), String> {
        let unit = NewUnit {
            slot: "s1".into(),
            ..Default::default()
        };
        l.start_unit(&unit, true, 1, |seq| {
            let s = seq.unwrap();
            Ok((format!("U{s}"), format!("u{s}"), "{}".into(), s))
        })
        .unwrap()
    }

    /// Serials come from the leased blocks in order, a refill is asked for when none is left,
    /// and a unit that gets none is recorded as FAIL without a serial; every change is a new
    /// revision to deliver, and a delivered revision is not pending again.
    #[test]
    fn leased_serials_refill_and_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("outbox.sqlite");
        let (mut l, _) = Ledger::open(&p).unwrap();
        let c = open(&p).unwrap();
        add_lease(
            &c,
            Lease {
                id: 7,
                first: 41,
                last: 42,
            },
        )
        .unwrap();
        let refills = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (p2, n) = (p.clone(), refills.clone());
        l.use_leased_serials(Box::new(move || {
            let k = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if k > 0 {
                return Err("database unreachable".into());
            }
            add_lease(
                &open(&p2).unwrap(),
                Lease {
                    id: 9,
                    first: 81,
                    last: 81,
                },
            )
            .map_err(|e| e.to_string())
        }));
        let (a, sa) = start(&mut l).unwrap();
        let (_, sb) = start(&mut l).unwrap();
        assert_eq!((sa, sb), (41, 42));
        assert_eq!(free_serials(&c).unwrap(), 0);
        let (_, sc) = start(&mut l).unwrap();
        assert_eq!(sc, 81, "refilled from the new block");
        let e = start(&mut l).unwrap_err();
        assert!(
            e.contains("no serial number") && e.contains("database unreachable"),
            "{e}"
        );
        assert_eq!(refills.load(std::sync::atomic::Ordering::Relaxed), 2);

        let mut c = open(&p).unwrap();
        let rows = pending(&c, 100).unwrap();
        assert_eq!(rows.len(), 4);
        assert!(rows.iter().all(|r| r.uid.len() == 32));
        assert_eq!(rows[3].row.result, "fail");
        assert_eq!(rows[3].row.unit_serial, "-");
        mark_delivered(&mut c, &rows).unwrap();
        assert_eq!(backlog(&c).unwrap(), 0);
        l.finish_unit(
            a,
            &Outcome {
                pass: true,
                ..Default::default()
            },
        )
        .unwrap();
        let again = pending(&c, 100).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].row.id, again[0].rev), (a, 2));
        assert_eq!(active_leases(&c).unwrap().len(), 2);
        assert_eq!(abandon_all(&c).unwrap(), 2);
        assert!(active_leases(&c).unwrap().is_empty());
    }
}
