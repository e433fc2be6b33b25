//! A restore is never lost: once Load has answered, the VM's 100,000
//! entries are created to the end whatever happens next on the
//! destination — Unregister (Proxmox VE stops the target's helper right
//! after the migration), SIGTERM, a stop past its grace (handed over to the
//! next start), a SIGKILL of the daemon, the helper killed and started
//! again. Real kernel (a throw-away namespace), real bus, the real daemon
//! without CAP_NET_ADMIN and the real helper that holds it.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::host::spawn_helper;
use conntrack_vmstate::bus::proxy::Manager1Proxy;
use conntrack_vmstate::entry::Entry;
use nix::sys::signal::Signal;

use super::confine_load::{blob, final_load, tcp, wrap, Dest};

const N: usize = 100_000;

/// `N` established TCP entries of VM 100 (mark 100), each with its own
/// source address, so every one of them is created.
fn entries() -> Vec<Entry> {
    (0..N)
        .map(|i| {
            let mut e = tcp(0, 1, 100);
            e.orig.src = IpAddr::V4(Ipv4Addr::new(
                10,
                1 + (i >> 16) as u8,
                (i >> 8) as u8,
                i as u8,
            ));
            e.reply = e.orig.inverse();
            e
        })
        .collect()
}

/// The namespace's table size (`conntrack -C`, cheap at 100k where a
/// listing is not); it holds only VM 100's entries.
fn mine(d: &Dest) -> usize {
    let out = d.ns.run("conntrack", &["-C"]);
    out.trim()
        .parse()
        .unwrap_or_else(|e| panic!("conntrack -C: {e}: {out:?}"))
}

/// Waits (bounded) until VM 100's `N` entries are all in the table.
async fn all_arrive(d: &Dest, what: &str) {
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let n = tokio::task::block_in_place(|| mine(d));
        if n == N {
            return;
        }
        assert!(
            Instant::now() < end,
            "{what}: {n} of {N} entries in the table; daemon: {}",
            d.daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn pending_files(state: &Path) -> Vec<String> {
    std::fs::read_dir(state)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("restore-") && n.ends_with(".pending"))
                .collect()
        })
        .unwrap_or_default()
}

/// A destination with VM 100 registered, after a Load of `N` entries has
/// answered (the restore then runs in the background, ~0.5–1 s).
async fn loaded(tag: &str, extra: &[&str]) -> Dest {
    let d = Dest::new(tag, extra).await;
    let (_vm, vs) = d.register("100", &[]).await;
    let data = blob(&entries());
    vs.load(serde_bytes::Bytes::new(&data)).await.unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregister_right_after_load_does_not_stop_the_restore() {
    common::needs!(daemon);
    wrap(async {
        let d = loaded("rk-unreg", &[]).await;
        let m = Manager1Proxy::new(&d.client).await.unwrap();
        m.unregister("100", Default::default()).await.unwrap();
        all_arrive(&d, "after Unregister").await;
        let done = "Load of VM 100 complete after";
        let logged =
            tokio::task::block_in_place(|| d.daemon.wait_log(done, Duration::from_secs(10)));
        // Said only when the restore still ran at the Unregister.
        let log = d.daemon.log_text();
        assert!(logged, "no {done:?} within 10 s of the last entry: {log}");
        assert!(
            log.contains("Unregister of VM 100: its running restore goes on to the end"),
            "{log}"
        );
        assert!(!log.contains("restore stopped after"), "{log}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_load_finishes_the_restore_before_exiting() {
    common::needs!(daemon);
    wrap(async {
        let mut d = loaded("rk-term", &[]).await;
        d.daemon.signal(Signal::SIGTERM);
        let st = tokio::task::block_in_place(|| d.daemon.wait_exit(Duration::from_secs(60)))
            .expect("daemon did not exit within 60 s");
        assert!(st.success(), "{st}: {}", d.daemon.log_text());
        // Everything is in before the process is gone.
        assert_eq!(tokio::task::block_in_place(|| mine(&d)), N);
        let log = d.daemon.log_text();
        assert!(
            log.contains("finishing the restore of VM 100 before stopping (at most 30 s)"),
            "{log}"
        );
        assert!(log.contains("Load of VM 100 complete after"), "{log}");
        assert!(pending_files(d._state.path()).is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_past_its_grace_hands_over_and_the_next_start_completes() {
    common::needs!(daemon);
    wrap(async {
        let mut d = loaded("rk-hand", &["--stop-grace-secs", "0"]).await;
        d.daemon.signal(Signal::SIGTERM);
        let st = tokio::task::block_in_place(|| d.daemon.wait_exit(Duration::from_secs(60)))
            .expect("daemon did not exit within 60 s");
        let log = d.daemon.log_text();
        // A failure status on purpose: Restart=on-failure starts the next.
        assert_eq!(st.code(), Some(1), "{log}");
        assert!(
            log.contains("stopped with 1 restore(s) unfinished after the 0 s grace"),
            "{log}"
        );
        let made = tokio::task::block_in_place(|| mine(&d));
        assert!(made < N, "nothing left to hand over: {made}");
        assert_eq!(pending_files(d._state.path()).len(), 1);

        d.start_daemon_again(&[]).await;
        let (vm, _vs) = d.register("100", &[]).await;
        let last = final_load(&vm).await;
        assert_eq!(super::confine_load::load_error(&vm).await, "", "{last:?}");
        let resumed = last["resumed"];
        assert!(
            resumed > 0 && resumed <= made as u64,
            "{last:?}, {made} made"
        );
        assert_eq!(
            last["created"] + last["existed"],
            (N as u64) - resumed,
            "{last:?}"
        );
        all_arrive(&d, "after the next start").await;
        assert!(d
            .daemon
            .log_text()
            .contains("resuming the restore a previous conntrack-vmstated handed over"));
        assert!(pending_files(d._state.path()).is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_restore_is_completed_by_the_next_start() {
    common::needs!(daemon);
    wrap(async {
        let mut d = loaded("rk-kill", &[]).await;
        // The blob is kept beside the restore once QEMU has its answer.
        let end = Instant::now() + Duration::from_secs(5);
        while pending_files(d._state.path()).is_empty() {
            assert!(Instant::now() < end, "no handover file while restoring");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::task::block_in_place(|| d.daemon.kill9());
        let made = tokio::task::block_in_place(|| mine(&d));
        assert!(made < N, "the restore was over before the kill: {made}");
        d.start_daemon_again(&[]).await;
        all_arrive(&d, "after the restart").await;
        let (vm, _vs) = d.register("100", &[]).await;
        let last = final_load(&vm).await;
        assert_eq!(super::confine_load::load_error(&vm).await, "", "{last:?}");
        assert!(last["resumed"] > 0, "{last:?}");
        assert!(pending_files(d._state.path()).is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helper_killed_and_started_again_mid_restore_loses_nothing() {
    common::needs!(daemon);
    wrap(async {
        let mut d = Dest::new("rk-helper", &[]).await;
        let (vm, vs) = d.register("100", &[]).await;
        let data = blob(&entries());
        vs.load(serde_bytes::Bytes::new(&data)).await.unwrap();
        tokio::task::block_in_place(|| d.helper.kill());
        let made = tokio::task::block_in_place(|| mine(&d));
        assert!(made < N, "the restore was over before the kill: {made}");
        // Away for a moment, as during a restart by its socket unit.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let sock = d._state.path().join("helper.sock");
        d.helper = spawn_helper(&d.ns, d._state.path(), &sock);
        all_arrive(&d, "after the helper came back").await;
        let last = final_load(&vm).await;
        assert_eq!(super::confine_load::load_error(&vm).await, "", "{last:?}");
        assert_eq!(last["created"] + last["existed"], N as u64, "{last:?}");
        let log = d.daemon.log_text();
        assert!(
            log.contains("retrying for up to 30 s (the helper may be restarting)"),
            "{log}"
        );
        assert!(
            log.contains("restore of VM 100: creating again after"),
            "{log}"
        );
    })
    .await
}
