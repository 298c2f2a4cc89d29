//! USB identity tables: which vendor/product/interface means which recovery protocol.
//!
//! Discovery, the SoC guess in `sbcflash usb`, the RC4 decision for raw Rockchip blobs and the
//! shipped udev rules ([`super::udev`]) all read these tables, so they cannot drift apart.
//! Facts from the public tools' sources: rockchip-linux/rkdeveloptool, xboot/xrock,
//! raspberrypi/usbboot, linux-sunxi/sunxi-tools, xboot/xfel.

/// Rockchip's vendor ID (maskrom and loader mode share it, and U-Boot gadgets reuse it).
pub(crate) const VID_ROCKCHIP: u16 = 0x2207;
/// Broadcom (Raspberry Pi boot ROM and its second stage).
pub(crate) const VID_BROADCOM: u16 = 0x0a5c;
/// Allwinner (FEL boot ROM, U-Boot gadgets).
pub(crate) const VID_ALLWINNER: u16 = 0x1f3a;
/// T-Head (TH1520 boot ROM speaks fastboot).
pub(crate) const VID_THEAD: u16 = 0x2345;

/// Interface class triples that identify a protocol regardless of VID:PID.
pub(crate) const CLASS_ROCKUSB: (u8, u8, u8) = (0xff, 0x06, 0x05);
pub(crate) const CLASS_FASTBOOT: (u8, u8, u8) = (0xff, 0x42, 0x03);
pub(crate) const CLASS_MASS_STORAGE: (u8, u8, u8) = (0x08, 0x06, 0x50);

/// A Rockchip SoC as its boot ROM announces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RockchipSoc {
    pub(crate) pid: u16,
    pub(crate) name: &'static str,
    /// The boot ROM wants 0x471/0x472 payloads RC4-scrambled (legacy SoCs). Merged loader
    /// files already contain the right bytes; only raw blobs are scrambled on the host.
    pub(crate) rc4: bool,
}

const fn rk(pid: u16, name: &'static str, rc4: bool) -> RockchipSoc {
    RockchipSoc { pid, name, rc4 }
}

/// Union of rkdeveloptool's and xrock's tables. RC4 is only known for some legacy SoCs; the
/// others are marked `false` because merged loaders (the normal input) never need host RC4.
pub(crate) const ROCKCHIP_SOCS: &[RockchipSoc] = &[
    rk(0x110c, "RV1103/RV1106", false),
    rk(0x180a, "RK1808", true),
    rk(0x281a, "RK2818", false),
    rk(0x290a, "RK2918", false),
    rk(0x292a, "RK2928", false),
    rk(0x292c, "RK3026", false),
    rk(0x300a, "RK3066", false),
    rk(0x300b, "RK3168", false),
    rk(0x301a, "RK3036", false),
    rk(0x310a, "RK3066B", false),
    rk(0x310b, "RK3188", false),
    rk(0x310c, "RK3128", true),
    rk(0x320a, "RK3288", true),
    rk(0x320b, "RK3228", false),
    rk(0x320c, "RK3328", true),
    rk(0x330a, "RK3368", false),
    rk(0x330c, "RK3399", true),
    rk(0x330d, "PX30", true),
    rk(0x330e, "RK3308", true),
    rk(0x350a, "RK3566/RK3568", false),
    rk(0x350b, "RK3588", false),
    rk(0x350d, "RK3562", false),
    rk(0x350e, "RK3576", false),
    rk(0x350f, "RK3506", false),
];

pub(crate) fn rockchip_soc(pid: u16) -> Option<&'static RockchipSoc> {
    ROCKCHIP_SOCS.iter().find(|s| s.pid == pid)
}

/// Broadcom boot ROM product IDs and the second-stage file each wants.
pub(crate) const BROADCOM_ROMS: &[(u16, &str, &str)] = &[
    (0x2763, "BCM2835/6/7", "bootcode.bin"),
    (0x2764, "BCM2835/6/7", "bootcode.bin"),
    (0x2711, "BCM2711", "bootcode4.bin"),
    (0x2712, "BCM2712", "bootcode5.bin"),
];

/// Allwinner FEL boot ROM.
pub(crate) const PID_FEL: u16 = 0xefe8;
/// T-Head TH1520 boot ROM download gadget (fastboot).
pub(crate) const PID_TH1520_BROM: u16 = 0x7654;

/// Gadget IDs (fastboot / ums) that our boards' U-Boot builds use by default.
pub(crate) const GADGETS: &[(u16, u16, &str)] = &[
    (
        VID_ALLWINNER,
        0x1010,
        "Allwinner U-Boot fastboot/ums gadget",
    ),
    (0x0525, 0xa4a5, "Raspberry Pi U-Boot ums/fastboot gadget"),
    (0x18d1, 0x4ee0, "Android fastboot gadget"),
];

/// One line of the udev rule table: a VID with an optional PID (None = every product).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UdevMatch {
    pub(crate) vid: u16,
    pub(crate) pid: Option<u16>,
    pub(crate) what: String,
    /// Long erases and loader downloads stall when the kernel autosuspends the device.
    pub(crate) autosuspend_off: bool,
}

/// Every device sbcflash may need to open, in rule-file order.
pub(crate) fn udev_matches() -> Vec<UdevMatch> {
    let mut v = vec![UdevMatch {
        vid: VID_ROCKCHIP,
        pid: None,
        what: "Rockchip maskrom / rockusb loader / U-Boot gadgets (all SoCs)".into(),
        autosuspend_off: true,
    }];
    for (pid, soc, _) in BROADCOM_ROMS {
        v.push(UdevMatch {
            vid: VID_BROADCOM,
            pid: Some(*pid),
            what: format!("Raspberry Pi {soc} USB boot"),
            autosuspend_off: false,
        });
    }
    v.push(UdevMatch {
        vid: VID_ALLWINNER,
        pid: Some(PID_FEL),
        what: "Allwinner FEL boot ROM".into(),
        autosuspend_off: true,
    });
    v.push(UdevMatch {
        vid: VID_THEAD,
        pid: Some(PID_TH1520_BROM),
        what: "T-Head TH1520 boot ROM (fastboot)".into(),
        autosuspend_off: true,
    });
    for (vid, pid, what) in GADGETS {
        v.push(UdevMatch {
            vid: *vid,
            pid: Some(*pid),
            what: (*what).into(),
            autosuspend_off: false,
        });
    }
    v
}
