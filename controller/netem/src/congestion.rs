//! TCP congestion control choice, per namespace (default for new sockets) or per socket.
//!
//! Kernel rule that shapes this module (net/ipv4/tcp_cong.c): a namespace other than the initial
//! one may only make an algorithm its default if the algorithm is in the host-wide
//! `net.ipv4.tcp_allowed_congestion_control` list; otherwise the sysctl write fails with EPERM
//! even for root. On the development machines that list is `reno bbr`, so `cubic` can be chosen
//! per socket (`TCP_CONGESTION`, allowed for any available algorithm with CAP_NET_ADMIN) but not
//! as a namespace default unless the host's allowed list is extended first
//! ([`allow_congestion_control_host_wide`], an explicit host-wide change).
//!
//! Data model: algorithms are kernel names (`cubic`, `bbr`, `reno`); lists are read from
//! `/proc/sys/net/ipv4/tcp_{available,allowed}_congestion_control`.

use std::ffi::OsString;
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, setsockopt, sockopt::TcpCongestion};

use crate::namespace::{NamespaceError, set_namespace_sysctl};

const AVAILABLE: &str = "/proc/sys/net/ipv4/tcp_available_congestion_control";
const ALLOWED: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";

/// Why a congestion control could not be set.
#[derive(Debug, thiserror::Error)]
pub enum CongestionError {
    /// The kernel has no such algorithm (module not loaded or not built).
    #[error(
        "congestion control {algorithm:?} is not available on this kernel (available: {available})"
    )]
    Unavailable {
        /// The algorithm asked for.
        algorithm: String,
        /// What the kernel offers.
        available: String,
    },
    /// The kernel refuses it as a namespace default (see the module header).
    #[error(
        "congestion control {algorithm:?} cannot be a namespace default: it is not in the host's \
         net.ipv4.tcp_allowed_congestion_control ({allowed}); set it per socket (TCP_CONGESTION) \
         or call allow_congestion_control_host_wide first"
    )]
    NotAllowedInNamespace {
        /// The algorithm asked for.
        algorithm: String,
        /// The host's allowed list.
        allowed: String,
    },
    /// Reading or writing a congestion control sysctl failed otherwise.
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    /// A `/proc` list could not be read or written.
    #[error("cannot access {path}: {source}")]
    Proc {
        /// The file.
        path: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `TCP_CONGESTION` failed on a socket.
    #[error("TCP_CONGESTION {algorithm:?} on a socket failed: {source}")]
    Socket {
        /// The algorithm asked for.
        algorithm: String,
        /// The underlying error.
        #[source]
        source: nix::Error,
    },
}

fn read_list(path: &'static str) -> Result<String, CongestionError> {
    std::fs::read_to_string(path)
        .map(|list| list.trim().to_owned())
        .map_err(|source| CongestionError::Proc { path, source })
}

/// Algorithms the kernel offers (space-separated, as the kernel lists them).
pub fn available_congestion_controls() -> Result<String, CongestionError> {
    read_list(AVAILABLE)
}

/// Algorithms any namespace may use as its default (space-separated; a host-wide list).
pub fn allowed_congestion_controls() -> Result<String, CongestionError> {
    read_list(ALLOWED)
}

/// Adds `algorithm` to the host-wide allowed list so namespaces may make it their default.
/// This changes the host, not only emulated namespaces: call it deliberately (benchmarks), never
/// from library code paths.
#[tracing::instrument(level = "info")]
pub fn allow_congestion_control_host_wide(algorithm: &str) -> Result<(), CongestionError> {
    let allowed = allowed_congestion_controls()?;
    if allowed.split_whitespace().any(|name| name == algorithm) {
        return Ok(());
    }
    std::fs::write(ALLOWED, format!("{allowed} {algorithm}")).map_err(|source| {
        if source.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32) {
            CongestionError::Unavailable {
                algorithm: algorithm.to_owned(),
                available: available_congestion_controls().unwrap_or_default(),
            }
        } else {
            CongestionError::Proc {
                path: ALLOWED,
                source,
            }
        }
    })
}

/// Makes `algorithm` the default of new TCP sockets in the named namespace.
pub(crate) fn set_namespace_congestion_control(
    namespace: &str,
    algorithm: &str,
) -> Result<(), CongestionError> {
    match set_namespace_sysctl(namespace, "net.ipv4.tcp_congestion_control", algorithm) {
        Ok(()) => Ok(()),
        Err(NamespaceError::Sysctl { source, .. })
            if source.raw_os_error() == Some(nix::errno::Errno::EPERM as i32) =>
        {
            Err(CongestionError::NotAllowedInNamespace {
                algorithm: algorithm.to_owned(),
                allowed: allowed_congestion_controls().unwrap_or_default(),
            })
        }
        Err(NamespaceError::Sysctl { source, .. })
            if source.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32) =>
        {
            Err(CongestionError::Unavailable {
                algorithm: algorithm.to_owned(),
                available: available_congestion_controls().unwrap_or_default(),
            })
        }
        Err(other) => Err(other.into()),
    }
}

/// Sets the congestion control of one TCP socket (any available algorithm, given
/// CAP_NET_ADMIN; otherwise only allowed ones).
pub fn set_socket_congestion_control(
    socket: &impl AsFd,
    algorithm: &str,
) -> Result<(), CongestionError> {
    setsockopt(socket, TcpCongestion, &OsString::from(algorithm)).map_err(|source| {
        if source == nix::errno::Errno::ENOENT {
            CongestionError::Unavailable {
                algorithm: algorithm.to_owned(),
                available: available_congestion_controls().unwrap_or_default(),
            }
        } else {
            CongestionError::Socket {
                algorithm: algorithm.to_owned(),
                source,
            }
        }
    })
}

/// The congestion control a TCP socket uses.
pub fn socket_congestion_control(socket: &impl AsFd) -> Result<String, CongestionError> {
    getsockopt(socket, TcpCongestion)
        .map(|name| name.to_string_lossy().trim_end_matches('\0').to_owned())
        .map_err(|source| CongestionError::Socket {
            algorithm: String::new(),
            source,
        })
}
