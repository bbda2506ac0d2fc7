//! Who may see and log in to which iSCSI target: the `[iscsi_access]` section of the daemon's
//! config, checked once at start-up and turned into the login machine's [`TargetInfo`].
//!
//! Defaults: every clone is a target, open to every initiator and address without CHAP (like
//! the NBD listener); snapshots are not exported. Rules (docs/iscsi.md):
//!
//! ```toml
//! [iscsi_access]
//! snapshots = true                      # export VOLUME@N as iqn.2026-11.dev.forkd:VOLUME:snap-N
//! discovery_chap = { user = "disc", secret = "0x00112233445566778899aabb" }
//!
//! [iscsi_access.default]                # every target without its own entry
//! initiators = ["iqn.1994-05.com.redhat:db1"]
//! addresses = ["10.0.0.0/8", "127.0.0.1"]
//! chap = { user = "alice", secret = "twelve+bytes!", mutual_user = "forkd", mutual_secret = "0bc2VjcmV0c2VjcmV0" }
//!
//! [iscsi_access.targets.dev1]           # by volume name
//! initiators = []                       # empty: any initiator
//! ```
//!
//! A secret is hex (`0x…`), base64 (`0b…`) or else its UTF-8 bytes; at least 12 bytes (RFC
//! 7143 §12.1.3); a mutual secret must differ from the initiator's.

use std::collections::BTreeMap;
use std::net::IpAddr;

use iscsi::keys::decode_binary;
use iscsi::login::{ChapConfig, ChapCredentials, Secret, TargetInfo};
use serde::Deserialize;

use crate::store::exports::{split_key, KEY_MARK};

/// The `[iscsi_access]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IscsiAccess {
    /// Export every snapshot read-only as its own target.
    pub snapshots: bool,
    /// CHAP required for discovery sessions.
    pub discovery_chap: Option<Chap>,
    /// Rules of every target without its own entry.
    pub default: Rule,
    /// Rules by volume name.
    pub targets: BTreeMap<String, Rule>,
}

/// Access rules of one target.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rule {
    /// Initiator names allowed to log in; empty allows any.
    pub initiators: Vec<String>,
    /// Addresses (`192.0.2.7`, `10.0.0.0/8`, `::1`, `fd00::/8`) allowed; empty allows any.
    pub addresses: Vec<String>,
    /// CHAP required when set.
    pub chap: Option<Chap>,
}

/// CHAP names and secrets, one pair per direction.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chap {
    /// The name the initiator gives (CHAP_N).
    pub user: String,
    /// The secret the initiator proves it knows.
    pub secret: String,
    /// The name forkd answers with when the initiator asks for mutual CHAP.
    pub mutual_user: Option<String>,
    /// The secret forkd proves it knows (mutual CHAP); refused when not set.
    pub mutual_secret: Option<String>,
}

/// The prefix of every forkd target name.
pub const IQN_PREFIX: &str = "iqn.2026-11.dev.forkd:";

/// The target name of a volume (`dev1`) or snapshot export (`dev1@3`).
pub fn target_name(reference: &str) -> String {
    match reference.split_once('@') {
        Some((v, n)) => format!("{IQN_PREFIX}{v}:snap-{n}"),
        None => format!("{IQN_PREFIX}{reference}"),
    }
}

/// The volume or snapshot reference (`dev1`, `dev1@3`) a target name stands for. IQNs compare
/// case-insensitively, so the prefix does too; the volume part is returned as given. A hook's
/// capability name keeps its key: `iqn.2026-11.dev.forkd:dev1:key-K` gives `dev1:key-K`
/// (see [`crate::store::exports`]).
pub fn reference_of(target: &str) -> Option<String> {
    let prefix = target.get(..IQN_PREFIX.len())?;
    if !prefix.eq_ignore_ascii_case(IQN_PREFIX) {
        return None;
    }
    let (rest, key) = split_key(&target[IQN_PREFIX.len()..]);
    let reference = match rest.split_once(":snap-") {
        Some((v, n)) if !v.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{v}@{n}")
        }
        Some(_) => return None,
        None if !rest.is_empty() && !rest.contains([':', '@']) => rest.to_string(),
        None => return None,
    };
    Some(match key {
        Some(k) => format!("{reference}{KEY_MARK}{k}"),
        None => reference,
    })
}

fn secret(what: &str, s: &str) -> anyhow::Result<Secret> {
    let bytes = if s.starts_with("0x") || s.starts_with("0X") || s.starts_with("0b") || s.starts_with("0B") {
        decode_binary(s).ok_or_else(|| anyhow::anyhow!("{what}: not valid hex (0x...) or base64 (0b...)"))?
    } else {
        s.as_bytes().to_vec()
    };
    if bytes.len() < 12 {
        anyhow::bail!("{what}: a CHAP secret needs at least 12 bytes (RFC 7143 §12.1.3), this one has {}", bytes.len());
    }
    Ok(Secret(bytes))
}

impl Chap {
    fn config(&self, what: &str) -> anyhow::Result<ChapConfig> {
        let initiator =
            ChapCredentials { name: self.user.clone(), secret: secret(&format!("{what}.secret"), &self.secret)? };
        let target = match (&self.mutual_user, &self.mutual_secret) {
            (None, None) => None,
            (Some(name), Some(s)) => {
                let secret = secret(&format!("{what}.mutual_secret"), s)?;
                if secret == initiator.secret {
                    anyhow::bail!("{what}: mutual_secret must differ from secret");
                }
                Some(ChapCredentials { name: name.clone(), secret })
            }
            _ => anyhow::bail!("{what}: give both mutual_user and mutual_secret, or neither"),
        };
        Ok(ChapConfig { initiator, target })
    }
}

/// One address rule: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net(IpAddr, u8);

impl Net {
    fn parse(s: &str) -> anyhow::Result<Net> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| anyhow::anyhow!("address {s:?}: not an IP address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= max)
                .ok_or_else(|| anyhow::anyhow!("address {s:?}: bad prefix length"))?,
            None => max,
        };
        Ok(Net(addr, len))
    }

    fn contains(&self, peer: IpAddr) -> bool {
        let peer = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
            p => p,
        };
        match (self.0, peer) {
            (IpAddr::V4(n), IpAddr::V4(p)) => prefix_eq(&n.octets(), &p.octets(), self.1),
            (IpAddr::V6(n), IpAddr::V6(p)) => prefix_eq(&n.octets(), &p.octets(), self.1),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = usize::from(bits);
    let (whole, rest) = (bits / 8, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a[whole] & mask == b[whole] & mask
}

/// A checked rule, ready for logins.
#[derive(Debug, Clone)]
struct Checked {
    initiators: Vec<String>,
    nets: Vec<Net>,
    chap: Option<ChapConfig>,
}

impl Checked {
    fn new(r: &Rule, what: &str) -> anyhow::Result<Checked> {
        let nets = r.addresses.iter().map(|a| Net::parse(a)).collect::<anyhow::Result<_>>()?;
        let chap = r.chap.as_ref().map(|c| c.config(&format!("{what}.chap"))).transpose()?;
        Ok(Checked { initiators: r.initiators.clone(), nets, chap })
    }

    fn address_allowed(&self, peer: IpAddr) -> bool {
        self.nets.is_empty() || self.nets.iter().any(|n| n.contains(peer))
    }

    fn initiator_allowed(&self, name: &str) -> bool {
        self.initiators.is_empty() || self.initiators.iter().any(|i| i.eq_ignore_ascii_case(name))
    }
}

/// The access rules in force, checked.
#[derive(Debug, Clone)]
pub struct AccessRules {
    /// Snapshots are exported.
    pub snapshots: bool,
    /// CHAP for discovery sessions.
    pub discovery_chap: Option<ChapConfig>,
    default: Checked,
    targets: BTreeMap<String, Checked>,
}

impl AccessRules {
    /// Checks the configured rules; errors name the offending key.
    pub fn new(a: &IscsiAccess) -> anyhow::Result<AccessRules> {
        let discovery_chap = a.discovery_chap.as_ref().map(|c| c.config("iscsi_access.discovery_chap")).transpose()?;
        let default = Checked::new(&a.default, "iscsi_access.default")?;
        let mut targets = BTreeMap::new();
        for (name, r) in &a.targets {
            targets.insert(name.clone(), Checked::new(r, &format!("iscsi_access.targets.{name}"))?);
        }
        Ok(AccessRules { snapshots: a.snapshots, discovery_chap, default, targets })
    }

    fn rule(&self, volume: &str) -> &Checked {
        self.targets.get(volume).unwrap_or(&self.default)
    }

    /// Whether nothing restricts access (no CHAP, no lists): worth a warning off loopback.
    pub fn is_open(&self) -> bool {
        let open = |c: &Checked| c.chap.is_none() && c.initiators.is_empty() && c.nets.is_empty();
        open(&self.default) && self.targets.values().all(open)
    }

    /// What the login learns about the target exporting `reference` when `peer` connects. A
    /// peer whose address the rules refuse gets an allow-list no initiator name can match
    /// (InitiatorName is never empty), so the login fails with 0x0202 like a refused name.
    pub fn target_info(&self, reference: &str, peer: IpAddr) -> TargetInfo {
        let volume = reference.split('@').next().unwrap_or(reference);
        let r = self.rule(volume);
        let allowed_initiators = if r.address_allowed(peer) { r.initiators.clone() } else { vec![String::new()] };
        TargetInfo {
            name: target_name(reference),
            alias: Some(reference.to_string()),
            allowed_initiators,
            chap: r.chap.clone(),
        }
    }

    /// Whether a discovery session of `initiator` from `peer` lists `reference`.
    pub fn visible(&self, reference: &str, initiator: &str, peer: IpAddr) -> bool {
        let volume = reference.split('@').next().unwrap_or(reference);
        let r = self.rule(volume);
        r.address_allowed(peer) && r.initiator_allowed(initiator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(target_name("dev1"), "iqn.2026-11.dev.forkd:dev1");
        assert_eq!(target_name("dev1@3"), "iqn.2026-11.dev.forkd:dev1:snap-3");
        assert_eq!(reference_of("iqn.2026-11.dev.forkd:dev1").as_deref(), Some("dev1"));
        assert_eq!(reference_of("IQN.2026-11.DEV.FORKD:dev1:snap-3").as_deref(), Some("dev1@3"));
        for bad in [
            "iqn.2026-11.dev.forkd:",
            "iqn.2026-11.dev.other:dev1",
            "iqn.2026-11.dev.forkd:a:snap-",
            "iqn.2026-11.dev.forkd:a:b",
            "iqn.2026-11.dev.forkd:a@1",
            "x",
        ] {
            assert_eq!(reference_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn addresses() {
        let n = Net::parse("10.0.0.0/8").unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        let one = Net::parse("192.0.2.7").unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()) && !one.contains("192.0.2.8".parse().unwrap()));
        let v6 = Net::parse("fd00::/12").unwrap();
        assert!(v6.contains("fd0f::1".parse().unwrap()) && !v6.contains("fd10::1".parse().unwrap()));
        assert!(Net::parse("10.0.0.0/33").is_err());
        assert!(Net::parse("host.example").is_err());
    }

    #[test]
    fn rules_and_secrets() {
        let text = r#"
            snapshots = true
            [default]
            initiators = ["iqn.x:a"]
            addresses = ["127.0.0.0/8"]
            chap = { user = "u", secret = "0x00112233445566778899aabb", mutual_user = "t", mutual_secret = "another-secret" }
            [targets.open]
        "#;
        let a: IscsiAccess = toml::from_str(text).unwrap();
        let r = AccessRules::new(&a).unwrap();
        assert!(r.snapshots && !r.is_open());
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let far: IpAddr = "192.0.2.1".parse().unwrap();
        let t = r.target_info("dev1@2", lo);
        assert_eq!(t.name, "iqn.2026-11.dev.forkd:dev1:snap-2");
        assert_eq!(t.allowed_initiators, vec!["iqn.x:a".to_string()]);
        assert_eq!(t.chap.as_ref().unwrap().initiator.secret.0.len(), 12);
        assert_eq!(r.target_info("dev1", far).allowed_initiators, vec![String::new()]);
        assert!(r.target_info("open", far).chap.is_none());
        assert!(
            r.visible("dev1", "IQN.X:A", lo) && !r.visible("dev1", "iqn.x:b", lo) && !r.visible("dev1", "iqn.x:a", far)
        );
        assert!(r.visible("open", "anyone", far));

        let short: IscsiAccess = toml::from_str("[default]\nchap = { user = \"u\", secret = \"short\" }").unwrap();
        let e = AccessRules::new(&short).unwrap_err().to_string();
        assert!(e.contains("iscsi_access.default.chap.secret") && e.contains("12 bytes"), "{e}");
        let same: IscsiAccess = toml::from_str(
            "[default]\nchap = { user = \"u\", secret = \"twelve-bytes\", mutual_user = \"t\", mutual_secret = \"twelve-bytes\" }",
        )
        .unwrap();
        assert!(AccessRules::new(&same).unwrap_err().to_string().contains("must differ"));
        let half: IscsiAccess =
            toml::from_str("[default]\nchap = { user = \"u\", secret = \"twelve-bytes\", mutual_user = \"t\" }")
                .unwrap();
        assert!(AccessRules::new(&half).unwrap_err().to_string().contains("both"));
        let bad: IscsiAccess = toml::from_str("[default]\naddresses = [\"nowhere\"]").unwrap();
        assert!(AccessRules::new(&bad).unwrap_err().to_string().contains("nowhere"));
    }
}
