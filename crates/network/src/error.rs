use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetError {
    #[error("passt not found: install the Debian package passt (user-mode networking)")]
    NoPasst,
    #[error("passt: {0}")]
    Passt(String),
    #[error("host port {port}/{proto} cannot be forwarded: {reason}")]
    PortInUse {
        port: u16,
        proto: &'static str,
        reason: String,
    },
    #[error("network {name}: {reason}")]
    Switch { name: String, reason: String },
    #[error("bridge {bridge}: {reason}")]
    Bridge { bridge: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl NetError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
        let what = what.into();
        move |source| NetError::Io { what, source }
    }
}
