//! A full disk: publishes are refused (`internal`), nothing confirmed is lost, the broker shuts
//! down promptly, and once space returns a restarted broker delivers every confirmed message.
//!
//! Needs root (it mounts a small tmpfs as the data directory). Elsewhere it says it skipped;
//! with OUTBOXD_REQUIRE_ROOT_TESTS=1 (CI) not being able to run is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_error, Broker, Opts};
use serde_json::json;

/// Unmounts on drop, so a failing test does not leave a mount behind.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(at: &Path, size: &str) -> Option<Mount> {
    std::fs::create_dir_all(at).ok()?;
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .status()
        .ok()?
        .success();
    ok.then(|| Mount(at.to_path_buf()))
}

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        let msg = "disk_full: SKIPPED: needs root to mount a small tmpfs";
        assert!(
            std::env::var_os("OUTBOXD_REQUIRE_ROOT_TESTS").is_none(),
            "{msg}, and OUTBOXD_REQUIRE_ROOT_TESTS is set"
        );
        eprintln!("{msg}");
    }
    root
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_refuses_publishes_loses_nothing_confirmed_and_recovers_after_space_returns() {
    // Catches a broker that confirms writes the disk did not take, hangs or crashes on ENOSPC,
    // or cannot serve its outboxes once space is back.
    if !can_run() {
        return;
    }
    let mut broker = Broker::start(Opts::new());
    assert!(broker.sigterm().success());
    let data = broker.data_dir();
    std::fs::remove_dir_all(&data).expect("clear the data dir");
    let mount = mount_tmpfs(&data, "3m").expect("mount a 3 MiB tmpfs");
    broker.restart();

    let (mut alice, _) = broker.client("alice").await;
    let big = "x".repeat(60_000);
    let mut confirmed = 0u64;
    let mut refused = None;
    for i in 0..500 {
        let a = alice
            .publish(&format!("p{i}"), "client:bob", json!(big))
            .await;
        if a["type"] == "ok" {
            confirmed += 1;
        } else {
            refused = Some(a);
            break;
        }
    }
    let refused = refused.expect("a 3 MiB disk filled up");
    assert_error(&refused, "internal");
    assert!(
        confirmed >= 1,
        "nothing was confirmed before the disk filled"
    );
    // Later publishes are refused too: nothing more is confirmed.
    let again = alice.publish("after", "client:bob", json!("small")).await;
    assert_error(&again, "internal");
    let ready = broker.admin_get("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.body);

    // Shutdown is prompt and says the store was latched.
    let started = Instant::now();
    let status = broker.sigterm();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), Some(1), "a latched store ends with status 1");
    assert!(broker.stderr_shows("STORE LATCHED", Duration::from_secs(5)));

    // Space returns; a restarted broker delivers every confirmed message.
    let grown = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&data)
        .status()
        .expect("remount");
    assert!(grown.success());
    broker.restart();
    let (mut bob, welcome) = broker.client("bob").await;
    assert_eq!(welcome["pending"], confirmed, "{welcome}");
    let msgs = bob.recv_msgs(confirmed as usize).await;
    assert_eq!(msgs.len() as u64, confirmed);
    assert!(msgs
        .iter()
        .all(|m| m["payload"].as_str().map(str::len) == Some(60_000)));
    drop(bob);
    broker.kill9();
    drop(mount);
}
