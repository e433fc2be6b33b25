//! A dbus-vmstate helper that costs nothing: `org.qemu.VMState1` on a bus,
//! Save answered with a blob made beforehand, Load's data dropped. What a
//! migration adds with it is the floor under any helper — QEMU's
//! dbus-vmstate, the bus daemon and the stream carrying that many bytes —
//! which the benchmarks set beside ours (bench/floor.rs, bench/vmstate.rs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_bytes::ByteBuf;

struct Iface {
    id: String,
    blob: Arc<Vec<u8>>,
    saves: Arc<AtomicU64>,
    loads: Arc<AtomicU64>,
}

#[zbus::interface(name = "org.qemu.VMState1")]
impl Iface {
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> String {
        self.id.clone()
    }

    fn save(&self) -> ByteBuf {
        self.saves.fetch_add(1, Ordering::Relaxed);
        ByteBuf::from(self.blob.as_slice().to_vec())
    }

    fn load(&self, data: ByteBuf) {
        self.loads.fetch_add(1, Ordering::Relaxed);
        drop(std::hint::black_box(data));
    }
}

/// The helper, served on its own runtime thread (a caller's current-thread
/// runtime would not answer while the caller waits for a migration).
/// Drop closes its connection.
pub struct FloorHelper {
    rt: Option<tokio::runtime::Runtime>,
    conn: Option<zbus::Connection>,
    saves: Arc<AtomicU64>,
    loads: Arc<AtomicU64>,
}

impl FloorHelper {
    /// Queues on `org.qemu.VMState1` on `address` with `id`; Save returns
    /// `blob`. Panics if the bus refuses (a bench set-up error).
    pub fn serve(address: &str, id: &str, blob: Vec<u8>) -> FloorHelper {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio");
        let saves = Arc::new(AtomicU64::new(0));
        let loads = Arc::new(AtomicU64::new(0));
        let iface = Iface {
            id: id.to_owned(),
            blob: Arc::new(blob),
            saves: saves.clone(),
            loads: loads.clone(),
        };
        let t = Instant::now();
        let conn = rt
            .block_on(async {
                let c = zbus::connection::Builder::address(address)
                    .serve_at("/org/qemu/VMState1", iface)
                    .build()
                    .await?;
                // the only owner while it serves: the benches start it
                // before any daemon
                c.request_name("org.qemu.VMState1").await?;
                Ok::<_, zbus::Error>(c)
            })
            .unwrap_or_else(|e| panic!("floor helper on {address} after {:?}: {e}", t.elapsed()));
        FloorHelper {
            rt: Some(rt),
            conn: Some(conn),
            saves,
            loads,
        }
    }

    /// Saves and Loads answered so far.
    pub fn calls(&self) -> (u64, u64) {
        (
            self.saves.load(Ordering::Relaxed),
            self.loads.load(Ordering::Relaxed),
        )
    }
}

impl Drop for FloorHelper {
    fn drop(&mut self) {
        if let (Some(rt), Some(c)) = (self.rt.as_ref(), self.conn.take()) {
            let _ = rt.block_on(c.close());
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
