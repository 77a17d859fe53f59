//! What an image is made of: a Debian suite and the packages on top of the essential set.

/// The recipes vessel knows.
pub const NAMES: &[&str] = &["debian-12"];

/// One recipe: Debian's archive, a suite, and the packages a VM needs to be a usable
/// server (systemd, udev, networking, SSH, the cloud kernel and its initramfs).
#[derive(Clone, Debug)]
pub struct Recipe {
    pub name: &'static str,
    pub suite: &'static str,
    /// `deb` lines for mmdebstrap (the release, its updates, its security archive).
    pub sources: &'static [&'static str],
    pub packages: &'static [&'static str],
}

const DEBIAN_12: Recipe = Recipe {
    name: "debian-12",
    suite: "bookworm",
    sources: &[
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ],
    packages: &[
        "systemd",
        "systemd-sysv",
        "systemd-resolved",
        "udev",
        "dbus",
        "openssh-server",
        "linux-image-cloud-amd64",
        "iproute2",
        "iputils-ping",
        "sudo",
        "ca-certificates",
        "e2fsprogs",
    ],
};

pub fn find(name: &str) -> Option<Recipe> {
    (name == DEBIAN_12.name).then_some(DEBIAN_12)
}
