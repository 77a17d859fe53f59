//! What vessel puts into a Debian image besides Debian's packages: the network setup,
//! per-VM first-boot settings from a seed disk, fresh SSH host keys, and a console line
//! that says when the system is up. Written into the image by the build's customize
//! hook; every file here is plain text, checked as shell or unit syntax by the tests.

/// The serial (virtio-blk ID) of the seed disk a VM made from an image carries.
pub const SEED_SERIAL: &str = "vessel-seed";
/// What the guest prints on its console once systemd has finished starting:
/// `vessel-ready: running` (or `degraded`, then one `vessel-ready: failed UNIT` line per
/// failed unit).
pub const READY_PREFIX: &str = "vessel-ready: ";
/// What the guest prints on its console at every boot: its machine ID and each SSH host
/// key's fingerprint (`vessel-identity: machine-id ...`, `vessel-identity: host-key ...`).
pub const IDENTITY_PREFIX: &str = "vessel-identity: ";
/// The root file system's label (the kit's root disk has the same one).
pub const ROOT_LABEL: &str = "vessel-root";

/// A file the build writes into the image: path inside the image, mode, contents.
pub struct GuestFile {
    pub path: &'static str,
    pub mode: u32,
    pub text: String,
}

/// Every file vessel adds to an image.
pub fn files() -> Vec<GuestFile> {
    let file = |path, mode, text: &str| GuestFile {
        path,
        mode,
        text: text
            .replace("@SEED@", SEED_SERIAL)
            .replace("@READY@", READY_PREFIX)
            .replace("@IDENTITY@", IDENTITY_PREFIX)
            .replace("@LABEL@", ROOT_LABEL),
    };
    vec![
        file("/etc/fstab", 0o644, FSTAB),
        file("/etc/hostname", 0o644, "debian\n"),
        file("/etc/hosts", 0o644, HOSTS),
        file(
            "/etc/systemd/network/80-vessel-dhcp.network",
            0o644,
            NETWORK,
        ),
        file("/etc/ssh/sshd_config.d/vessel.conf", 0o644, SSHD_HOST_KEYS),
        file("/usr/local/sbin/vessel-firstboot", 0o755, FIRSTBOOT),
        file(
            "/etc/systemd/system/vessel-firstboot.service",
            0o644,
            FIRSTBOOT_UNIT,
        ),
        file(
            "/etc/systemd/system/vessel-ssh-keygen.service",
            0o644,
            SSH_KEYGEN_UNIT,
        ),
        file("/usr/local/sbin/vessel-ready", 0o755, READY),
        file(
            "/etc/systemd/system/vessel-ready.service",
            0o644,
            READY_UNIT,
        ),
    ]
}

/// Units enabled in the image.
pub const ENABLED_UNITS: &[&str] = &[
    "systemd-networkd.service",
    "systemd-resolved.service",
    "vessel-firstboot.service",
    "vessel-ssh-keygen.service",
    "vessel-ready.service",
];

/// Units disabled: nothing in the image needs the network to be "online", and waiting
/// for it stalls a boot without a NIC for two minutes.
pub const DISABLED_UNITS: &[&str] = &["systemd-networkd-wait-online.service"];

const FSTAB: &str = "\
# The root file system, found by its label whatever the disk's name.
LABEL=@LABEL@ / ext4 errors=remount-ro 0 1
";

const HOSTS: &str = "\
127.0.0.1 localhost
127.0.1.1 debian
::1 localhost ip6-localhost ip6-loopback
";

const NETWORK: &str = "\
# vessel: DHCP on every Ethernet NIC.
[Match]
Type=ether

[Network]
DHCP=yes
";

const FIRSTBOOT: &str = r#"#!/bin/sh
# vessel-firstboot: on the first boot, apply this VM's settings from its seed disk (a tar
# archive on the virtio disk whose serial is @SEED@): hostname, user, SSH keys. At every
# boot, print the machine's identity on the console.
set -u
stamp=/var/lib/vessel/firstboot.done
seed=
for s in /sys/block/*/serial; do
    [ -r "$s" ] && [ "$(cat "$s")" = "@SEED@" ] && seed="/dev/$(basename "$(dirname "$s")")"
done
if [ -n "$seed" ] && [ ! -e "$stamp" ]; then
    d=$(mktemp -d)
    if tar -xf "$seed" -C "$d"; then
        if [ -s "$d/hostname" ]; then
            h=$(cat "$d/hostname")
            echo "$h" >/etc/hostname
            hostname "$h"
            sed -i "s/^127\.0\.1\.1 .*/127.0.1.1 $h/" /etc/hosts
        fi
        if [ -s "$d/user" ]; then
            u=$(cat "$d/user")
            if ! id "$u" >/dev/null 2>&1; then
                useradd --create-home --shell /bin/bash --groups sudo "$u"
                echo "$u ALL=(ALL) NOPASSWD:ALL" >/etc/sudoers.d/90-vessel
                chmod 440 /etc/sudoers.d/90-vessel
            fi
            home=$(getent passwd "$u" | cut -d: -f6)
            if [ -s "$d/authorized_keys" ] && [ -n "$home" ]; then
                install -d -m 700 -o "$u" -g "$(id -g "$u")" "$home/.ssh"
                install -m 600 -o "$u" -g "$(id -g "$u")" "$d/authorized_keys" \
                    "$home/.ssh/authorized_keys"
            fi
        fi
        mkdir -p /var/lib/vessel
        touch "$stamp"
    else
        echo "@IDENTITY@cannot read the seed disk $seed"
    fi
    rm -rf "$d"
fi
echo "@IDENTITY@hostname $(hostname)"
echo "@IDENTITY@kernel $(uname -r)"
echo "@IDENTITY@cpus $(nproc)"
echo "@IDENTITY@machine-id $(cat /etc/machine-id)"
for k in /etc/ssh/ssh_host_*_key.pub; do
    [ -e "$k" ] && echo "@IDENTITY@host-key $(ssh-keygen -lf "$k")"
done
exit 0
"#;

const SSHD_HOST_KEYS: &str = "\
# vessel: the host keys each VM makes on its first boot.
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_ecdsa_key
";

const FIRSTBOOT_UNIT: &str = "\
[Unit]
Description=vessel: this VM's settings and identity
After=local-fs.target vessel-ssh-keygen.service
Before=ssh.service systemd-networkd.service getty.target serial-getty@ttyS0.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vessel-firstboot
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
";

// Ed25519 and ECDSA only: an RSA-3072 key costs a software CPU half a minute of prime
// searching at every VM's first boot, for clients older than OpenSSH 6.5 (2014).
const SSH_KEYGEN_UNIT: &str = "\
[Unit]
Description=vessel: SSH host keys of this VM's own
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N \"\" -f /etc/ssh/ssh_host_ed25519_key
ExecStart=/usr/bin/ssh-keygen -q -t ecdsa -N \"\" -f /etc/ssh/ssh_host_ecdsa_key

[Install]
WantedBy=multi-user.target
";

const READY: &str = r#"#!/bin/sh
# vessel-ready: say on the console when systemd has finished starting, and what failed.
echo "@READY@$(systemctl is-system-running --wait)"
systemctl list-units --failed --no-legend --plain | while read -r unit rest; do
    echo "@READY@failed $unit"
done
"#;

// Type=exec: the unit counts as started at once, so waiting for the end of start-up
// inside it does not hold start-up up.
const READY_UNIT: &str = "\
[Unit]
Description=vessel: say on the console when start-up has finished
After=multi-user.target

[Service]
Type=exec
ExecStart=/usr/local/sbin/vessel-ready
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_are_valid_shell_and_every_placeholder_is_filled() {
        for f in files() {
            let unfilled = f
                .text
                .match_indices('@')
                .any(|(i, _)| f.text[i + 1..].starts_with(|c: char| c.is_ascii_uppercase()));
            assert!(!unfilled, "{}: unfilled placeholder", f.path);
        }
        for script in files()
            .iter()
            .filter(|f| f.path.starts_with("/usr/local/sbin/"))
        {
            let out = std::process::Command::new("sh")
                .args(["-n", "-c", &script.text])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}: {out:?}", script.path);
        }
    }

    #[test]
    fn every_added_unit_is_enabled() {
        for f in files() {
            if let Some(unit) = f.path.strip_prefix("/etc/systemd/system/") {
                assert!(ENABLED_UNITS.contains(&unit), "{unit} is not enabled");
            }
        }
    }
}
