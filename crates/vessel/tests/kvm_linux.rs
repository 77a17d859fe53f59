//! The stock Debian kernel on /dev/kvm. With VT-x/AMD-V the kit boots to its init and
//! runs a command. Without (every machine this project is tested on, see HOST.md), KVM
//! emulates each instruction at ~1 µs and gives up on instructions its emulator lacks:
//! there the kernel, entered through PVH, must print its banner, and get past the point
//! where KVM alone stops (SLUB's first cmpxchg16b, right after the "Memory:" line),
//! carried by vessel's interpreter; if vessel stops it, it must say why cleanly.

mod common;

use std::time::Duration;

use common::{boot_kvm, kit, kvm_available};

#[test]
fn debian_kernel_boots_on_kvm_through_pvh() {
    if !kvm_available() {
        return;
    }
    let Some(kit) = kit() else { return };
    let initrd = kit.initrd.display().to_string();
    if cpu::kvm::host_has_hardware_virtualization() {
        let cmdline = kit::cmdline("", Some("echo linux-on-kvm-ok"));
        let r = boot_kvm(
            &kit.vmlinux,
            &["--initrd", &initrd, "--cmdline", &cmdline],
            Duration::from_secs(120),
        );
        assert_eq!(r.code, Some(0), "{}", r.dump());
        assert!(r.stdout.contains(kit::INIT_MARKER), "{}", r.dump());
        assert!(r.stdout.contains("linux-on-kvm-ok"), "{}", r.dump());
        assert!(
            r.stdout.contains("VESSEL-KIT: exit status 0"),
            "{}",
            r.dump()
        );
        return;
    }
    let mut cmd = common::vessel();
    cmd.arg("run")
        .args(["--accel", "kvm"])
        .arg("--kernel")
        .arg(&kit.vmlinux)
        .args(["--initrd", &initrd, "--cmdline"])
        .arg("console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1");
    // The first line SLUB prints after its first cmpxchg16b, which KVM cannot emulate.
    let past_kvm_alone = "SLUB: HWalign";
    let r = common::run_until(cmd, past_kvm_alone, Duration::from_secs(240));
    assert!(
        r.stdout.contains("Linux version 6.1"),
        "no kernel banner: {}",
        r.dump()
    );
    match r.code {
        None => {
            assert!(
                r.stdout.contains(past_kvm_alone),
                "the interpreter did not carry the kernel past KVM's stop within the deadline: {}",
                r.dump()
            );
            eprintln!("past KVM's own stop after {:?}", r.elapsed);
        }
        Some(code) => {
            let last = r.stderr.lines().last().unwrap_or_default();
            assert_eq!(code, 1, "{}", r.dump());
            assert!(
                last.starts_with("vessel: vCPU 0 stopped: ")
                    && last.contains(" at RIP 0x")
                    && last.contains("bytes ["),
                "{}",
                r.dump()
            );
            eprintln!("{last} (after {:?})", r.elapsed);
        }
    }
}
