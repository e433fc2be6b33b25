//! The real helper binary, confined to what the daemon needs: requests for
//! selectors nobody watches are refused, and DeleteSelected (which the
//! daemon never sends) always is: `DeleteSelected(mark 1, mask 1)` would
//! remove every odd-marked entry of the host.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::host::spawn_helper;
use common::netns::Netns;
use conntrack_vmstate::access::ConntrackAccess;
use conntrack_vmstate::entry::Selector;
use conntrack_vmstate::format::Format;
use conntrack_vmstate::helper::wire::{self, Request, Response};
use conntrack_vmstate::helper::HelperClient;

fn raw(sock: &std::path::Path, req: &Request) -> Response {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&wire::encode_request(req)).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut buf).unwrap();
    wire::decode_response(&buf).unwrap()
}

fn insert(ns: &Netns, i: u32, mark: u32) {
    ns.run(
        "conntrack",
        &[
            "-I",
            "-s",
            &format!("10.7.0.{i}"),
            "-d",
            "192.0.2.1",
            "-p",
            "tcp",
            "--sport",
            "1000",
            "--dport",
            "22",
            "--state",
            "ESTABLISHED",
            "-t",
            "600",
            "-u",
            "SEEN_REPLY,ASSURED",
            "--mark",
            &mark.to_string(),
        ],
    );
}

#[test]
fn odd_mark_delete_and_unwatched_selectors_are_refused() {
    common::needs!(kernel);
    let ns = Netns::new("ch");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("helper.sock");
    let _h = spawn_helper(&ns, dir.path(), &sock);
    for (i, mark) in [1u32, 3, 5, 100, 101].into_iter().enumerate() {
        insert(&ns, i as u32 + 1, mark);
    }
    let before = ns.conntrack_count();
    assert_eq!(before, 5);
    let odd = Selector {
        mark: 1,
        mark_mask: 1,
        zone: None,
    };
    let refused = |r: Response, op: &str, sel: &Selector| {
        assert_eq!(
            r,
            Response::Error(format!(
                "{op} refused: selector mark {:#x}/{:#x} is not watched: the helper serves \
                 only the selectors of registered VMs (Watch first); refused",
                sel.mark, sel.mark_mask
            ))
        );
    };
    assert_eq!(
        raw(&sock, &Request::DeleteSelected(odd)),
        Response::Error(
            "delete-selected refused: not an operation the daemon uses; refused".into()
        )
    );
    refused(raw(&sock, &Request::Dump(odd)), "dump", &odd);
    refused(
        raw(&sock, &Request::SaveState(odd, 1 << 20, Format::Binary)),
        "save-state",
        &odd,
    );
    refused(
        raw(&sock, &Request::DeleteSaved(odd, vec![1, 2])),
        "delete-saved",
        &odd,
    );
    refused(
        raw(&sock, &Request::DeleteEntries(odd, Vec::new())),
        "delete-entries",
        &odd,
    );
    refused(
        raw(&sock, &Request::Create(odd, Vec::new())),
        "create",
        &odd,
    );
    // Mark 0 or mask 0: refused before anything else, watched or not.
    for sel in [
        Selector::mark(0),
        Selector {
            mark: 100,
            mark_mask: 0,
            zone: None,
        },
    ] {
        let r = raw(&sock, &Request::Watch(sel, true));
        assert!(
            matches!(&r, Response::Error(m) if m.ends_with("would select unmarked entries; refused")),
            "{r:?}"
        );
    }
    assert_eq!(ns.conntrack_count(), before);

    // Watched (as the daemon watches a registered VM): served, and only
    // that exact selector.
    let c = HelperClient::new(&sock).unwrap();
    let vm = Selector::mark(100);
    c.watch(&vm, true).unwrap();
    assert_eq!(c.dump(&vm).unwrap().len(), 1);
    let wide = Selector {
        mark: 100,
        mark_mask: 0xfe,
        zone: None,
    };
    refused(raw(&sock, &Request::Dump(wide)), "dump", &wide);
    // Even a watched selector cannot be deleted wholesale.
    assert_eq!(
        raw(&sock, &Request::DeleteSelected(vm)),
        Response::Error(
            "delete-selected refused: not an operation the daemon uses; refused".into()
        )
    );
    // Unwatching ends it.
    c.watch(&vm, false).unwrap();
    refused(raw(&sock, &Request::Dump(vm)), "dump", &vm);
    assert_eq!(ns.conntrack_count(), before);
}
