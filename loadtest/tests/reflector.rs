#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! A kube-runtime watcher + reflector stays consistent with the simulator under many random writes and deletes.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use nio_loadtest::kubesim::{KubeSim, Options};
use nio_shared::crd::{Machine, MachineSpec};
use serde_json::json;

/// xorshift64*: deterministic, so a failure replays.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn snapshot<'a>(items: impl Iterator<Item = &'a Machine>) -> BTreeMap<String, (String, Option<String>)> {
    items
        .map(|m| {
            let role = m.metadata.labels.as_ref().and_then(|l| l.get("n").cloned());
            (m.metadata.name.clone().unwrap(), (m.metadata.resource_version.clone().unwrap(), role))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_matches_the_store_after_1000_random_writes() {
    // A short history forces watch restarts (410 → relist) if the watcher ever falls behind.
    let sim =
        KubeSim::start(Options { history: 2_000, bookmark_interval: Duration::from_millis(100), ..Default::default() })
            .await
            .unwrap();
    let api: Api<Machine> = Api::namespaced(sim.client().unwrap(), "default");
    let (reader, writer) = reflector::store::<Machine>();
    let driver = tokio::spawn(
        watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .applied_objects()
            .for_each(|_| async {}),
    );
    reader.wait_until_ready().await.unwrap();

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut creates, mut updates, mut deletes) = (0, 0, 0);
    for i in 0..1000 {
        let name = format!("m{}", rng.next(60));
        match rng.next(3) {
            0 => {
                let spec: MachineSpec =
                    serde_json::from_value(json!({"hostname": format!("{name}.example.org")})).unwrap();
                if api.create(&PostParams::default(), &Machine::new(&name, spec)).await.is_ok() {
                    creates += 1;
                }
            }
            1 => {
                let p = Patch::Merge(json!({"metadata": {"labels": {"n": i.to_string()}}}));
                if api.patch(&name, &PatchParams::default(), &p).await.is_ok() {
                    updates += 1;
                }
            }
            _ => {
                if api.delete(&name, &DeleteParams::default()).await.is_ok() {
                    deletes += 1;
                }
            }
        }
    }
    assert!(creates > 100 && updates > 100 && deletes > 100, "{creates} {updates} {deletes}");

    let truth = snapshot(api.list(&ListParams::default()).await.unwrap().items.iter());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let state = reader.state();
        let seen = snapshot(state.iter().map(|m| &**m));
        if seen == truth {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "reflector diverged:\n store: {truth:?}\n cache: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    driver.abort();
}
