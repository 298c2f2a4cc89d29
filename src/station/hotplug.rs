//! Hotplug: udev events on the `block` and `usb` subsystems turned into "a new medium is in
//! slot S" and "the medium in slot S went away".
//!
//! The decision logic ([`Tracker`]) is sans-IO and unit-tested; [`Monitor`] is the thin udev
//! layer. A card reader's disk exists without a card (size 0) and a loop device exists without
//! a backing file, so "inserted" means: a whole disk in a slot with a medium (size > 0) whose
//! medium key (DISKSEQ) has not been seen before; "removed" means a `remove` event, size 0, a
//! new medium, or the device no longer matching its slot.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use super::slots::{slot_of, DeviceInfo, SlotMatcher};
use super::StationError;

/// What udev said happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Add,
    Change,
    Remove,
    /// Found by enumeration when the station started.
    Present,
}

impl Action {
    fn from_udev(s: &str) -> Option<Action> {
        match s {
            "add" => Some(Action::Add),
            "change" | "bind" | "move" | "online" => Some(Action::Change),
            "remove" | "unbind" | "offline" => Some(Action::Remove),
            _ => None,
        }
    }
}

/// What the station should do about an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Flash this medium on this slot.
    Start { slot: String, dev: DeviceInfo },
    /// Present when the station started and `--flash-present` was not given: listed, left
    /// alone until it is replaced.
    LeftAlone { slot: String, dev: DeviceInfo },
    /// The slot's medium went away; cancel its job if one runs.
    Removed {
        slot: String,
        devnode: String,
        reason: String,
        /// BUSNUM/DEVNUM of a removed USB device (a board re-enumerating on purpose is told
        /// apart from an unplug by it); None for block devices.
        usb_address: Option<(u8, u8)>,
    },
    /// A device the station refuses to touch, and why (said once per medium).
    Refused { msg: String },
}

struct Active {
    syspath: String,
    key: String,
}

/// Sans-IO slot state: which medium each slot holds and which media were already handled.
pub(crate) struct Tracker {
    slots: Vec<SlotMatcher>,
    active: BTreeMap<String, Active>,
    seen: HashSet<String>,
}

impl Tracker {
    pub(crate) fn new(slots: Vec<SlotMatcher>) -> Self {
        Tracker {
            slots,
            active: BTreeMap::new(),
            seen: HashSet::new(),
        }
    }

    /// Feeds one event. `flash_present` decides what happens to media found at start.
    pub(crate) fn on_event(
        &mut self,
        action: Action,
        dev: &DeviceInfo,
        flash_present: bool,
    ) -> Vec<Decision> {
        let mut out = Vec::new();
        let is_disk = dev.subsystem == "block" && dev.devtype.as_deref() == Some("disk");
        let is_usb = dev.is_usb_device();
        // A USB device is "present" while it is in a recovery mode the station can flash.
        let present = action != Action::Remove
            && ((is_disk && dev.size > 0)
                || (is_usb && super::usbslot::recovery_device(dev).is_some()));
        let slot = if present {
            slot_of(&self.slots, dev)
        } else {
            Ok(None)
        };
        let devnode = dev.devnode.clone().unwrap_or_else(|| dev.syspath.clone());

        // Did the medium a slot holds go away?
        let gone: Vec<(String, String)> = self
            .active
            .iter()
            .filter(|(_, a)| a.syspath == dev.syspath)
            .filter_map(|(s, a)| {
                let reason = if action == Action::Remove {
                    "device removed"
                } else if is_usb {
                    // Boards re-enumerate (new address, other mode) during a job; only a
                    // removal event says one left.
                    return None;
                } else if !present {
                    "medium removed"
                } else if dev.medium_key() != a.key {
                    "medium changed"
                } else if slot.as_ref().ok().copied().flatten() != Some(s.as_str()) {
                    "device no longer matches its slot"
                } else {
                    return None;
                };
                Some((s.clone(), reason.to_string()))
            })
            .collect();
        for (s, reason) in gone {
            self.active.remove(&s);
            out.push(Decision::Removed {
                slot: s,
                devnode: devnode.clone(),
                reason,
                usb_address: if is_usb { dev.usb_address() } else { None },
            });
        }
        if !present {
            return out;
        }
        let key = dev.medium_key();
        let slot = match slot {
            Ok(Some(s)) => s.to_string(),
            Ok(None) => return out,
            Err(msg) => {
                if self.seen.insert(key) {
                    out.push(Decision::Refused { msg });
                }
                return out;
            }
        };
        if is_usb
            && self
                .active
                .get(&slot)
                .is_some_and(|a| a.syspath == dev.syspath)
        {
            // The same port announcing a new enumeration without a removal in between (a
            // missed event): the board re-enumerated; note its key.
            if self.seen.insert(key.clone()) {
                self.active.insert(
                    slot.clone(),
                    Active {
                        syspath: dev.syspath.clone(),
                        key,
                    },
                );
            }
            return out;
        }
        if let Some(a) = self.active.get(&slot) {
            if a.syspath != dev.syspath && self.seen.insert(key) {
                out.push(Decision::Refused {
                    msg: format!(
                        "{devnode} also matches slot {slot}, which already holds another device; leaving {devnode} alone (make the slot's match rules precise)"
                    ),
                });
            }
            return out;
        }
        if !self.seen.insert(key.clone()) {
            return out;
        }
        self.active.insert(
            slot.clone(),
            Active {
                syspath: dev.syspath.clone(),
                key,
            },
        );
        if action == Action::Present && !flash_present {
            out.push(Decision::LeftAlone {
                slot,
                dev: dev.clone(),
            });
        } else {
            out.push(Decision::Start {
                slot,
                dev: dev.clone(),
            });
        }
        out
    }
}

/// Reads a udev device into a [`DeviceInfo`], with the sysfs attributes in `attr_keys`.
pub(crate) fn device_info(d: &udev::Device, attr_keys: &[String]) -> DeviceInfo {
    let s = |o: Option<&std::ffi::OsStr>| o.map(|v| v.to_string_lossy().into_owned());
    let mut props = BTreeMap::new();
    for p in d.properties() {
        props.insert(
            p.name().to_string_lossy().into_owned(),
            p.value().to_string_lossy().into_owned(),
        );
    }
    let mut attrs = BTreeMap::new();
    for k in attr_keys {
        if let Some(v) = d.attribute_value(k) {
            attrs.insert(k.clone(), v.to_string_lossy().trim_end().to_string());
        }
    }
    let mut size = d
        .attribute_value("size")
        .and_then(|v| v.to_string_lossy().trim().parse::<u64>().ok())
        .map_or(0, |sectors| sectors * 512);
    // A media-change event (a card reader after an eject, or a card swapped) comes before the
    // kernel revalidates the disk, which it does on the next open: until then sysfs shows the
    // old card's size, and a station that believed it started a unit on an empty reader. Open
    // it (read-only, no claim) so the size is the medium's; no medium reads as 0.
    if props.get("DISK_MEDIA_CHANGE").map(String::as_str) == Some("1") {
        if let Some(node) = d.devnode() {
            size = medium_size(node).unwrap_or(0);
        }
    }
    // The size is read now, so the medium key must be too: an `add` event handled after the
    // device was already attached again carries an older DISKSEQ than the medium in it (a
    // fresh loop device: `add` at creation, `change` at attach), and keying that medium by the
    // event's number would see the `change` that follows as a new medium and cancel its job.
    if let Some(seq) = d.attribute_value("diskseq") {
        let seq = seq.to_string_lossy().trim().to_string();
        if !seq.is_empty() {
            props.insert("DISKSEQ".to_string(), seq);
        }
    }
    DeviceInfo {
        syspath: d.syspath().to_string_lossy().into_owned(),
        devnode: d.devnode().map(|p| p.to_string_lossy().into_owned()),
        subsystem: s(d.subsystem()).unwrap_or_default(),
        devtype: s(d.devtype()),
        props,
        attrs,
        size,
    }
}

/// The size of the medium in a disk, as the kernel sees it after an open (revalidated), or
/// `None` when no medium answers. The open is blocking (a reader without a medium refuses it
/// with ENOMEDIUM) and the first block is read with O_DIRECT: a media-change event can be
/// handled while sysfs and even the open still show the card just ejected, but that card no
/// longer answers a read.
fn medium_size(node: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT | nix::libc::O_CLOEXEC)
        .open(node)
        .ok()?;
    let size = crate::write::sink::block_device_size(&f).ok()?;
    let mut block = crate::image::buffer::AlignedBuf::new(4096);
    f.read_exact_at(&mut block[..], 0).ok()?;
    (size > 0).then_some(size)
}

/// Whole disks and USB devices present now (works without udevd, but then udev properties
/// are missing).
pub(crate) fn enumerate(attr_keys: &[String]) -> Result<Vec<DeviceInfo>, StationError> {
    let udev_err = |e: std::io::Error| StationError::Environment(format!("udev enumerate: {e}"));
    let mut out = Vec::new();
    for (subsystem, devtype) in [("block", "disk"), ("usb", "usb_device")] {
        let mut en = udev::Enumerator::new().map_err(udev_err)?;
        en.match_subsystem(subsystem).map_err(udev_err)?;
        out.extend(
            en.scan_devices()
                .map_err(udev_err)?
                .map(|d| device_info(&d, attr_keys))
                .filter(|d| d.devtype.as_deref() == Some(devtype)),
        );
    }
    out.sort_by(|a, b| a.syspath.cmp(&b.syspath));
    Ok(out)
}

/// Where the station's device events come from: the udev monitor, or (tests, simulations of
/// USB boards, which have no kernel device) a channel fed with the same udev-shaped events.
pub trait EventSource {
    /// Devices present now (whole disks and USB devices).
    fn enumerate(&self) -> Result<Vec<DeviceInfo>, StationError>;
    /// Waits up to `timeout` for events and returns all that are queued.
    fn poll(&mut self, timeout: Duration) -> Result<Vec<(Action, DeviceInfo)>, StationError>;
}

/// Udev-shaped events from a channel (see [`EventSource`]).
pub struct ChannelEvents {
    pub present: Vec<DeviceInfo>,
    pub rx: crossbeam_channel::Receiver<(Action, DeviceInfo)>,
}

impl EventSource for ChannelEvents {
    fn enumerate(&self) -> Result<Vec<DeviceInfo>, StationError> {
        Ok(self.present.clone())
    }
    fn poll(&mut self, timeout: Duration) -> Result<Vec<(Action, DeviceInfo)>, StationError> {
        let first = match self.rx.recv_timeout(timeout) {
            Ok(ev) => ev,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => return Ok(Vec::new()),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                // No more events will come: behave like a quiet monitor.
                std::thread::sleep(timeout);
                return Ok(Vec::new());
            }
        };
        let mut out = vec![first];
        out.extend(self.rx.try_iter());
        Ok(out)
    }
}

impl EventSource for Monitor {
    fn enumerate(&self) -> Result<Vec<DeviceInfo>, StationError> {
        Monitor::enumerate(self)
    }
    fn poll(&mut self, timeout: Duration) -> Result<Vec<(Action, DeviceInfo)>, StationError> {
        Monitor::poll(self, timeout)
    }
}

/// The udev side: a monitor socket on `block` and `usb`, and enumeration of what is present.
pub(crate) struct Monitor {
    socket: crate::uevent::Monitor,
    attr_keys: Vec<String>,
}

impl Monitor {
    /// Starts listening. Must be called before [`Monitor::enumerate`] so nothing plugged in
    /// between is missed (duplicates are harmless: media are keyed).
    pub(crate) fn open(attr_keys: Vec<String>) -> Result<Self, StationError> {
        use crate::uevent::MonitorError;
        let socket = crate::uevent::Monitor::open(&["block", "usb"]).map_err(|e| match e {
            MonitorError::NoUdevd => {
                StationError::Environment(format!("{e}: the station needs udev events"))
            }
            MonitorError::Io(_) => StationError::Environment(e.to_string()),
        })?;
        Ok(Monitor { socket, attr_keys })
    }

    /// Whole disks and USB devices present now.
    pub(crate) fn enumerate(&self) -> Result<Vec<DeviceInfo>, StationError> {
        enumerate(&self.attr_keys)
    }

    /// Waits up to `timeout` for events and returns all that are queued.
    pub(crate) fn poll(
        &mut self,
        timeout: Duration,
    ) -> Result<Vec<(Action, DeviceInfo)>, StationError> {
        let ready = self
            .socket
            .wait(timeout)
            .map_err(|e| StationError::Environment(format!("poll on udev monitor: {e}")))?;
        let mut out = Vec::new();
        if ready {
            for ev in self.socket.events() {
                let Some(action) = ev
                    .action()
                    .and_then(|a| Action::from_udev(&a.to_string_lossy()))
                else {
                    continue;
                };
                out.push((action, device_info(&ev, &self.attr_keys)));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots() -> Vec<SlotMatcher> {
        let r = |v: &str| [("attr:loop/backing_file".to_string(), v.to_string())].into();
        vec![
            SlotMatcher::new("a", &r("/t/a.img")).unwrap(),
            SlotMatcher::new("b", &r("/t/b.img")).unwrap(),
        ]
    }

    fn lp(n: u32, backing: Option<&str>, seq: u32, size: u64) -> DeviceInfo {
        DeviceInfo {
            syspath: format!("/sys/devices/virtual/block/loop{n}"),
            devnode: Some(format!("/dev/loop{n}")),
            subsystem: "block".into(),
            devtype: Some("disk".into()),
            props: [("DISKSEQ".to_string(), seq.to_string())].into(),
            attrs: backing
                .map(|b| [("loop/backing_file".to_string(), b.to_string())].into())
                .unwrap_or_default(),
            size,
        }
    }

    fn starts(d: &[Decision]) -> Vec<&str> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Start { slot, .. } => Some(slot.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn attach_starts_once_despite_change_storm() {
        let mut t = Tracker::new(slots());
        let d = lp(0, Some("/t/a.img"), 11, 1 << 20);
        assert_eq!(starts(&t.on_event(Action::Change, &d, false)), ["a"]);
        // Rules' `watch` and partition rescans send more change events for the same medium.
        assert!(t.on_event(Action::Change, &d, false).is_empty());
        assert!(t.on_event(Action::Add, &d, false).is_empty());
    }

    #[test]
    fn remove_then_same_medium_is_not_reflashed_but_a_new_one_is() {
        let mut t = Tracker::new(slots());
        let d = lp(0, Some("/t/a.img"), 11, 1 << 20);
        t.on_event(Action::Change, &d, false);
        let r = t.on_event(Action::Remove, &d, false);
        assert!(
            matches!(&r[..], [Decision::Removed { slot, reason, .. }] if slot == "a" && reason == "device removed")
        );
        assert!(t.on_event(Action::Change, &d, false).is_empty());
        // Detach: size 0, no backing file; nothing active any more.
        assert!(t
            .on_event(Action::Change, &lp(0, None, 11, 0), false)
            .is_empty());
        // Re-attach: a new DISKSEQ is a new medium.
        assert_eq!(
            starts(&t.on_event(Action::Change, &lp(0, Some("/t/a.img"), 12, 1 << 20), false)),
            ["a"]
        );
    }

    #[test]
    fn detach_mid_job_is_a_removal() {
        let mut t = Tracker::new(slots());
        t.on_event(Action::Change, &lp(3, Some("/t/b.img"), 5, 1 << 20), false);
        let r = t.on_event(Action::Change, &lp(3, None, 5, 0), false);
        assert!(
            matches!(&r[..], [Decision::Removed { slot, reason, .. }] if slot == "b" && reason == "medium removed")
        );
    }

    #[test]
    fn present_at_start_is_left_alone_unless_asked() {
        let mut t = Tracker::new(slots());
        let d = lp(1, Some("/t/a.img"), 7, 1 << 20);
        assert!(matches!(
            &t.on_event(Action::Present, &d, false)[..],
            [Decision::LeftAlone { .. }]
        ));
        let mut t = Tracker::new(slots());
        assert_eq!(starts(&t.on_event(Action::Present, &d, true)), ["a"]);
    }

    #[test]
    fn outside_slots_and_partitions_are_ignored() {
        let mut t = Tracker::new(slots());
        assert!(t
            .on_event(Action::Add, &lp(2, Some("/other.img"), 3, 1 << 20), true)
            .is_empty());
        let mut p = lp(2, Some("/t/a.img"), 3, 1 << 20);
        p.devtype = Some("partition".into());
        assert!(t.on_event(Action::Add, &p, true).is_empty());
    }

    #[test]
    fn second_device_on_a_busy_slot_is_refused() {
        let mut t = Tracker::new(slots());
        t.on_event(Action::Change, &lp(0, Some("/t/a.img"), 1, 1 << 20), false);
        let r = t.on_event(Action::Change, &lp(1, Some("/t/a.img"), 2, 1 << 20), false);
        assert!(matches!(&r[..], [Decision::Refused { .. }]));
    }

    #[test]
    fn usb_board_arrivals_and_removals_carry_the_address() {
        use crate::usb::discovery::{Descriptor, InterfaceClass};
        let r: BTreeMap<String, String> =
            [("DEVPATH".to_string(), "*/usb1/1-2/1-2.1".to_string())].into();
        let usb_slot = SlotMatcher::new("u", &r)
            .unwrap()
            .with_kind(crate::station::config::SlotKind::Usb);
        let mut t = Tracker::new(vec![usb_slot.clone()]);
        let desc = |address, bcd_usb| Descriptor {
            bus: 1,
            address,
            ports: vec![2, 1],
            vid: 0x2207,
            pid: 0x350b,
            bcd_usb,
            serial_index: 0,
            interfaces: vec![InterfaceClass {
                number: 0,
                class: 0xff,
                subclass: 6,
                protocol: 5,
            }],
        };
        let maskrom = crate::station::usbslot::udev_event_for(&desc(5, 0x200), "");
        let loader = crate::station::usbslot::udev_event_for(&desc(6, 0x201), "");
        assert_eq!(starts(&t.on_event(Action::Add, &maskrom, false)), ["u"]);
        // The same enumeration announced again (bind, change) is not a new board.
        assert!(t.on_event(Action::Change, &maskrom, false).is_empty());
        let r = t.on_event(Action::Remove, &maskrom, false);
        assert!(
            matches!(&r[..], [Decision::Removed { slot, usb_address: Some((1, 5)), .. }] if slot == "u"),
            "{r:?}"
        );
        // Re-enumerated in loader mode: a Start the station matches to the running job.
        assert_eq!(starts(&t.on_event(Action::Add, &loader, false)), ["u"]);
        // A block slot never takes a USB device, and a USB slot never a disk.
        let mut block_only = Tracker::new(slots());
        assert!(block_only.on_event(Action::Add, &loader, true).is_empty());
        let mut usb_only = Tracker::new(vec![usb_slot]);
        assert!(usb_only
            .on_event(Action::Add, &lp(0, Some("/t/a.img"), 1, 1 << 20), true)
            .is_empty());
    }
}
