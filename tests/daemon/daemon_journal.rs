//! What the daemon writes to the journal: one structured line per Register,
//! Save, Load and Unregister, with bare field names (`journalctl VMID=100`).
//!
//! The daemon runs in its own network namespace and its own mount namespace,
//! where our datagram socket is mounted at /run/systemd/journal/socket, so
//! tracing-journald talks to it exactly as to journald.

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::bus::{scratch_dir, DaemonOpts, DaemonProc, TestBus};
use common::netns::Netns;
use conntrack_vmstate::bus::proxy::Manager1Proxy;
use zbus::Variant;

/// Parses one datagram of journald's native protocol: `KEY=value\n`, or
/// `KEY\n<u64 LE length><value>\n` for values that may hold newlines.
fn parse(mut b: &[u8]) -> Option<HashMap<String, String>> {
    let mut out = HashMap::new();
    while !b.is_empty() {
        let nl = b.iter().position(|&c| c == b'\n')?;
        let line = &b[..nl];
        if let Some(eq) = line.iter().position(|&c| c == b'=') {
            out.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            b = &b[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &b[nl + 1..];
            let len = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?) as usize;
            let val = rest.get(8..8 + len)?;
            out.insert(key, String::from_utf8_lossy(val).into_owned());
            b = rest.get(8 + len + 1..)?;
        }
    }
    Some(out)
}

/// Collects journal entries until one's MESSAGE starts with `last` (bounded).
fn collect_until(sock: &UnixDatagram, last: &str) -> Vec<HashMap<String, String>> {
    let end = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 65536];
    let mut seen = Vec::new();
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            let e = parse(&buf[..n])
                .unwrap_or_else(|| panic!("malformed journal datagram {:?}", &buf[..n]));
            let done = e.get("MESSAGE").is_some_and(|m| m.starts_with(last));
            seen.push(e);
            if done {
                break;
            }
        }
    }
    seen
}

fn find<'a>(seen: &'a [HashMap<String, String>], prefix: &str) -> &'a HashMap<String, String> {
    seen.iter()
        .find(|e| e.get("MESSAGE").is_some_and(|m| m.starts_with(prefix)))
        .unwrap_or_else(|| panic!("no '{prefix}' line in {seen:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_lines_carry_structured_fields() {
    common::needs!(daemon);
    tokio::time::timeout(Duration::from_secs(90), async {
        let ns = Netns::new("journal");
        let bus = TestBus::new("journal");
        let state = scratch_dir("journal-state");
        let jdir = scratch_dir("journal-sock");
        let sock = UnixDatagram::bind(jdir.path().join("socket")).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let client = bus.connect().await;
        let mut o = DaemonOpts::new(&bus.address, state.path());
        o.netns = Some(&ns.name);
        let script = format!(
            "mount -t tmpfs none /run/systemd && mkdir /run/systemd/journal && \
             mount --bind {} /run/systemd/journal && exec \"$0\" \"$@\"",
            jdir.path().display()
        );
        o.wrapper = vec![
            "unshare".into(),
            "-m".into(),
            "--propagation".into(),
            "private".into(),
            "sh".into(),
            "-c".into(),
            script,
        ];
        let d = DaemonProc::start(o, &client).await;

        let m = Manager1Proxy::new(&client).await.unwrap();
        let (_vm, vs) = common::bus::register(&client, &bus.address, "100").await;
        let blob = vs.save().await.unwrap().into_vec();
        vs.load(serde_bytes::Bytes::new(&blob)).await.unwrap();
        m.unregister("100", HashMap::new()).await.unwrap();

        let seen = tokio::task::block_in_place(|| collect_until(&sock, "Unregister of VM 100"));
        let log = d.log_text();
        let f = |e: &HashMap<String, String>, k: &str| e.get(k).cloned();
        let reg = find(&seen, "Register of VM 100");
        assert_eq!(f(reg, "VMID").as_deref(), Some("100"));
        assert_eq!(
            f(reg, "VMSTATE_ID").as_deref(),
            Some("conntrack-vmstate-100")
        );
        assert_eq!(
            f(reg, "SYSLOG_IDENTIFIER").as_deref(),
            Some("conntrack-vmstated")
        );
        assert_eq!(f(reg, "PRIORITY").as_deref(), Some("6"));
        assert_eq!(f(reg, "F_VMID"), None, "field prefix must be off");

        let bytes = blob.len().to_string();
        for op in ["Save", "Load"] {
            let e = find(&seen, &format!("{op} of VM 100"));
            assert_eq!(f(e, "VMID").as_deref(), Some("100"), "{op}");
            assert_eq!(
                f(e, "VMSTATE_ID").as_deref(),
                Some("conntrack-vmstate-100"),
                "{op}"
            );
            assert_eq!(f(e, "ENTRIES").as_deref(), Some("0"), "{op}");
            assert_eq!(f(e, "DROPPED").as_deref(), Some("0"), "{op}");
            assert_eq!(f(e, "BYTES").as_deref(), Some(bytes.as_str()), "{op}");
            assert!(
                f(e, "DURATION_US").is_some_and(|v| v.parse::<u64>().is_ok()),
                "{op}: {e:?}"
            );
        }
        let unreg = find(&seen, "Unregister of VM 100");
        assert_eq!(f(unreg, "VMID").as_deref(), Some("100"));
        // stderr is not the journal here, so the readable log is written too.
        assert!(
            log.contains("Register of VM 100: Id conntrack-vmstate-100"),
            "{log}"
        );
    })
    .await
    .expect("test timed out");
}

/// Under systemd, stderr is a journal stream (JOURNAL_STREAM names it): the
/// daemon then logs only natively, without a duplicate stderr copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stderr_copy_when_stderr_is_the_journal() {
    common::needs!(daemon);
    use std::os::unix::fs::MetadataExt;
    tokio::time::timeout(Duration::from_secs(90), async {
        let ns = Netns::new("journal-st");
        let bus = TestBus::new("journal-st");
        let state = scratch_dir("journal-st-state");
        let jdir = scratch_dir("journal-st-sock");
        let sock = UnixDatagram::bind(jdir.path().join("socket")).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let client = bus.connect().await;
        // DaemonProc sends stderr to <state>.log; pretend it is the journal.
        let log = state.path().with_extension("log");
        std::fs::File::create(&log).unwrap();
        let md = std::fs::metadata(&log).unwrap();
        let mut o = DaemonOpts::new(&bus.address, state.path());
        o.netns = Some(&ns.name);
        o.env.push((
            "JOURNAL_STREAM".into(),
            format!("{}:{}", md.dev(), md.ino()),
        ));
        let script = format!(
            "mount -t tmpfs none /run/systemd && mkdir /run/systemd/journal && \
             mount --bind {} /run/systemd/journal && exec \"$0\" \"$@\"",
            jdir.path().display()
        );
        o.wrapper = ["unshare", "-m", "--propagation", "private", "sh", "-c"]
            .map(String::from)
            .to_vec();
        o.wrapper.push(script);
        let d = DaemonProc::start(o, &client).await;
        let m = Manager1Proxy::new(&client).await.unwrap();
        m.register(
            "100",
            HashMap::from([("bus_address", Variant::from(bus.address.as_str()))]),
        )
        .await
        .unwrap();
        let seen = tokio::task::block_in_place(|| collect_until(&sock, "Register of VM 100"));
        find(&seen, "Register of VM 100");
        let text = d.log_text();
        assert!(
            !text.contains("Register of VM 100"),
            "duplicated on stderr: {text}"
        );
    })
    .await
    .expect("test timed out");
}
