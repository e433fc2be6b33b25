//! Properties of the Load policy (docs/trust-model.md) over arbitrary entries: what it
//! lets through is the VM's, within every bound the destination sets, and
//! exactly what the helper's own validation accepts; nothing it refuses
//! could have been the VM's.

use common::entries::entry;
use conntrack_vmstate::entry::{proto, status, Selector};
use conntrack_vmstate::helper::server;
use conntrack_vmstate::helper::wire::{self, Request};
use conntrack_vmstate::service::confine::{
    LoadPolicy, Refusal, KEPT_STATUS, MAX_HELPER_NAME, TIMEOUT_CEILING_SECS,
};
use proptest::prelude::*;

fn selector() -> impl Strategy<Value = Selector> {
    (
        prop_oneof![3 => Just(100u32), 1 => 1u32..],
        prop_oneof![3 => Just(u32::MAX), 1 => any::<u32>()],
        prop::option::weighted(0.3, prop_oneof![Just(0u16), any::<u16>()]),
    )
        .prop_map(|(mark, mark_mask, zone)| Selector {
            mark,
            mark_mask,
            zone,
        })
        .prop_filter("a valid selector", |s| server::validate_selector(s).is_ok())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn admitted_entries_are_the_vms_and_within_bounds(
        e in entry(),
        sel in selector(),
        map in prop::option::weighted(0.3, any::<u16>()),
        allow_ftp in any::<bool>(),
    ) {
        let mut p = LoadPolicy::new(sel);
        if let (Some(from), Some(to)) = (map, sel.zone) {
            p.zone_map = Some((from, to));
        }
        if !allow_ftp {
            p.helpers.retain(|h| h != "ftp");
        }
        match p.admit(e.clone()) {
            Ok(got) => {
                prop_assert!(sel.admits(&got));
                prop_assert!(got.timeout <= TIMEOUT_CEILING_SECS);
                prop_assert_eq!(got.status & !KEPT_STATUS, 0);
                prop_assert_eq!(got.status & (status::EXPECTED | status::DYING), 0);
                let helper_ok = got
                    .helper
                    .as_ref()
                    .is_none_or(|h| h.len() <= MAX_HELPER_NAME && p.helpers.contains(h));
                prop_assert!(helper_ok);
                prop_assert!(got.seq_adj_orig.is_none() && got.seq_adj_reply.is_none()
                    || got.orig.proto == proto::TCP);
                prop_assert_eq!(got.id, None);
                prop_assert_eq!(got.mark, e.mark);
                prop_assert!(wire::carriable(&got));
                // The helper's own validation agrees: a Load's batch of
                // admitted entries is never refused whole.
                prop_assert_eq!(server::validate(&Request::Create(sel, vec![got.clone()])), Ok(()));
                prop_assert_eq!(
                    server::validate(&Request::CreateBackground(sel, vec![got])),
                    Ok(())
                );
            }
            Err(Refusal::Foreign) => {
                // Not the VM's even after the remap: the helper would refuse
                // it as outside the registration's selector too.
                let mapped = remap(&e, p.zone_map);
                prop_assert!(!sel.admits(&mapped));
                prop_assert!(server::validate(&Request::Create(sel, vec![mapped])).is_err());
            }
            Err(Refusal::Rejected(_)) => {
                let mapped = remap(&e, p.zone_map);
                prop_assert!(sel.admits(&mapped));
            }
        }
    }

    /// A confined helper serves a selector-bearing request only for a
    /// watched selector, and DeleteSelected never.
    #[test]
    fn confinement_needs_the_exact_watched_selector(
        sel in selector(),
        watched in selector(),
        which in 0usize..7,
    ) {
        let req = match which {
            0 => Request::Dump(sel),
            1 => Request::Create(sel, Vec::new()),
            2 => Request::DeleteSaved(sel, vec![1]),
            3 => Request::SaveState(sel, 1 << 20, conntrack_vmstate::format::Format::Binary),
            4 => Request::WaitWarm(sel, 10_000),
            5 => Request::SaveStateNoted(sel, 1 << 20, conntrack_vmstate::format::Format::Binary),
            _ => Request::DeleteSelected(sel),
        };
        let r = server::confine(&req, |s| *s == watched);
        if which == 6 {
            prop_assert!(r.is_err());
        } else {
            prop_assert_eq!(r.is_ok(), sel == watched);
        }
    }
}

fn remap(
    e: &conntrack_vmstate::entry::Entry,
    map: Option<(u16, u16)>,
) -> conntrack_vmstate::entry::Entry {
    let mut m = e.clone();
    if let Some((from, to)) = map {
        if m.zone == from {
            m.zone = to;
        }
        if m.orig.zone == Some(from) {
            m.orig.zone = Some(to);
        }
        if m.reply.zone == Some(from) {
            m.reply.zone = Some(to);
        }
    }
    m
}
