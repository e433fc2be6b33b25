//! `prepare`, `finish`, `abort`: one migration of one VM, on each host, the
//! way a management tool drives it. The daemon does the conntrack side
//! (Manager1.Prepare/Finish/Abort); with `--qmp` these commands also wire
//! and unwire the VM's QEMU, in the order that never leaves QEMU listing an
//! Id nobody serves.

use std::collections::HashMap;

use anyhow::{anyhow, Context};
use zbus::Variant;

use super::manage::{
    clone_opts, connect, qemu_pid, registration_options, runtime, vm_proxy, with_retries,
};
use super::{PrepareArgs, StepArgs};
use crate::bus::proxy::Manager1Proxy;

pub fn prepare(a: PrepareArgs) -> anyhow::Result<()> {
    let r = &a.register;
    let role = a.role.name();
    runtime()?.block_on(async {
        let pid = match &r.qmp {
            Some(sock) => qemu_pid(sock, &format!("VM {}'s QEMU", r.vmid)).await?,
            None => None,
        };
        let conn = connect(&r.manager).await?;
        let m = Manager1Proxy::new(&conn).await?;
        // A VM the daemon knows keeps its registration (also an
        // always-served one); a new one is known from now on, served only
        // around migrations.
        let known = vm_proxy(&conn, &r.vmid).await?.id().await.is_ok();
        if !known {
            let mut opts = registration_options(r);
            opts.entry("lifecycle")
                .or_insert(Variant::from("migration"));
            with_retries(async || m.register(&r.vmid, clone_opts(&opts)?).await)
                .await
                .with_context(|| format!("registering VM {}", r.vmid))?;
        }
        let mut opts: HashMap<&str, Variant> = HashMap::from([("role", Variant::from(role))]);
        if let Some(p) = pid {
            opts.insert("qemu_pid", Variant::from(p));
        }
        with_retries(async || m.prepare(&r.vmid, clone_opts(&opts)?).await)
            .await
            .with_context(|| format!("preparing VM {} as migration {role}", r.vmid))?;
        let vm = vm_proxy(&conn, &r.vmid).await?;
        let (id, bus) = (vm.id().await?, vm.bus_address().await?);
        println!(
            "prepared VM {} as migration {role}: Id {id}, mark {:#x}/{:#x}, bus {bus}",
            r.vmid,
            vm.mark().await?,
            vm.mark_mask().await?
        );
        if let Some(sock) = &r.qmp {
            let (s, i, b) = (sock.clone(), id.clone(), bus.clone());
            let attached =
                tokio::task::spawn_blocking(move || crate::qmp::attach_vmstate(&s, &i, &b)).await?;
            if let Err(e) = attached {
                // Leave nothing served for a QEMU that will not call.
                let undo = HashMap::from([("role", Variant::from(role))]);
                let _ = m.abort(&r.vmid, undo).await;
                return Err(anyhow!(e)).with_context(|| {
                    format!(
                        "VM {} was prepared, but adding Id {id} to QEMU's dbus-vmstate over {} \
                         failed (the preparation is undone)",
                        r.vmid,
                        sock.display()
                    )
                });
            }
            println!(
                "QEMU at {}: dbus-vmstate lists {id} on {bus}",
                sock.display()
            );
        }
        Ok(())
    })
}

pub fn finish(a: StepArgs) -> anyhow::Result<()> {
    step(a, "finish")
}

pub fn abort(a: StepArgs) -> anyhow::Result<()> {
    step(a, "abort")
}

fn step(a: StepArgs, verb: &'static str) -> anyhow::Result<()> {
    let role = a.role.name();
    runtime()?.block_on(async {
        let conn = connect(&a.manager).await?;
        let vm = vm_proxy(&conn, &a.vmid).await?;
        let id = vm
            .id()
            .await
            .map_err(|e| anyhow!("VM '{}' is not registered ({e})", a.vmid))?;
        let mut vm_running = false;
        if let Some(sock) = &a.qmp {
            // QEMU first: its object must never list an Id nobody serves.
            let (s, i) = (sock.clone(), id.clone());
            let r = tokio::task::spawn_blocking(move || -> anyhow::Result<bool> {
                let mut q = crate::qmp::QmpClient::connect(&s)?;
                q.detach_vmstate(&i)?;
                let st = q.execute("query-status", None)?;
                Ok(st.get("status").and_then(|v| v.as_str()) == Some("running"))
            })
            .await?
            .with_context(|| {
                format!(
                    "removing Id {id} from QEMU's dbus-vmstate over {}",
                    sock.display()
                )
            });
            match r {
                Ok(running) => vm_running = running,
                // A failed migration may have taken the destination's QEMU
                // with it: its object is gone with it, the VM runs nowhere
                // here, and the cleanup must still happen.
                Err(e) if verb == "abort" => eprintln!("conntrack-vmstate: {e:#}; going on"),
                Err(e) => return Err(e),
            }
        }
        let mut opts: HashMap<&str, Variant> = HashMap::from([("role", Variant::from(role))]);
        let dest = a.role == super::RoleArg::Destination;
        if verb == "abort" && dest {
            opts.insert("vm_running", Variant::from(vm_running));
        }
        // Read before the call ends the preparation: a step on a VM not
        // prepared here does nothing (the daemon's journal says so).
        let prepared = !vm.prepared().await.unwrap_or_default().is_empty();
        let m = Manager1Proxy::new(&conn).await?;
        let call = async || match verb {
            "finish" => m.finish(&a.vmid, clone_opts(&opts)?).await,
            _ => m.abort(&a.vmid, clone_opts(&opts)?).await,
        };
        with_retries(call)
            .await
            .with_context(|| format!("{verb} of VM {} as migration {role}", a.vmid))?;
        let what = match (verb, dest) {
            ("abort", _) if !prepared => "it was not prepared here, its entries are kept",
            ("finish", false) => "the entries its Save took are deleted",
            ("finish", true) | ("abort", false) => "its entries are kept",
            _ if vm_running => "the VM runs here, its entries are kept",
            _ => "the entries its Load created are deleted",
        };
        println!("{verb}ed VM {} as migration {role}: {what}", a.vmid);
        Ok(())
    })
}
