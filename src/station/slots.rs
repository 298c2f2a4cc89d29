//! Slots: which physical socket a device sits in, decided from its udev properties.
//!
//! Real readers are matched by `ID_PATH` (the port, stable across cards); anything udev knows
//! can be used, including sysfs attributes (`attr:loop/backing_file`), which is how loop
//! devices stand in for cards in tests. A device that matches no slot is never touched.

use std::collections::BTreeMap;

/// What the station knows about a block device at one udev event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    pub(crate) syspath: String,
    pub devnode: Option<String>,
    pub(crate) subsystem: String,
    pub(crate) devtype: Option<String>,
    /// udev properties (after rule processing).
    pub(crate) props: BTreeMap<String, String>,
    /// The sysfs attributes that some slot rule refers to (only those are read).
    pub(crate) attrs: BTreeMap<String, String>,
    /// Size in bytes (0: no medium).
    pub(crate) size: u64,
}

impl DeviceInfo {
    pub(crate) fn prop(&self, k: &str) -> Option<&str> {
        self.props.get(k).map(String::as_str)
    }

    /// A whole USB device (udev `usb` / `usb_device`), as opposed to one of its interfaces.
    pub(crate) fn is_usb_device(&self) -> bool {
        self.subsystem == "usb" && self.devtype.as_deref() == Some("usb_device")
    }

    /// udev's BUSNUM/DEVNUM of a USB device: the address changes on every re-enumeration,
    /// which is how a board's own loader restart is told apart from an unplug.
    pub(crate) fn usb_address(&self) -> Option<(u8, u8)> {
        let n = |k: &str| self.prop(k).and_then(|v| v.trim().parse::<u8>().ok());
        Some((n("BUSNUM")?, n("DEVNUM")?))
    }

    /// The device's own serial, if udev has one (USB readers report the reader's).
    pub(crate) fn card_serial(&self) -> Option<String> {
        self.prop("ID_SERIAL_SHORT")
            .or_else(|| self.prop("ID_SERIAL"))
            .map(str::to_string)
    }

    /// A key for "this medium in this device": the kernel's DISKSEQ grows on every attach or
    /// media change, so the same card seen again through `change` events is not re-flashed.
    /// Without DISKSEQ (kernels before 5.15), udev's initialisation time stands in.
    pub(crate) fn medium_key(&self) -> String {
        if self.is_usb_device() {
            // Every enumeration of a board (a new address) is a new arrival.
            return format!(
                "{}#usb{}/{}#init{}",
                self.syspath,
                self.prop("BUSNUM").unwrap_or("?"),
                self.prop("DEVNUM").unwrap_or("?"),
                self.prop("USEC_INITIALIZED").unwrap_or("?")
            );
        }
        match self.prop("DISKSEQ") {
            Some(s) => format!("{}#seq{}", self.syspath, s),
            None => format!(
                "{}#init{}#size{}",
                self.syspath,
                self.prop("USEC_INITIALIZED").unwrap_or("?"),
                self.size
            ),
        }
    }
}

/// Where a rule looks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Key {
    Property(String),
    Attr(String),
}

/// One slot's rules: all must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotMatcher {
    pub(crate) name: String,
    pub(crate) kind: super::config::SlotKind,
    rules: Vec<(Key, String)>,
}

impl SlotMatcher {
    pub(crate) fn new(name: &str, rules: &BTreeMap<String, String>) -> Result<Self, String> {
        if rules.is_empty() {
            return Err("`match` is empty: it would match every disk".into());
        }
        let mut out = Vec::new();
        for (k, v) in rules {
            let key = match k.strip_prefix("attr:") {
                Some(a) if !a.is_empty() && !a.split('/').any(|c| c == "..") => {
                    Key::Attr(a.to_string())
                }
                Some(_) => return Err(format!("bad attribute key {k:?}")),
                None if !k.is_empty() => Key::Property(k.clone()),
                None => return Err("empty match key".into()),
            };
            if v.is_empty() || v.chars().all(|c| c == '*') {
                return Err(format!(
                    "pattern for {k:?} matches anything; name the socket precisely"
                ));
            }
            out.push((key, v.clone()));
        }
        Ok(SlotMatcher {
            name: name.to_string(),
            kind: Default::default(),
            rules: out,
        })
    }

    /// The sysfs attributes this slot needs read for each device.
    pub(crate) fn attr_keys(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().filter_map(|(k, _)| match k {
            Key::Attr(a) => Some(a.as_str()),
            Key::Property(_) => None,
        })
    }

    pub(crate) fn same_rules(&self, other: &SlotMatcher) -> bool {
        self.kind == other.kind && self.rules == other.rules
    }

    /// The same rules for another kind of device.
    pub(crate) fn with_kind(mut self, kind: super::config::SlotKind) -> Self {
        self.kind = kind;
        self
    }

    /// Human-readable rules, for `--dry-run` and logs.
    pub(crate) fn describe(&self) -> String {
        self.rules
            .iter()
            .map(|(k, v)| match k {
                Key::Property(p) => format!("{p}={v}"),
                Key::Attr(a) => format!("attr:{a}={v}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether `dev` is in this slot: a whole disk for block slots, a USB device (not one of
    /// its interfaces) for USB slots.
    pub(crate) fn matches(&self, dev: &DeviceInfo) -> bool {
        let fits = match self.kind {
            super::config::SlotKind::Block => {
                dev.subsystem == "block" && dev.devtype.as_deref() == Some("disk")
            }
            super::config::SlotKind::Usb => dev.is_usb_device(),
        };
        if !fits {
            return false;
        }
        self.rules.iter().all(|(k, pat)| {
            let v = match k {
                Key::Property(p) => dev.props.get(p),
                Key::Attr(a) => dev.attrs.get(a),
            };
            v.is_some_and(|v| glob(pat, v.trim_end()))
        })
    }
}

/// Which slot `dev` is in: `Ok(None)` outside all slots, `Err` if several slots claim it (a
/// config mistake: the device is left alone).
pub(crate) fn slot_of<'a>(
    slots: &'a [SlotMatcher],
    dev: &DeviceInfo,
) -> Result<Option<&'a str>, String> {
    let hits: Vec<&str> = slots
        .iter()
        .filter(|s| s.matches(dev))
        .map(|s| s.name.as_str())
        .collect();
    match hits.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        many => Err(format!(
            "{} matches several slots ({}); leaving it alone",
            dev.devnode.as_deref().unwrap_or(&dev.syspath),
            many.join(", ")
        )),
    }
}

/// Shell-style glob: `*` any run, `?` one character, everything else literal.
pub(crate) fn glob(pat: &str, s: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    let t: Vec<char> = s.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(props: &[(&str, &str)], attrs: &[(&str, &str)]) -> DeviceInfo {
        DeviceInfo {
            syspath: "/sys/devices/virtual/block/loop3".into(),
            devnode: Some("/dev/loop3".into()),
            subsystem: "block".into(),
            devtype: Some("disk".into()),
            props: props
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            attrs: attrs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            size: 1 << 20,
        }
    }

    fn m(name: &str, rules: &[(&str, &str)]) -> SlotMatcher {
        let r = rules
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        SlotMatcher::new(name, &r).unwrap()
    }

    #[test]
    fn globbing() {
        assert!(glob("a*c", "abbbc"));
        assert!(glob(
            "*-usb-0:1.?:1.0*",
            "pci-0000:00:14.0-usb-0:1.3:1.0-scsi-0:0:0:0"
        ));
        assert!(!glob("a*c", "abd"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exact2"));
    }

    #[test]
    fn matches_by_property_or_attribute() {
        let s1 = m("s1", &[("ID_PATH", "pci-*-usb-0:1:1.0-*")]);
        let s2 = m("s2", &[("attr:loop/backing_file", "/tmp/*/s2.img")]);
        let real = dev(
            &[("ID_PATH", "pci-0000:00:14.0-usb-0:1:1.0-scsi-0:0:0:0")],
            &[],
        );
        let lp = dev(&[], &[("loop/backing_file", "/tmp/xyz/s2.img\n")]);
        let slots = [s1, s2];
        assert_eq!(slot_of(&slots, &real).unwrap(), Some("s1"));
        assert_eq!(slot_of(&slots, &lp).unwrap(), Some("s2"));
        assert_eq!(slot_of(&slots, &dev(&[], &[])).unwrap(), None);
    }

    #[test]
    fn partitions_never_match() {
        let s = m("s", &[("attr:loop/backing_file", "/x")]);
        let mut d = dev(&[], &[("loop/backing_file", "/x")]);
        d.devtype = Some("partition".into());
        assert!(!s.matches(&d));
    }

    #[test]
    fn ambiguous_and_catch_all_are_refused() {
        let r: BTreeMap<String, String> = [("ID_PATH".to_string(), "*".to_string())].into();
        assert!(SlotMatcher::new("x", &r).is_err());
        assert!(SlotMatcher::new("x", &BTreeMap::new()).is_err());
        let a = m("a", &[("attr:loop/backing_file", "/x*")]);
        let b = m("b", &[("attr:loop/backing_file", "/xy*")]);
        let d = dev(&[], &[("loop/backing_file", "/xyz")]);
        assert!(slot_of(&[a, b], &d).unwrap_err().contains("several slots"));
    }

    #[test]
    fn medium_key_follows_diskseq() {
        let a = dev(&[("DISKSEQ", "11")], &[]);
        let b = dev(&[("DISKSEQ", "12")], &[]);
        assert_ne!(a.medium_key(), b.medium_key());
        assert_eq!(a.medium_key(), a.clone().medium_key());
    }
}
