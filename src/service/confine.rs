//! What a destination accepts from a source: every entry a Load creates
//! must belong to the VM the Load is addressed to, and carry only what the
//! destination allows (docs/trust-model.md). The blob is the source's word,
//! and the source may be a compromised host or whoever can call Load; this
//! is where its word stops.

use crate::entry::{proto, status, tcp_state, Entry, Selector};

/// Conntrack helpers a restored entry may name unless the registration
/// lists its own (`helpers`): the kernel's in-tree helpers for protocols a
/// guest plausibly runs through a host firewall. Naming any other helper
/// makes the kernel load the module `nfct-helper-<name>` (request_module),
/// which a source must not be able to choose. H.323's helpers are "RAS"
/// and "Q.931" in the kernel.
pub const DEFAULT_HELPERS: [&str; 11] = [
    "ftp",
    "tftp",
    "sip",
    "irc",
    "amanda",
    "sane",
    "pptp",
    "snmp",
    "netbios-ns",
    "RAS",
    "Q.931",
];

/// `NF_CT_HELPER_NAME_LEN` minus the NUL: a longer name cannot exist in the
/// kernel and the helper protocol refuses it (`wire::MAX_HELPER_NAME`).
pub const MAX_HELPER_NAME: usize = 15;

/// Longest remaining lifetime a restored entry gets: the kernel's default
/// for TCP ESTABLISHED (5 days), the longest default any state has. A
/// larger timeout is lowered to it; traffic extends the entry as usual.
pub const TIMEOUT_CEILING_SECS: u32 = 432_000;

/// Status bits a restored entry keeps: what the kernel lets one set on
/// create (SEEN_REPLY, ASSURED, FIXED_TIMEOUT) and the NAT bits the codec
/// turns into an exact NAT binding. Everything else is host-local or
/// derived by the kernel.
pub const KEPT_STATUS: u32 = status::SEEN_REPLY
    | status::ASSURED
    | status::FIXED_TIMEOUT
    | status::CONFIRMED
    | status::SRC_NAT
    | status::DST_NAT
    | status::SRC_NAT_DONE
    | status::DST_NAT_DONE
    | status::SEQ_ADJUST;

/// Why an entry of a Load is not created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not the VM's: its mark under the mask or its zone is another's.
    Foreign,
    /// The VM's, but carrying what the destination does not accept.
    Rejected(&'static str),
}

/// The destination's rules for one VM's Load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadPolicy {
    /// The registration's selector: the mark under the mask, and the zone.
    pub selector: Selector,
    /// Entries arriving in zone `.0` are created in zone `.1` (the
    /// registration's zone): zones are numbered per host.
    pub zone_map: Option<(u16, u16)>,
    /// Helper names allowed on restored entries.
    pub helpers: Vec<String>,
}

impl LoadPolicy {
    /// The default rules for `selector`: no remap, [`DEFAULT_HELPERS`].
    pub fn new(selector: Selector) -> LoadPolicy {
        LoadPolicy {
            selector,
            zone_map: None,
            helpers: DEFAULT_HELPERS.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The entry as the destination creates it, or why it is not created.
    /// Attributes the destination does not take from a source are lowered
    /// (timeout, status bits, sequence adjustment without NAT); what it
    /// cannot lower without changing whose entry it is, or what the kernel
    /// would do for it, refuses the entry.
    pub fn admit(&self, mut e: Entry) -> Result<Entry, Refusal> {
        if let Some((from, to)) = self.zone_map {
            let map = |z: &mut u16| {
                if *z == from {
                    *z = to;
                }
            };
            map(&mut e.zone);
            if let Some(z) = e.orig.zone.as_mut() {
                map(z);
            }
            if let Some(z) = e.reply.zone.as_mut() {
                map(z);
            }
        }
        if !self.selector.admits(&e) {
            return Err(Refusal::Foreign);
        }
        if e.orig.proto != e.reply.proto {
            return Err(Refusal::Rejected("reply protocol differs"));
        }
        let fam = |a: &std::net::IpAddr| a.is_ipv6();
        let v6 = fam(&e.orig.src);
        if [e.orig.dst, e.reply.src, e.reply.dst]
            .iter()
            .any(|a| fam(a) != v6)
        {
            return Err(Refusal::Rejected("address families mixed"));
        }
        if e.status & (status::EXPECTED | status::DYING) != 0 {
            // The kernel refuses both on create (EBUSY); an expectation's
            // connection is re-created by its master's helper if at all.
            return Err(Refusal::Rejected("expected or dying"));
        }
        if let Some(h) = &e.helper {
            if h.is_empty() || h.len() > MAX_HELPER_NAME {
                return Err(Refusal::Rejected("helper name length"));
            }
            if !self.helpers.iter().any(|a| a == h) {
                return Err(Refusal::Rejected("helper not allowed"));
            }
        }
        e.status &= KEPT_STATUS;
        let nat = e.is_nat() || e.status & (status::SRC_NAT | status::DST_NAT) != 0;
        if !nat || e.orig.proto != proto::TCP {
            // Sequence adjustment belongs to a NAT helper's payload
            // rewriting of a TCP stream; without NAT it would only shift
            // the sequence numbers the kernel checks.
            e.seq_adj_orig = None;
            e.seq_adj_reply = None;
            e.status &= !status::SEQ_ADJUST;
        }
        e.timeout = e.timeout.min(TIMEOUT_CEILING_SECS);
        if let Some(crate::entry::ProtoInfo::Tcp { state, .. }) = e.protoinfo {
            if usize::from(state) >= tcp_state::NAMES.len() {
                return Err(Refusal::Rejected("unknown TCP state"));
            }
        }
        // Host-local: never taken from a source.
        e.id = None;
        Ok(e)
    }
}

/// Counts of what [`LoadPolicy::admit`] refused during one Load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refused {
    pub foreign: u64,
    pub rejected: u64,
    /// (reason, count) of the rejections, for the journal.
    pub rejected_by: Vec<(&'static str, u64)>,
}

impl Refused {
    pub fn add(&mut self, r: Refusal) {
        match r {
            Refusal::Foreign => self.foreign += 1,
            Refusal::Rejected(why) => {
                self.rejected += 1;
                match self.rejected_by.iter_mut().find(|(w, _)| *w == why) {
                    Some((_, n)) => *n += 1,
                    None => self.rejected_by.push((why, 1)),
                }
            }
        }
    }

    /// `2× helper not allowed, 1× expected or dying`.
    pub fn reasons(&self) -> String {
        self.rejected_by
            .iter()
            .map(|(w, n)| format!("{n}× {w}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Part of the host's table one VM may fill with a Load: half of
/// `nf_conntrack_max`, so that a hostile or oversized Load always leaves
/// the host and the other VMs room for new connections. Not less: the
/// stock table of a big host is 262,144 entries, and a VM with 100,000
/// connections must arrive whole there without tuning.
pub const CONNTRACK_MAX_DIVISOR: u64 = 2;

/// Default per-VM entry cap of a Load, below the fraction of the table.
/// 256Ki entries is more than any VM measured here keeps (the state
/// format's QEMU limit holds ~100k–200k real entries).
pub const DEFAULT_MAX_ENTRIES: u64 = 262_144;

/// Where the kernel publishes the table size, in the network namespace of
/// the reading process. The value is one host-wide number (only the initial
/// namespace may change it), so the daemon reads it in its own namespace
/// even when the helper does the conntrack work.
pub const CONNTRACK_MAX_PATH: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// `nf_conntrack_max`, or `None` when conntrack is not loaded (the file is
/// absent) or the value is unreadable. Either is said once per process, so
/// the journal shows which bound a Load applies (a unit that hides
/// /proc/sys leaves only the configured cap).
pub fn conntrack_max() -> Option<u64> {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let r = std::fs::read_to_string(CONNTRACK_MAX_PATH)
        .map_err(|e| e.to_string())
        .and_then(|t| t.trim().parse::<u64>().map_err(|e| e.to_string()));
    match r {
        Ok(n) => {
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!(
                    "nf_conntrack_max is {n}: each Load creates at most {} entries per VM \
                     (half of it) or the VM's configured cap, whichever is lower",
                    (n / CONNTRACK_MAX_DIVISOR).max(1)
                );
            }
            Some(n)
        }
        Err(e) => {
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!(
                    "{CONNTRACK_MAX_PATH} is not readable ({e}): each Load is capped by the \
                     configured per-VM entry cap only"
                );
            }
            None
        }
    }
}

/// The cap a Load applies: the configured one, bounded by
/// `conntrack_max / CONNTRACK_MAX_DIVISOR` when that is known (at least 1).
pub fn effective_cap(configured: u64, conntrack_max: Option<u64>) -> u64 {
    match conntrack_max {
        Some(m) => configured.min((m / CONNTRACK_MAX_DIVISOR).max(1)),
        None => configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{Tuple, L4};
    use std::net::{IpAddr, Ipv4Addr};

    fn entry(mark: u32, zone: u16) -> Entry {
        let orig = Tuple {
            src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            dst: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            proto: proto::TCP,
            l4: L4::Ports { src: 1000, dst: 80 },
            zone: None,
        };
        Entry {
            orig,
            reply: orig.inverse(),
            status: status::SEEN_REPLY | status::ASSURED | status::CONFIRMED,
            timeout: 100,
            mark,
            zone,
            labels: None,
            protoinfo: None,
            seq_adj_orig: None,
            seq_adj_reply: None,
            helper: None,
            id: Some(7),
        }
    }

    fn sel(mark: u32, mask: u32, zone: Option<u16>) -> Selector {
        Selector {
            mark,
            mark_mask: mask,
            zone,
        }
    }

    #[test]
    fn foreign_marks_and_zones_are_refused() {
        let p = LoadPolicy::new(sel(100, u32::MAX, None));
        assert_eq!(p.admit(entry(200, 0)), Err(Refusal::Foreign));
        assert!(p.admit(entry(100, 0)).is_ok());
        // No zone registered: any zone (the source saved any zone).
        assert!(p.admit(entry(100, 9)).is_ok());
        let p = LoadPolicy::new(sel(0x100, 0xff00, Some(5)));
        assert!(p.admit(entry(0x1ab, 5)).is_ok());
        assert_eq!(p.admit(entry(0x200, 5)), Err(Refusal::Foreign));
        assert_eq!(p.admit(entry(0x100, 0)), Err(Refusal::Foreign));
        let mut e = entry(0x100, 5);
        e.reply.zone = Some(6);
        assert_eq!(p.admit(e), Err(Refusal::Foreign));
    }

    #[test]
    fn zone_map_moves_the_source_zone() {
        let mut p = LoadPolicy::new(sel(100, u32::MAX, Some(7)));
        p.zone_map = Some((3, 7));
        let got = p.admit(entry(100, 3)).unwrap();
        assert_eq!(got.zone, 7);
        assert!(p.admit(entry(100, 7)).is_ok());
        assert_eq!(p.admit(entry(100, 4)), Err(Refusal::Foreign));
    }

    #[test]
    fn attributes_are_lowered_or_refused() {
        let p = LoadPolicy::new(sel(100, u32::MAX, None));
        let mut e = entry(100, 0);
        e.timeout = 99 * 86_400;
        e.status |= status::OFFLOAD | status::TEMPLATE | status::FIXED_TIMEOUT;
        e.seq_adj_orig = Some(crate::entry::SeqAdj {
            correction_pos: 1,
            offset_before: 2,
            offset_after: 3,
        });
        let got = p.admit(e).unwrap();
        assert_eq!(got.timeout, TIMEOUT_CEILING_SECS);
        assert_eq!(
            got.status,
            status::SEEN_REPLY | status::ASSURED | status::CONFIRMED | status::FIXED_TIMEOUT
        );
        assert_eq!(got.seq_adj_orig, None);
        assert_eq!(got.id, None);
        let mut e = entry(100, 0);
        e.status |= status::EXPECTED;
        assert_eq!(p.admit(e), Err(Refusal::Rejected("expected or dying")));
        let mut e = entry(100, 0);
        e.helper = Some("x".repeat(16));
        assert_eq!(p.admit(e), Err(Refusal::Rejected("helper name length")));
        let mut e = entry(100, 0);
        e.helper = Some("evil".into());
        assert_eq!(p.admit(e), Err(Refusal::Rejected("helper not allowed")));
        let mut e = entry(100, 0);
        e.helper = Some("ftp".into());
        assert_eq!(p.admit(e).unwrap().helper.as_deref(), Some("ftp"));
    }

    #[test]
    fn cap_is_bounded_by_the_table() {
        assert_eq!(effective_cap(1000, None), 1000);
        assert_eq!(effective_cap(1_000_000, Some(262_144)), 131_072);
        assert_eq!(effective_cap(10, Some(262_144)), 10);
        assert_eq!(effective_cap(10, Some(0)), 1);
    }
}
