use headroom_core::{BackendError, BackendErrorKind};
use redis::{ErrorKind, RedisError, ServerErrorKind};

/// Maps a client error to the backend error kind a caller can act on, keeping it as the source.
pub(crate) fn backend_error(err: RedisError) -> BackendError {
    let kind = if err.is_timeout() {
        BackendErrorKind::Timeout
    } else {
        match err.kind() {
            ErrorKind::Io | ErrorKind::ClusterConnectionNotFound => BackendErrorKind::Connection,
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                // A replica now (a failover demoted it): the primary is elsewhere.
                | ServerErrorKind::ReadOnly,
            ) => BackendErrorKind::Unavailable,
            ErrorKind::Server(_) | ErrorKind::Extension => BackendErrorKind::Command,
            ErrorKind::Parse | ErrorKind::UnexpectedReturnType | ErrorKind::RESP3NotSupported => {
                BackendErrorKind::Protocol
            }
            ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig => {
                BackendErrorKind::Config
            }
            _ if err.is_connection_dropped() || err.is_connection_refusal() => {
                BackendErrorKind::Connection
            }
            _ => BackendErrorKind::Protocol,
        }
    };
    BackendError::new(kind).with_source(err)
}
