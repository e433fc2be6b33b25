//! Truncation priority: which entries are worth carrying when not all fit.
//!
//! The same order serves the encoder (it keeps the most valuable prefix) and
//! the load path (it creates the most valuable entries first, so a partial
//! load still restores what matters). See `docs/state-format.md`, "Priority".

use crate::entry::{proto, status, tcp_flag, tcp_state, Entry, ProtoInfo};

/// Entries with at most this many seconds left are "about to expire": by
/// the time the destination resumes the guest they are (nearly) gone.
pub const ABOUT_TO_EXPIRE_SECS: u32 = 10;

/// Value classes, lowest dropped first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ValueClass {
    /// About to expire, or carrying the EXPECTED bit the kernel refuses on
    /// create: restoring these gains nothing.
    Worthless = 0,
    /// The flow is ending: TCP FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT,
    /// CLOSE; SCTP shutdown states; DCCP CLOSEREQ/CLOSING/TIMEWAIT.
    Closing = 1,
    /// No reply seen yet (SEEN_REPLY clear): SYN_SENT, unanswered UDP.
    Unreplied = 2,
    /// Replied but not (yet) ASSURED.
    Replied = 3,
    /// ASSURED: established flows whose loss the guest would notice.
    Assured = 4,
    /// ASSURED TCP ESTABLISHED with data in flight (`DATA_UNACKNOWLEDGED`
    /// in either direction): a flow busy at the very moment of the Save.
    /// Its timeout is the kernel's short unacknowledged one (300 s), so by
    /// time left it would rank behind every idle established flow (up to
    /// 5 days left) and, at 100k entries, miss Load's synchronous part: a
    /// booted guest's bulk, interactive and NAT'ed TCP flows then stalled
    /// for seconds after the switchover (tests/guest/run). A property of
    /// the entry, not of its timeout, so ageing keeps the order.
    Active = 5,
}

/// The value class of one entry.
pub fn value_class(e: &Entry) -> ValueClass {
    value_class_at(e, e.timeout)
}

/// The value class of `e` if `timeout` seconds were left (the warm cache
/// encodes its entries with the remaining time at Save, without copying
/// them to change the field).
pub fn value_class_at(e: &Entry, timeout: u32) -> ValueClass {
    if timeout <= ABOUT_TO_EXPIRE_SECS || e.status & status::EXPECTED != 0 {
        return ValueClass::Worthless;
    }
    if is_closing(e) {
        return ValueClass::Closing;
    }
    if e.status & status::SEEN_REPLY == 0 {
        return ValueClass::Unreplied;
    }
    if e.status & status::ASSURED == 0 {
        return ValueClass::Replied;
    }
    if is_busy(e) {
        return ValueClass::Active;
    }
    ValueClass::Assured
}

fn is_busy(e: &Entry) -> bool {
    match e.protoinfo {
        Some(ProtoInfo::Tcp {
            state,
            flags_orig,
            flags_reply,
            ..
        }) if e.orig.proto == proto::TCP => {
            state == tcp_state::ESTABLISHED
                && (flags_orig | flags_reply) & tcp_flag::DATA_UNACKNOWLEDGED != 0
        }
        _ => false,
    }
}

fn is_closing(e: &Entry) -> bool {
    match e.protoinfo {
        Some(ProtoInfo::Tcp { state, .. }) if e.orig.proto == proto::TCP => matches!(
            state,
            tcp_state::FIN_WAIT
                | tcp_state::CLOSE_WAIT
                | tcp_state::LAST_ACK
                | tcp_state::TIME_WAIT
                | tcp_state::CLOSE
        ),
        // SCTP: SHUTDOWN_SENT 5, SHUTDOWN_RECD 6, SHUTDOWN_ACK_SENT 7, CLOSED 1.
        Some(ProtoInfo::Sctp { state, .. }) => matches!(state, 1 | 5 | 6 | 7),
        // DCCP: CLOSEREQ 5, CLOSING 6, TIMEWAIT 7.
        Some(ProtoInfo::Dccp { state, .. }) => matches!(state, 5..=7),
        _ => false,
    }
}

/// Sort key: larger is more valuable. Class first, then remaining timeout
/// (the longest-idle entry of a class has the least time left and goes
/// first).
pub fn value_key(e: &Entry) -> u64 {
    value_key_at(e, e.timeout)
}

/// [`value_key`] with `timeout` seconds left.
pub fn value_key_at(e: &Entry, timeout: u32) -> u64 {
    ((value_class_at(e, timeout) as u64) << 32) | u64::from(timeout)
}

/// Bits of a value key: class (3) above a 32-bit timeout.
const KEY_BITS: u32 = 35;
/// Bits left for the index when key and index share one `u64`.
const INDEX_BITS: u32 = 64 - KEY_BITS;

/// Indices of the entries `include` accepts, most valuable first, ties in
/// input order. The inverted key and the index are packed into one `u64`
/// (sorting 8-byte integers is about twice as fast as 16-byte pairs, a few
/// ms of Save at 100k entries); the same order as sorting
/// `(!value_key, index)` pairs, which is the fallback for inputs too large
/// to pack.
pub(crate) fn ranked_indices(entries: &[Entry], include: impl Fn(&Entry) -> bool) -> Vec<u32> {
    if entries.len() < (1usize << INDEX_BITS) {
        let inv = |e: &Entry| (!value_key(e)) & ((1u64 << KEY_BITS) - 1);
        let mut packed: Vec<u64> = entries
            .iter()
            .zip(0u64..)
            .filter(|(e, _)| include(e))
            .map(|(e, i)| (inv(e) << INDEX_BITS) | i)
            .collect();
        radix_sort_keys(&mut packed);
        let mask = (1u64 << INDEX_BITS) - 1;
        return packed.into_iter().map(|p| (p & mask) as u32).collect();
    }
    let mut keyed: Vec<(u64, u32)> = entries
        .iter()
        .zip(0u32..)
        .filter(|(e, _)| include(e))
        .map(|(e, i)| (!value_key(e), i))
        .collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// Sorts packed `key << INDEX_BITS | index` values by their key bits only,
/// keeping input order among equal keys: an LSD radix sort in three passes
/// of 12 bits, a few times faster than a comparison sort at 100k entries
/// (that time is migration downtime).
fn radix_sort_keys(v: &mut Vec<u64>) {
    const DIGIT: u32 = 12;
    const BUCKETS: usize = 1 << DIGIT;
    if v.len() < 4096 {
        // Equal keys keep their order: the index bits are in input order.
        v.sort_unstable();
        return;
    }
    let mut tmp = vec![0u64; v.len()];
    let mut shift = INDEX_BITS;
    while shift < 64 {
        let mut count = vec![0usize; BUCKETS + 1];
        for &x in v.iter() {
            count[((x >> shift) as usize & (BUCKETS - 1)) + 1] += 1;
        }
        // A pass where every value has the same digit changes nothing.
        if count.contains(&v.len()) {
            shift += DIGIT;
            continue;
        }
        for i in 1..=BUCKETS {
            count[i] += count[i - 1];
        }
        for &x in v.iter() {
            let d = (x >> shift) as usize & (BUCKETS - 1);
            tmp[count[d]] = x;
            count[d] += 1;
        }
        std::mem::swap(v, &mut tmp);
        shift += DIGIT;
    }
}

/// The key of an entry the encoder leaves out (one the format cannot
/// represent): [`ranked_by_key`] skips it.
pub(crate) const EXCLUDED_KEY: u64 = u64::MAX;

/// Positions in a sequence of `len` precomputed value keys, most valuable
/// first, ties in input order, without the [`EXCLUDED_KEY`] ones (the
/// encoder's views carry their keys, so ranking reads nothing else).
pub(crate) fn ranked_by_key(len: usize, keys: impl Iterator<Item = u64>) -> Vec<u32> {
    let included = keys.zip(0u64..).filter(|&(k, _)| k != EXCLUDED_KEY);
    if len >= (1usize << INDEX_BITS) {
        let mut keyed: Vec<(u64, u32)> = included.map(|(k, i)| (!k, i as u32)).collect();
        keyed.sort_unstable();
        return keyed.into_iter().map(|(_, i)| i).collect();
    }
    let mut packed: Vec<u64> = included
        .map(|(k, i)| (((!k) & ((1u64 << KEY_BITS) - 1)) << INDEX_BITS) | i)
        .collect();
    radix_sort_keys(&mut packed);
    let mask = (1u64 << INDEX_BITS) - 1;
    packed.into_iter().map(|p| (p & mask) as u32).collect()
}

/// Indices of `entries`, most valuable first. Ties keep input order, so the
/// result is deterministic.
pub fn priority_order(entries: &[Entry]) -> Vec<usize> {
    ranked_indices(entries, |_| true)
        .into_iter()
        .map(|i| i as usize)
        .collect()
}

/// Reorders `entries` in place, most valuable first (what the load path
/// creates first). A state blob already holds its entries in this order,
/// so that case costs one pass and no allocation.
pub fn sort_by_priority(entries: &mut [Entry]) {
    if entries.is_sorted_by_key(|e| std::cmp::Reverse(value_key(e))) {
        return;
    }
    entries.sort_by_cached_key(|e| std::cmp::Reverse(value_key(e)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{Tuple, L4};

    fn tcp(state: u8, flags_orig: u8, flags_reply: u8, timeout: u32) -> Entry {
        let orig = Tuple {
            src: "10.0.0.2".parse().unwrap(),
            dst: "192.0.2.1".parse().unwrap(),
            proto: proto::TCP,
            l4: L4::Ports {
                src: 40000,
                dst: 443,
            },
            zone: None,
        };
        Entry {
            reply: orig.inverse(),
            orig,
            status: status::SEEN_REPLY | status::ASSURED,
            timeout,
            mark: 100,
            zone: 0,
            labels: None,
            protoinfo: Some(ProtoInfo::Tcp {
                state,
                wscale_orig: 7,
                wscale_reply: 7,
                flags_orig,
                flags_reply,
            }),
            seq_adj_orig: None,
            seq_adj_reply: None,
            helper: None,
            id: None,
        }
    }

    #[test]
    fn a_flow_with_data_in_flight_outranks_every_idle_established_one() {
        let unacked = tcp_flag::DATA_UNACKNOWLEDGED | tcp_flag::WINDOW_SCALE;
        // Data in flight, either direction: the kernel's 300 s timeout.
        let busy_out = tcp(tcp_state::ESTABLISHED, unacked, tcp_flag::WINDOW_SCALE, 297);
        let busy_in = tcp(tcp_state::ESTABLISHED, tcp_flag::WINDOW_SCALE, unacked, 120);
        // Idle for a few seconds: nearly 5 days left.
        let idle = tcp(
            tcp_state::ESTABLISHED,
            tcp_flag::WINDOW_SCALE,
            tcp_flag::WINDOW_SCALE,
            431_990,
        );
        assert_eq!(value_class(&busy_out), ValueClass::Active);
        assert_eq!(value_class(&busy_in), ValueClass::Active);
        assert_eq!(value_class(&idle), ValueClass::Assured);
        assert!(value_key(&busy_in) > value_key(&idle));
        assert_eq!(
            priority_order(&[idle.clone(), busy_in.clone(), busy_out.clone()]),
            [2, 1, 0]
        );
        // The flag means nothing past ESTABLISHED, and about to expire is
        // still worthless.
        let closing = tcp(tcp_state::FIN_WAIT, unacked, 0, 100);
        assert_eq!(value_class(&closing), ValueClass::Closing);
        assert_eq!(value_class_at(&busy_out, 10), ValueClass::Worthless);
        // The class does not depend on the time left, so ageing (which
        // takes the same seconds off every timeout) keeps the order.
        for age in [0u32, 50, 109] {
            assert!(value_key_at(&busy_in, 120 - age) > value_key_at(&idle, 431_990 - age));
        }
    }
}
