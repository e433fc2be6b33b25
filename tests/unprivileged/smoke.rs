//! The CLI starts and explains itself.

use std::process::Command;

#[test]
fn help_lists_every_subcommand() {
    let out = Command::new(env!("CARGO_BIN_EXE_conntrack-vmstate"))
        .arg("--help")
        .output()
        .expect("run conntrack-vmstate");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in [
        "save",
        "load",
        "inspect",
        "flush",
        "register",
        "unregister",
        "status",
    ] {
        assert!(text.contains(sub), "--help lacks {sub}: {text}");
    }
}

#[test]
fn bad_option_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_conntrack-vmstate"))
        .args(["save", "--mark", "not-a-number"])
        .output()
        .expect("run conntrack-vmstate");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'not-a-number' for '--mark <MARK>'"),
        "{err}"
    );
}
