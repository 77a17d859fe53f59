//! What runs first in the kit guest: the initramfs `/init`, the root disk's `/sbin/init`,
//! and the small scripts both use. The two inits share their text: the module loader and
//! everything after it ([`AFTER_MODULES`]: acpid, then the command line's request) are one
//! template each, so the disk system behaves exactly like the initramfs one.

use crate::bootmark::BOOT_MARK_PATH;
use crate::modules::{Module, ModulePlan};

/// The line init prints on the console before anything else: proof that user space runs.
pub const INIT_MARKER: &str = "VESSEL-KIT: init started";
/// What the root disk's `/sbin/init` prints first, followed by the device mounted on `/`
/// (`VESSEL-KIT: root on /dev/vda`): proof that the system runs from the disk.
pub const ROOT_MARKER_PREFIX: &str = "VESSEL-KIT: root on ";
/// What the guest prints when the ACPI power button (`vessel stop`) makes it power off.
pub const POWER_BUTTON_MARKER: &str = "VESSEL-KIT: power button";

/// What the console says when a NIC got an address by DHCP:
/// `VESSEL-KIT: eth0 192.0.2.2/24`.
pub const ADDRESS_MARKER_PREFIX: &str = "VESSEL-KIT: eth";
/// busybox udhcpc's event script.
pub(crate) const DHCP_SCRIPT_PATH: &str = "/etc/udhcpc.script";

/// The guest agent (`vessel exec`, `vessel cp`...), started by both inits when the
/// kernel has vsock.
pub(crate) const AGENT_PATH: &str = "sbin/vessel-agent";
/// What init prints when the agent runs.
pub const AGENT_MARKER: &str = "VESSEL-KIT: agent";
/// What init prints when it has mounted a shared folder: `VESSEL-KIT: share TAG on
/// /mnt/share`. The tag is `share` unless the command line says `vessel.share=TAG`.
pub const SHARE_MARKER_PREFIX: &str = "VESSEL-KIT: share ";

/// Stops the machine at once, leaving a root disk clean (in both systems).
pub(crate) const HALT_PATH: &str = "/sbin/vessel-halt";
/// Where busybox acpid finds the power button's action: `<conf dir>/PWRF/00000080`.
pub(crate) const POWER_BUTTON_HANDLER_PATH: &str = "/etc/acpi/PWRF/00000080";
/// busybox acpid's action file: event name (as in its built-in KEY_POWER mapping, which
/// reports `button/power PWRF 00000080`) to the handler's path under `/etc/acpi`.
pub(crate) const ACPID_CONF: &str = "\
# busybox acpid: an event whose description contains the first word runs the file (or,
# for a directory, every file: run-parts) named by the second, under /etc/acpi.
PWRF PWRF/00000080
PWRB PWRF/00000080
";

/// The initramfs `/init`: basics, marker, boot mark, modules, then a switch to the root
/// disk when the command line names one (`root=/dev/...`, `LABEL=`, `UUID=`), else the
/// shared tail.
pub(crate) fn initramfs_init(kernel_version: &str, plan: &ModulePlan) -> String {
    fill(
        &[INITRAMFS_HEAD, LOAD_MODULES, SWITCH_ROOT, AFTER_MODULES].concat(),
        kernel_version,
        plan,
    )
}

/// The root disk's `/sbin/init`: what the initramfs hands over to with `switch_root`.
pub(crate) fn disk_init(kernel_version: &str, plan: &ModulePlan) -> String {
    fill(
        &[DISK_HEAD, LOAD_MODULES, AFTER_MODULES].concat(),
        kernel_version,
        plan,
    )
}

/// What udhcpc runs when a lease comes, is renewed or goes.
pub(crate) fn dhcp_script() -> &'static str {
    DHCP_SCRIPT
}

/// `/sbin/vessel-halt poweroff|reboot`.
pub(crate) fn halt_script() -> &'static str {
    HALT_SCRIPT
}

/// What acpid runs on the power button.
pub(crate) fn power_button_handler() -> String {
    POWER_BUTTON_HANDLER
        .replace("@POWER_BUTTON@", POWER_BUTTON_MARKER)
        .replace("@HALT@", HALT_PATH)
}

fn fill(template: &str, kernel_version: &str, plan: &ModulePlan) -> String {
    // `name:path` pairs: the loader skips a module whose /sys/module/<name> exists.
    let list = |mods: &[Module]| {
        mods.iter()
            .map(|m| format!("{}:{}", m.name, m.rel_path.display()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    template
        .replace("@MARKER@", INIT_MARKER)
        .replace("@ROOT_MARKER@", ROOT_MARKER_PREFIX)
        .replace("@BOOT_MARK@", BOOT_MARK_PATH)
        .replace("@AGENT@", AGENT_PATH)
        .replace("@AGENT_MARKER@", AGENT_MARKER)
        .replace("@SHARE_MARKER@", SHARE_MARKER_PREFIX)
        .replace("@HALT@", HALT_PATH)
        .replace("@DHCP_SCRIPT@", DHCP_SCRIPT_PATH)
        .replace("@KVER@", kernel_version)
        .replace("@REQUIRED@", &list(&plan.required))
        .replace("@OPTIONAL@", &list(&plan.optional))
}

const INITRAMFS_HEAD: &str = r#"#!/bin/sh
# vessel kit init (initramfs): mount the basics, announce ourselves, load drivers, switch
# to the root disk if the command line names one (root=), else do what the kernel
# command line asks (run the command after " -- ", power off, or give a shell).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=linux
set -f
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "@MARKER@"
@BOOT_MARK@ || echo "VESSEL-KIT: boot mark failed"
"#;

const DISK_HEAD: &str = r#"#!/bin/sh
# vessel kit init (root disk): the initramfs mounted this disk and moved /proc, /sys and
# /dev here; announce the root, then do what the kernel command line asks, as there.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=linux
set -f
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
[ -e /dev/null ] || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
echo "@ROOT_MARKER@$(awk '$2 == "/" { d = $1 } END { print d }' /proc/mounts)"
"#;

const LOAD_MODULES: &str = r#"
M=/lib/modules/@KVER@
for m in @REQUIRED@; do
    [ -d "/sys/module/${m%%:*}" ] && continue
    insmod "$M/${m#*:}" || echo "VESSEL-KIT: insmod ${m#*:} failed"
done
for m in @OPTIONAL@; do
    [ -d "/sys/module/${m%%:*}" ] || [ ! -e "$M/${m#*:}" ] && continue
    insmod "$M/${m#*:}" 2>/dev/null || echo "VESSEL-KIT: optional module ${m#*:} not loaded"
done
"#;

const SWITCH_ROOT: &str = r#"
root=
fstype=
mode=rw
init=/sbin/init
for w in $(cat /proc/cmdline); do
    case "$w" in
    --) break ;;
    root=*) root=${w#root=} ;;
    rootfstype=*) fstype=${w#rootfstype=} ;;
    init=*) init=${w#init=} ;;
    ro | rw) mode=$w ;;
    esac
done
# The root device: a node (devtmpfs makes it once the driver has probed the disk) or a
# file system's LABEL= or UUID= (findfs reads the superblocks).
find_root() {
    case "$root" in
    /dev/*) [ -b "$root" ] && echo "$root" ;;
    LABEL=* | UUID=*) findfs "$root" 2>/dev/null ;;
    esac
}
if [ -n "$root" ]; then
    n=0
    dev=$(find_root)
    while [ -z "$dev" ] && [ $n -lt 50 ]; do
        usleep 100000
        n=$((n + 1))
        dev=$(find_root)
    done
    mkdir -p /newroot
    if [ -z "$dev" ]; then
        echo "VESSEL-KIT: root device $root did not appear; staying in the initramfs"
    elif ! mount ${fstype:+-t "$fstype"} -o "$mode" "$dev" /newroot; then
        echo "VESSEL-KIT: cannot mount $root ($dev${fstype:+, $fstype}); staying in the initramfs"
    # Inside the new root: its /sbin/init may be an absolute symlink (systemd's is).
    elif ! chroot /newroot test -x "$init"; then
        echo "VESSEL-KIT: $root has no $init; staying in the initramfs"
        umount /newroot
    else
        for d in proc sys dev; do
            mount -o move "/$d" "/newroot/$d"
        done
        exec switch_root /newroot "$init" "$@"
    fi
fi
"#;

/// The shared tail of both inits.
const AFTER_MODULES: &str = r#"
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
hostname vessel
ifconfig lo 127.0.0.1 up

# Every NIC asks for an address by DHCP (busybox udhcpc); after three seconds without
# an answer it goes on trying in the background, so a network with no DHCP server does
# not hold the boot up. vessel.dhcp=off on the command line leaves the NICs alone.
dhcp=on
for w in $(cat /proc/cmdline); do
    case "$w" in
    --) break ;;
    vessel.dhcp=off) dhcp=off ;;
    esac
done
# (Globbing is off in init: list the interfaces instead.)
for dev in $(ls /sys/class/net); do
    case "$dhcp:$dev" in
    on:eth*)
        udhcpc -i "$dev" -b -t 3 -T 1 -A 5 -S -s @DHCP_SCRIPT@ -x hostname:vessel \
            >/dev/null 2>&1
        ;;
    esac
done

# The ACPI power button reaches user space as KEY_POWER on an evdev device (button.ko,
# evdev.ko); acpid runs /etc/acpi/PWRF/00000080 for it, which powers off.
if [ -e /dev/input/event0 ]; then
    if acpid -c /etc/acpi -a /etc/acpid.conf -l /dev/console -p /run/acpid.pid; then
        # acpid forks, opens the event devices, then writes its pid file: until then a
        # press is lost, so the markers below wait for it (at most 5 s).
        n=0
        while [ ! -e /run/acpid.pid ] && [ "$n" -lt 50 ]; do
            sleep 0.1
            n=$((n + 1))
        done
    else
        echo "VESSEL-KIT: acpid did not start; the power button will do nothing"
    fi
else
    echo "VESSEL-KIT: no input devices; the power button will do nothing"
fi

# The guest agent answers the host on vsock (vessel exec, cp, stop, time, snapshots).
if [ -x /@AGENT@ ] && [ -d /sys/module/vmw_vsock_virtio_transport ]; then
    /@AGENT@ >/dev/null 2>&1 </dev/null &
    echo "@AGENT_MARKER@"
fi

# A shared folder (virtio-fs) at /mnt/share: the tag vessel.share= names, else "share".
if [ -d /sys/module/virtiofs ]; then
    tag=share
    for w in $(cat /proc/cmdline); do
        case "$w" in
        --) break ;;
        vessel.share=*) tag=${w#vessel.share=} ;;
        esac
    done
    mkdir -p /mnt/share
    if mount -t virtiofs "$tag" /mnt/share 2>/dev/null; then
        echo "@SHARE_MARKER@$tag on /mnt/share"
    else
        rmdir /mnt/share
    fi
fi

at_once=
action=poweroff
for w in $(cat /proc/cmdline); do
    case "$w" in
    --) break ;;
    vessel.poweroff) at_once=1 ;;
    vessel.reboot) at_once=1; action=reboot ;;
    esac
done

halt_vm() {
    @HALT@ $action
    exit 1
}

if [ $# -gt 0 ]; then
    sh -c "$*"
    echo "VESSEL-KIT: exit status $?"
    halt_vm
fi
[ -n "$at_once" ] && halt_vm
export PS1='vessel:\w# '
setsid cttyhack sh
halt_vm
"#;

const DHCP_SCRIPT: &str = r#"#!/bin/sh
# udhcpc's events: configure the interface, default route and DNS from the lease.
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound | renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    ip link set "$interface" up
    if [ -n "$router" ]; then
        ip route replace default via "${router%% *}" dev "$interface"
    fi
    if [ -n "$dns" ]; then
        : >/etc/resolv.conf
        for d in $dns; do
            echo "nameserver $d" >>/etc/resolv.conf
        done
    fi
    echo "VESSEL-KIT: $interface $ip/${mask:-24}" >/dev/console
    ;;
esac
exit 0
"#;

const HALT_SCRIPT: &str = r#"#!/bin/sh
# vessel-halt poweroff|reboot: stop the machine now. The root file system is written out
# and remounted read-only first, so a root disk is left clean for the host to read.
case "$1" in
poweroff | reboot) ;;
*) echo "usage: vessel-halt poweroff|reboot" >&2; exit 2 ;;
esac
sync
mount -o remount,ro / 2>/dev/null
sync
"$1" -f
sleep 10
echo "VESSEL-KIT: $1 -f did not stop the machine"
exit 1
"#;

const POWER_BUTTON_HANDLER: &str = r#"#!/bin/sh
# busybox acpid runs this for the ACPI power button (KEY_POWER): power off.
echo "@POWER_BUTTON@" >/dev/console
exec @HALT@ poweroff
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> ModulePlan {
        let module = |name: &str, rel: &str| Module {
            name: name.into(),
            rel_path: rel.into(),
            depends: vec![],
        };
        ModulePlan {
            required: vec![
                module("virtio", "kernel/drivers/virtio/virtio.ko"),
                module("virtio_rng", "kernel/drivers/char/hw_random/virtio-rng.ko"),
            ],
            optional: vec![module("evdev", "kernel/drivers/input/evdev.ko")],
        }
    }

    /// `sh -n` (and busybox's own sh, the one the guest runs, when the host has it).
    fn assert_valid_shell(script: &str) {
        for shell in [&["sh"][..], &["busybox", "sh"]] {
            let Ok(out) = std::process::Command::new(shell[0])
                .args(&shell[1..])
                .arg("-n")
                .arg("-c")
                .arg(script)
                .output()
            else {
                eprintln!("skipping the {shell:?} syntax check: not on this host");
                continue;
            };
            assert!(
                out.status.success(),
                "{shell:?}: {}\n{script}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn assert_filled(script: &str) {
        let bytes = script.as_bytes();
        for (i, _) in script.match_indices('@') {
            let next = bytes.get(i + 1).copied().unwrap_or(b' ');
            assert!(
                !next.is_ascii_uppercase(),
                "unfilled placeholder at {}",
                &script[i..]
            );
        }
    }

    #[test]
    fn initramfs_init_is_valid_shell_with_the_marker_first() {
        let script = initramfs_init("6.1.0-test", &plan());
        assert_filled(&script);
        let marker = script.find(INIT_MARKER).unwrap();
        assert!(marker < script.find("insmod").unwrap());
        assert!(script.contains("M=/lib/modules/6.1.0-test\n"));
        assert!(script.contains(
            "for m in virtio:kernel/drivers/virtio/virtio.ko \
             virtio_rng:kernel/drivers/char/hw_random/virtio-rng.ko; do"
        ));
        assert!(script.contains("for m in evdev:kernel/drivers/input/evdev.ko; do"));
        let switch = script
            .find("exec switch_root /newroot \"$init\" \"$@\"")
            .unwrap();
        assert!(script.find("insmod").unwrap() < switch);
        assert!(
            switch < script.find("acpid -c").unwrap(),
            "acpid after the switch"
        );
        let listening = script.find("[ ! -e /run/acpid.pid ]").unwrap();
        assert!(
            listening < script.find(&format!("echo \"{AGENT_MARKER}\"")).unwrap(),
            "the agent's marker only once acpid listens"
        );
        assert_valid_shell(&script);
    }

    #[test]
    fn disk_init_shares_the_loader_and_tail_but_never_switches() {
        let initramfs = initramfs_init("6.1.0-test", &plan());
        let disk = disk_init("6.1.0-test", &plan());
        assert_filled(&disk);
        assert!(disk.starts_with("#!/bin/sh\n"));
        assert!(disk.contains(&format!("echo \"{ROOT_MARKER_PREFIX}$(awk")));
        assert!(!disk.contains(INIT_MARKER));
        assert!(!disk.contains("switch_root"));
        assert!(!disk.contains(BOOT_MARK_PATH), "one boot mark per boot");
        let tail = fill(AFTER_MODULES, "6.1.0-test", &plan());
        let loader = fill(LOAD_MODULES, "6.1.0-test", &plan());
        assert!(disk.ends_with(&format!("{loader}{tail}")));
        assert!(initramfs.ends_with(&tail));
        assert!(initramfs.contains(&loader));
        assert_valid_shell(&disk);
    }

    #[test]
    fn halt_and_power_button_scripts_are_valid_shell() {
        assert_valid_shell(halt_script());
        assert_valid_shell(dhcp_script());
        assert!(dhcp_script().contains("echo \"VESSEL-KIT: $interface "));
        assert!(ADDRESS_MARKER_PREFIX.starts_with("VESSEL-KIT: eth"));
        let handler = power_button_handler();
        assert_filled(&handler);
        assert!(handler.contains(&format!("echo \"{POWER_BUTTON_MARKER}\" >/dev/console")));
        assert!(handler.contains(&format!("exec {HALT_PATH} poweroff")));
        assert_valid_shell(&handler);
        assert!(
            ACPID_CONF.contains("PWRF PWRF/00000080\n")
                && POWER_BUTTON_HANDLER_PATH.ends_with("/PWRF/00000080")
        );
    }
}
