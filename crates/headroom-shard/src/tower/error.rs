use headroom_core::Classify;

/// The error type of [`Sharded`](super::Sharded): a shard's service error, [`MissingShardKey`]
/// or [`UnknownShard`](crate::UnknownShard), each downcastable.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The request carried no shard key, so it could not be routed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, thiserror::Error)]
#[error("the request has no shard key")]
pub struct MissingShardKey;

impl Classify for MissingShardKey {
    fn is_timeout(&self) -> bool {
        false
    }

    fn is_retryable(&self) -> bool {
        false
    }

    fn is_rejected(&self) -> bool {
        true
    }
}
