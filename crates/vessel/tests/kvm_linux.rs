//! The stock Debian kernel on /dev/kvm. With VT-x/AMD-V the kit boots to its init and
//! runs a command. Without (every machine this project is tested on, see HOST.md), KVM
//! emulates each instruction at ~1 µs and gives up on instructions its emulator lacks:
//! there the kernel, entered through PVH, must print its banner, and vessel must report
//! the emulation failure cleanly if it gets that far.

mod common;

use std::time::Duration;

use common::{boot, kit, kvm_available};

#[test]
fn debian_kernel_boots_on_kvm_through_pvh() {
    if !kvm_available() {
        return;
    }
    let Some(kit) = kit() else { return };
    let initrd = kit.initrd.display().to_string();
    if cpu::kvm::host_has_hardware_virtualization() {
        let cmdline = kit::cmdline("", Some("echo linux-on-kvm-ok"));
        let r = boot(
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
    let r = boot(
        &kit.vmlinux,
        &[
            "--initrd",
            &initrd,
            "--cmdline",
            "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1",
        ],
        Duration::from_secs(240),
    );
    assert!(
        r.stdout.contains("Linux version 6.1"),
        "no kernel banner: {}",
        r.dump()
    );
    match r.code {
        // Killed at the deadline while still booting: the banner is what must show here.
        None => eprintln!("kernel still booting after {:?}", r.elapsed),
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
