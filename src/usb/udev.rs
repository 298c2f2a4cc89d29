//! The shipped `udev-rules/70-sbcflash.rules`, rendered from [`super::ids`] so the rules and
//! the code that opens devices can never disagree (a test compares the committed file with
//! [`render`]). `uaccess` gives the logged-in seat user access (the file must sort before
//! 73-seat-late.rules, hence 70); the optional `sbcflash` group covers headless stations.

use super::ids::udev_matches;

/// Path of the committed rules file, relative to the repository root.
pub const RULES_PATH: &str = "udev-rules/70-sbcflash.rules";

pub fn render() -> String {
    let mut s = String::new();
    s.push_str(
        "# sbcflash: access to boards in USB recovery modes, without root.\n\
         # GENERATED from src/usb/ids.rs by `sbcflash usb udev-rules`; do not edit by hand\n\
         # (tests/usb.rs fails when this file and the tables disagree).\n\
         #\n\
         # Install: sudo install -m 0644 70-sbcflash.rules /etc/udev/rules.d/\n\
         #          sudo udevadm control --reload && sudo udevadm trigger\n\
         # TAG+=\"uaccess\" grants the user logged in at the seat; members of the optional\n\
         # `sbcflash` group (groupadd -r sbcflash) get access on headless stations.\n\
         # Autosuspend is turned off where long erases and loader downloads stall otherwise.\n\
         # Every action but remove: the kernel's \"bind\" event after \"add\" re-applies node\n\
         # permissions, and rules of other packages (sunxi-tools, rkdeveloptool) set their group\n\
         # on it; skipping it left the node in their group (seen in the USB lab).\n\
         \n\
         ACTION==\"remove\", GOTO=\"sbcflash_end\"\n\
         SUBSYSTEM!=\"usb\", GOTO=\"sbcflash_end\"\n\
         ENV{DEVTYPE}!=\"usb_device\", GOTO=\"sbcflash_end\"\n\n",
    );
    for m in udev_matches() {
        s.push_str(&format!("# {}\n", m.what));
        let mut rule = format!("ATTR{{idVendor}}==\"{:04x}\"", m.vid);
        if let Some(pid) = m.pid {
            rule.push_str(&format!(", ATTR{{idProduct}}==\"{pid:04x}\""));
        }
        rule.push_str(", MODE=\"0660\", GROUP=\"sbcflash\", TAG+=\"uaccess\"");
        if m.autosuspend_off {
            rule.push_str(", TEST==\"power/control\", ATTR{power/control}=\"on\"");
        }
        s.push_str(&rule);
        s.push('\n');
    }
    s.push_str("\nLABEL=\"sbcflash_end\"\n");
    s
}
