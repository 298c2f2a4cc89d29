//! Host keys proven over the serial console: the logged-in console is a channel the network
//! cannot forge, so the keys read there decide which key the SSH handoff may accept. Pure:
//! parsing, comparison and the waiting decision (time passed in); the console query and the
//! network scan are done by the callers.

use std::time::{Duration, Instant};

use ssh_key::{HashAlg, PublicKey};

/// The console query: OpenSSH's public key files, then dropbear's private keys through
/// `dropbearkey -y` (dropbear keeps no `.pub`). Ends with `true`: no key is an answer too.
pub(crate) const CONSOLE_QUERY: &str = "for f in /etc/ssh/ssh_host_*_key.pub; do [ -r \"$f\" ] && cat \"$f\"; done; for f in /etc/dropbear/dropbear_*_host_key; do [ -r \"$f\" ] && dropbearkey -y -f \"$f\" 2>/dev/null; done; true";

/// One SSH host public key: algorithm, key data (base64 of the wire form) and its SHA-256
/// fingerprint as `ssh-keygen -l` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKey {
    pub(crate) algorithm: String,
    pub(crate) base64: String,
    pub(crate) fingerprint: String,
}

impl HostKey {
    /// Parses `ALGO BASE64 [comment]`; the key data must decode to a key of that algorithm,
    /// so a line garbled on the console never parses as a different key.
    pub fn parse(line: &str) -> Result<HostKey, String> {
        let mut w = line.split_whitespace();
        let (Some(algo), Some(b64)) = (w.next(), w.next()) else {
            return Err(format!("not a public key line: {line:?}"));
        };
        let k = PublicKey::from_openssh(&format!("{algo} {b64}"))
            .map_err(|e| format!("not a public key ({e}): {line:?}"))?;
        if k.algorithm().as_str() != algo {
            return Err(format!(
                "key data is {} but the line says {algo}: {line:?}",
                k.algorithm().as_str()
            ));
        }
        Ok(HostKey::from_key(&k))
    }

    pub(crate) fn from_key(k: &PublicKey) -> HostKey {
        let full = k.to_openssh().unwrap_or_default();
        let mut w = full.split_whitespace();
        HostKey {
            algorithm: w.next().unwrap_or_default().to_string(),
            base64: w.next().unwrap_or_default().to_string(),
            fingerprint: k.fingerprint(HashAlg::Sha256).to_string(),
        }
    }

    /// `ALGO BASE64`, as in `authorized_keys` / `known_hosts`.
    pub(crate) fn openssh(&self) -> String {
        format!("{} {}", self.algorithm, self.base64)
    }

    /// `SHA256:... (ED25519)`, the words users compare.
    pub(crate) fn describe(&self) -> String {
        format!("{} ({})", self.fingerprint, self.algorithm)
    }
}

fn looks_like_key(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("ssh-") || t.starts_with("ecdsa-sha2-") || t.starts_with("sk-")
}

/// Reads the answer to [`CONSOLE_QUERY`]: every line that starts like a key must be one
/// (else the answer is unclean and is asked again); other lines (`dropbearkey`'s
/// "Public key portion is:", "Fingerprint: ...") are not keys. Duplicates are dropped.
pub(crate) fn parse_console(text: &str) -> Result<Vec<HostKey>, String> {
    let mut keys: Vec<HostKey> = Vec::new();
    for l in text.lines().filter(|l| looks_like_key(l)) {
        let k = HostKey::parse(l)?;
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    Ok(keys)
}

/// Reads `ssh-keyscan` output lines (`HOST ALGO BASE64`).
pub(crate) fn parse_keyscan(lines: &[String]) -> Result<Vec<HostKey>, String> {
    let mut keys: Vec<HostKey> = Vec::new();
    for l in lines {
        let rest = l
            .split_once(char::is_whitespace)
            .map(|(_, r)| r)
            .ok_or_else(|| format!("ssh-keyscan printed an unreadable line: {l:?}"))?;
        let k = HostKey::parse(rest)?;
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    Ok(keys)
}

/// What the console and the network say, compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Every key the network offered is one the console shows: the console's keys (all of
    /// them: the console is the channel that vouches for them, and `ssh-keyscan` may not get
    /// every type from a slow board) are the keys to trust.
    Proven(Vec<HostKey>),
    /// The network offered a key of an algorithm for which the console shows a different
    /// key: someone else answers on the network (or the board was re-keyed).
    Mismatch {
        network: Vec<HostKey>,
        console: Vec<HostKey>,
    },
    /// The console shows no key yet of these algorithms (first boot: sshd still making
    /// them).
    NotYet(Vec<String>),
}

/// Compares the console's keys with the network's.
pub(crate) fn compare(console: &[HostKey], network: &[HostKey]) -> Verdict {
    let mut missing = Vec::new();
    let mut differ = false;
    for n in network {
        if console.contains(n) {
            continue;
        } else if console.iter().any(|c| c.algorithm == n.algorithm) {
            differ = true;
        } else {
            missing.push(n.algorithm.clone());
        }
    }
    if differ {
        return Verdict::Mismatch {
            network: network.to_vec(),
            console: console.to_vec(),
        };
    }
    if network.is_empty() || !missing.is_empty() {
        let mut m = missing;
        if m.is_empty() {
            m.push("any".into());
        }
        return Verdict::NotYet(m);
    }
    Verdict::Proven(console.to_vec())
}

/// What to do after a comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    Trust(Vec<HostKey>),
    Refuse {
        network: Vec<HostKey>,
        console: Vec<HostKey>,
    },
    /// Ask the console again at this time.
    AskAt(Instant),
    /// The deadline passed with keys still missing on the console.
    GiveUp(Vec<String>),
}

/// Waiting for the console to show the keys the network offers, until a deadline that
/// starts at the first comparison (as the other console waits do).
#[derive(Debug, Clone)]
pub struct ProofWait {
    timeout: Duration,
    poll: Duration,
    started: Option<Instant>,
}

impl ProofWait {
    pub fn new(timeout: Duration, poll: Duration) -> ProofWait {
        ProofWait {
            timeout,
            poll,
            started: None,
        }
    }

    /// A mismatch is refused at once; waiting does not make it right.
    pub(crate) fn next(&mut self, v: Verdict, now: Instant) -> Next {
        let started = *self.started.get_or_insert(now);
        match v {
            Verdict::Proven(k) => Next::Trust(k),
            Verdict::Mismatch { network, console } => Next::Refuse { network, console },
            Verdict::NotYet(missing) => {
                let end = started + self.timeout;
                if now >= end {
                    Next::GiveUp(missing)
                } else {
                    Next::AskAt((now + self.poll).min(end))
                }
            }
        }
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// The `known_hosts` host field for `host:port` as ssh looks it up.
pub(crate) fn known_hosts_host(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// `known_hosts` lines for `keys` at `host:port`.
pub(crate) fn known_hosts_lines(host: &str, port: u16, keys: &[HostKey]) -> Vec<String> {
    let h = known_hosts_host(host, port);
    keys.iter()
        .map(|k| format!("{h} {}", k.openssh()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with `ssh-keygen -t ed25519` for these tests.
    const ED_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEL36Uace7T+J22b0MAQXiQZ3RGz0dFYkxEklH/D6/fp";
    const ED_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJGrYlUZYBkapeq0uC0oYDKzww12RL0sKFNIXEFu6MzE";

    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCpFsf9LYyP2/lXorN76+hFHzI6Jtws8E+rZz3eYOrjS5JfrSOPTcKQxAuVs7ZwOO9H1MJdawLniV4BfuE32DrivDU93jEosBAxAN/DywoMczRyb9Ce4CEIu8SjW+Q280LyO/bEIeQOR2vD3ILekGJA06p4nK2+RDb+VbiVxlwlEw==";

    fn k(s: &str) -> HostKey {
        HostKey::parse(s).unwrap()
    }

    #[test]
    fn dropbearkey_and_openssh_answers() {
        let text = format!(
            "{ED_A} root@board\nPublic key portion is:\n{ED_A} root@sbcflash-test\nFingerprint: SHA256:x\n"
        );
        let keys = parse_console(&text).unwrap();
        assert_eq!(keys, vec![k(ED_A)]);
        assert!(keys[0].fingerprint.starts_with("SHA256:"));
        assert!(parse_console("Public key portion is:\n")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn garbled_key_lines_are_unclean() {
        // cut short, a byte lost in the middle, and key data of another algorithm
        assert!(parse_console(&ED_A[..60]).is_err());
        let lost = format!("{}{}", &ED_A[..40], &ED_A[41..]);
        assert!(parse_console(&lost).is_err());
        let other = ED_A.replace("ssh-ed25519 ", "ssh-rsa ");
        assert!(parse_console(&other).is_err());
    }

    #[test]
    fn keyscan_lines() {
        let l = vec![format!("[127.0.0.1]:2222 {ED_A}")];
        assert_eq!(parse_keyscan(&l).unwrap(), vec![k(ED_A)]);
        assert!(parse_keyscan(&["oops".to_string()]).is_err());
    }

    #[test]
    fn comparisons() {
        let (a, b, r) = (vec![k(ED_A)], vec![k(ED_B)], vec![k(RSA)]);
        let both = |x: &[HostKey], y: &[HostKey]| [x, y].concat();
        assert_eq!(compare(&a, &a), Verdict::Proven(a.clone()));
        // the console vouches for all its keys; the network offered one of them
        assert_eq!(compare(&both(&a, &r), &r), Verdict::Proven(both(&a, &r)));
        assert!(matches!(
            compare(&both(&b, &r), &both(&r, &a)),
            Verdict::Mismatch { .. }
        ));
        assert!(matches!(compare(&a, &b), Verdict::Mismatch { .. }));
        assert_eq!(
            compare(&[], &a),
            Verdict::NotYet(vec!["ssh-ed25519".into()])
        );
        assert_eq!(compare(&a, &[]), Verdict::NotYet(vec!["any".into()]));
    }

    #[test]
    fn waiting_has_a_deadline_and_mismatch_does_not_wait() {
        let t0 = Instant::now();
        let mut w = ProofWait::new(Duration::from_secs(10), Duration::from_secs(1));
        let nv = || Verdict::NotYet(vec!["ssh-ed25519".into()]);
        assert_eq!(w.next(nv(), t0), Next::AskAt(t0 + Duration::from_secs(1)));
        assert_eq!(
            w.next(nv(), t0 + Duration::from_millis(9500)),
            Next::AskAt(t0 + Duration::from_secs(10))
        );
        assert_eq!(
            w.next(nv(), t0 + Duration::from_secs(10)),
            Next::GiveUp(vec!["ssh-ed25519".into()])
        );
        let (a, b) = (k(ED_A), k(ED_B));
        let mut w = ProofWait::new(Duration::from_secs(10), Duration::from_secs(1));
        assert!(matches!(
            w.next(compare(&[a], &[b]), t0),
            Next::Refuse { .. }
        ));
    }

    #[test]
    fn known_hosts_host_field() {
        let a = k(ED_A);
        assert_eq!(
            known_hosts_lines("127.0.0.1", 2222, std::slice::from_ref(&a)),
            vec![format!("[127.0.0.1]:2222 {ED_A}")]
        );
        assert_eq!(
            known_hosts_lines("b1", 22, &[a]),
            vec![format!("b1 {ED_A}")]
        );
    }
}
