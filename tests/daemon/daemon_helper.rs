//! The packaged split: a daemon without CAP_NET_ADMIN reaches conntrack only
//! through the sandboxed helper (`--helper-socket`), which runs inside the
//! host's network namespace with the capability.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::bus::{scratch_dir, DaemonOpts, DaemonProc, TestBus};
use common::host::{spawn_helper, Proc};
use common::netns::Netns;
use conntrack_vmstate::bus::proxy::Manager1Proxy;
use conntrack_vmstate::format;
use zbus::Variant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capless_daemon_saves_and_flushes_through_the_helper() {
    common::needs!(daemon);
    tokio::time::timeout(Duration::from_secs(90), async {
        let ns = Netns::new("helper");
        let bus = TestBus::new("helper");
        let state = scratch_dir("helper-state");
        let (sock, _helper) = start_helper(&ns, state.path());
        insert_vm100_tcp(&ns, 5);
        ns.run(
            "conntrack",
            &[
                "-I",
                "-s",
                "10.9.1.1",
                "-d",
                "192.0.2.1",
                "-p",
                "udp",
                "--sport",
                "1",
                "--dport",
                "2",
                "-t",
                "600",
                "--mark",
                "200",
            ],
        );

        let client = bus.connect().await;
        // The daemon itself stays in the test's namespace and has no
        // CAP_NET_ADMIN: any entry it reports came through the helper.
        let o = DaemonOpts::new(&bus.address, state.path())
            .capless()
            .helper_socket(&sock);
        let _d = DaemonProc::start(o, &client).await;
        let m = Manager1Proxy::new(&client).await.unwrap();
        let (vm, vs) = common::bus::register(&client, &bus.address, "100").await;
        let blob = vs.save().await.unwrap().into_vec();
        let decoded = format::decode(&blob).unwrap();
        let last = vm.last_save().await.unwrap();
        assert_eq!(
            String::try_from(last["error"].try_clone().unwrap()).unwrap(),
            ""
        );
        assert_eq!(decoded.entries.len(), 5);
        assert!(decoded.entries.iter().all(|e| e.mark == 100));

        m.unregister("100", HashMap::from([("flush", Variant::from(true))]))
            .await
            .unwrap();
        let left = ns.run("conntrack", &["-L", "-f", "ipv4"]);
        let lines: Vec<&str> = left.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{left}");
        assert!(lines[0].contains("mark=200"), "{left}");
    })
    .await
    .expect("test timed out");
}

/// A helper that stops answering (SIGSTOP: a real hang, not a mock) makes
/// Save answer at its deadline with a valid empty state; once the helper
/// runs again, the next Save carries the entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_answers_at_deadline_while_the_helper_hangs() {
    common::needs!(daemon);
    tokio::time::timeout(Duration::from_secs(90), async {
        let ns = Netns::new("helper-hang");
        let bus = TestBus::new("helper-hang");
        let state = scratch_dir("helper-hang-state");
        let (sock, helper) = start_helper(&ns, state.path());
        insert_vm100_tcp(&ns, 3);
        let client = bus.connect().await;
        let mut o = DaemonOpts::new(&bus.address, state.path()).helper_socket(&sock);
        o.extra
            .extend(["--save-deadline-ms".to_string(), "1000".to_string()]);
        let _d = DaemonProc::start(o, &client).await;
        let (vm, vs) = common::bus::register(&client, &bus.address, "100").await;
        assert_eq!(
            format::decode(&vs.save().await.unwrap())
                .unwrap()
                .entries
                .len(),
            3
        );

        let pid = nix::unistd::Pid::from_raw(helper.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        // kill(2) returns before every thread has stopped; on a loaded
        // machine a request sent right away could still be served.
        wait_all_threads_stopped(helper.pid());
        let t = Instant::now();
        let blob = vs.save().await.expect("Save never fails").into_vec();
        let took = t.elapsed();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
        assert!(
            took < Duration::from_secs(5),
            "Save waited {took:?} for a hung helper"
        );
        assert!(format::decode(&blob).unwrap().entries.is_empty());
        let last = vm.last_save().await.unwrap();
        assert_eq!(
            String::try_from(last["error"].try_clone().unwrap()).unwrap(),
            "dump and encode did not finish within the 1000 ms save deadline; sent an empty state"
        );

        // The helper runs again: Saves recover (bounded retry while the
        // stalled request drains).
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let n = format::decode(&vs.save().await.unwrap())
                .unwrap()
                .entries
                .len();
            if n == 3 {
                break;
            }
            assert!(
                Instant::now() < end,
                "Save did not recover after the helper resumed"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("test timed out");
}

/// Waits (bounded) until every thread of `pid` is in the stopped state.
fn wait_all_threads_stopped(pid: u32) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("helper tasks");
        let all_stopped = tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| {
                    // The state follows the parenthesised command name.
                    s.rsplit_once(')')
                        .and_then(|(_, rest)| rest.trim_start().chars().next())
                })
                .is_some_and(|c| c == 'T' || c == 't')
        });
        if all_stopped {
            return;
        }
        assert!(Instant::now() < end, "helper {pid} did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts the real helper inside `ns`, listening in `dir`; returns its socket
/// once it exists.
fn start_helper(ns: &Netns, dir: &std::path::Path) -> (std::path::PathBuf, Proc) {
    let sock = dir.join("helper.sock");
    let helper = spawn_helper(ns, dir, &sock);
    (sock, helper)
}

/// `n` established TCP entries of VM mark 100, made with conntrack(8).
fn insert_vm100_tcp(ns: &Netns, n: usize) {
    for i in 0..n {
        ns.run(
            "conntrack",
            &[
                "-I",
                "-s",
                &format!("10.9.0.{i}"),
                "-d",
                "192.0.2.1",
                "-p",
                "tcp",
                "--sport",
                "1234",
                "--dport",
                "22",
                "--state",
                "ESTABLISHED",
                "-t",
                "600",
                "-u",
                "SEEN_REPLY,ASSURED",
                "--mark",
                "100",
            ],
        );
    }
}
