//! Tiers: a quota per class of caller, and the resolver that tells a request's class and key.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::Quota;
use crate::ConfigError;

/// Quotas by tier name (`free`, `pro`, `enterprise`, or one per route).
///
/// Loadable with serde (feature `serde`):
///
/// ```
/// # #[cfg(feature = "serde")] {
/// use headroom_limit::rate::TierConfig;
///
/// let config: TierConfig = serde_json::from_str(r#"{
///     "free": { "limit": 60, "period": "1m" },
///     "pro": { "limit": 6000, "period": "1m", "burst": 200 }
/// }"#).unwrap();
/// assert_eq!(config.get("pro").unwrap().burst(), 200);
/// # }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(transparent))]
pub struct TierConfig {
    tiers: BTreeMap<String, Quota>,
}

impl TierConfig {
    /// No tiers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) tier `name` with `quota`.
    #[must_use]
    pub fn tier(mut self, name: impl Into<String>, quota: Quota) -> Self {
        self.tiers.insert(name.into(), quota);
        self
    }

    /// The quota of tier `name`.
    pub fn get(&self, name: &str) -> Option<Quota> {
        self.tiers.get(name).copied()
    }

    /// The tiers and their quotas, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Quota)> {
        self.tiers
            .iter()
            .map(|(name, quota)| (name.as_str(), *quota))
    }

    /// Checks every tier name: non-empty, at most 64 bytes of ASCII letters, digits and
    /// `_ . : / -` (they name metrics labels, store keys and HTTP header parameters).
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let valid = |name: &str| {
            !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/' | b'-')
                })
        };
        if self.tiers.keys().all(|name| valid(name)) {
            Ok(())
        } else {
            Err(ConfigError::new(
                "tiers",
                "names must be 1 to 64 ASCII letters, digits or `_ . : / -`",
            ))
        }
    }

    /// Builds the state of each tier, keeping the state of tiers whose quota is unchanged.
    pub(crate) fn build<T>(
        &self,
        previous: Option<&HashMap<Box<str>, Arc<T>>>,
        quota_of: impl Fn(&T) -> Quota,
        mut make: impl FnMut(&str, Quota) -> Result<T, ConfigError>,
    ) -> Result<HashMap<Box<str>, Arc<T>>, ConfigError> {
        self.validate()?;
        self.iter()
            .map(|(name, quota)| {
                let kept = previous
                    .and_then(|tiers| tiers.get(name))
                    .filter(|tier| quota_of(tier) == quota)
                    .cloned();
                let tier = match kept {
                    Some(tier) => tier,
                    None => Arc::new(make(name, quota)?),
                };
                Ok((Box::from(name), tier))
            })
            .collect()
    }
}

/// Who a request is charged to: a tier, a key within it, and a cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateKey {
    /// The tier whose quota applies.
    pub tier: Cow<'static, str>,
    /// The caller within the tier (an API token, a user id, a client address).
    pub key: String,
    /// Units this request spends (1 for most; more for expensive calls).
    pub cost: u32,
}

impl RateKey {
    /// One unit of `tier`'s quota for `key`.
    pub fn new(tier: impl Into<Cow<'static, str>>, key: impl Into<String>) -> Self {
        Self {
            tier: tier.into(),
            key: key.into(),
            cost: 1,
        }
    }

    /// The same, costing `cost` units.
    #[must_use]
    pub fn with_cost(self, cost: u32) -> Self {
        Self { cost, ..self }
    }
}

/// Tells which tier and key a request is charged to; `None` lets it through unlimited.
///
/// Implemented for every `Fn(&Req) -> Option<RateKey>`.
pub trait Resolve<Req> {
    /// The tier, key and cost of `request`, or `None` if it is not rate limited.
    fn resolve(&self, request: &Req) -> Option<RateKey>;
}

impl<Req, F> Resolve<Req> for F
where
    F: Fn(&Req) -> Option<RateKey>,
{
    fn resolve(&self, request: &Req) -> Option<RateKey> {
        self(request)
    }
}
