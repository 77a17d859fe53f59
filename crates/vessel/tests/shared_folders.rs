//! Shared folders: a host directory in the kit's Linux over virtio-fs, served by a real
//! virtiofsd. Files cross both ways; a read-only share refuses writes; virtiofsd dying
//! fails the guest's file operations, not the VM; a VM with a share refuses to be saved.

mod common;

use std::process::Stdio;

use common::home::Home;

const IDLE: &str = "while :; do sleep 1; done";

/// A running kit VM `name` sharing `dir` (with `options`), mounted at /mnt/share.
fn share_vm(home: &Home, name: &str, dir: &std::path::Path, options: &str) -> Option<()> {
    if !common::virtiofsd_available() {
        return None;
    }
    let kit = common::kit()?;
    let share = format!("{}{options}", dir.display());
    home.create_kit_vm(name, &kit, IDLE, &["--share", &share]);
    home.ok(&["start", name]);
    home.wait_log(
        name,
        0,
        &format!("{}share on /mnt/share", kit::SHARE_MARKER_PREFIX),
    );
    home.wait_log(name, 0, kit::AGENT_MARKER);
    Some(())
}

/// `vessel exec NAME -- sh -c SCRIPT`: (exit code, stdout, stderr).
fn sh(home: &Home, name: &str, script: &str) -> (i32, String, String) {
    let out = common::vessel()
        .env("VESSEL_HOME", home.path())
        .args(["exec", name, "--", "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn files_cross_a_shared_folder_both_ways() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("from-host.txt"), "written on the host\n").unwrap();
    if share_vm(&home, "s", dir.path(), "").is_none() {
        return;
    }
    let (code, out, err) = sh(&home, "s", "cat /mnt/share/from-host.txt");
    assert_eq!((code, out.as_str()), (0, "written on the host\n"), "{err}");
    let (code, _, err) = sh(
        &home,
        "s",
        "echo written in the guest > /mnt/share/from-guest.txt && mkdir /mnt/share/sub",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("from-guest.txt")).unwrap(),
        "written in the guest\n"
    );
    assert!(dir.path().join("sub").is_dir());
    // A VM whose state partly lives in virtiofsd cannot be saved: said in one line.
    let (code, err) = home.refused(&["snapshot", "s", "s1"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("shared folder"), "{err}");
    home.ok(&["stop", "s"]);
}

#[test]
fn a_read_only_share_refuses_writes() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep.txt"), "unchanged\n").unwrap();
    if share_vm(&home, "r", dir.path(), ",readonly=on").is_none() {
        return;
    }
    let (code, out, _) = sh(&home, "r", "cat /mnt/share/keep.txt");
    assert_eq!((code, out.as_str()), (0, "unchanged\n"));
    let (code, _, err) = sh(&home, "r", "echo changed > /mnt/share/keep.txt");
    assert_ne!(code, 0);
    assert!(err.contains("Read-only file system"), "{err}");
    let (code, _, _) = sh(&home, "r", "touch /mnt/share/new.txt");
    assert_ne!(code, 0);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("keep.txt")).unwrap(),
        "unchanged\n"
    );
    assert!(!dir.path().join("new.txt").exists());
    home.ok(&["stop", "r"]);
}

#[test]
fn virtiofsd_dying_fails_the_guest_file_operations_not_the_vm() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), "a\n").unwrap();
    if share_vm(&home, "d", dir.path(), "").is_none() {
        return;
    }
    let (code, out, _) = sh(&home, "d", "cat /mnt/share/a.txt");
    assert_eq!((code, out.as_str()), (0, "a\n"));
    // The VM's own virtiofsd: a child of the monitor's launcher (or of the monitor).
    let children = |pid: i32| -> Vec<i32> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let monitor = home.pid("d");
    let descendants: Vec<i32> = children(monitor)
        .into_iter()
        .flat_map(|c| std::iter::once(c).chain(children(c)))
        .collect();
    let virtiofsd: Vec<i32> = descendants
        .iter()
        .copied()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "virtiofsd")
        })
        .collect();
    assert_eq!(
        virtiofsd.len(),
        1,
        "the monitor's descendants: {descendants:?}"
    );
    // SAFETY: kill(2) of the virtiofsd this test's VM started.
    unsafe { libc::kill(virtiofsd[0], libc::SIGKILL) };
    let log_path = home.vm_dir("d").join("monitor.log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("virtiofsd exited")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no word of virtiofsd's death"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (code, _, err) = sh(&home, "d", "cat /mnt/share/a.txt");
    assert_ne!(code, 0);
    assert!(err.contains("Input/output error"), "{err}");
    // The VM is fine.
    let (code, out, _) = sh(&home, "d", "echo alive");
    assert_eq!((code, out.as_str()), (0, "alive\n"));
    assert_eq!(home.state_in_ls("d"), "running");
    home.ok(&["stop", "d"]);
}
