//! Tiers: quotas per class of caller, and the resolver that tells a request's class and key.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::Quotas;
use crate::ConfigError;

/// Quotas by tier name (`free`, `pro`, `enterprise`, or one per route): one
/// [`Quota`](super::Quota) per tier, or several that a request must fit together ([`Quotas`]).
///
/// Loadable with serde (feature `serde`); a tier is one quota's fields, or `quotas` and a list:
///
/// ```
/// # #[cfg(feature = "serde")] {
/// use headroom_limit::rate::TierConfig;
///
/// let config: TierConfig = serde_json::from_str(r#"{
///     "free": { "limit": 60, "period": "1m" },
///     "pro": { "limit": 6000, "period": "1m", "burst": 200 },
///     "api": { "quotas": [
///         { "limit": 10, "period": "1s" },
///         { "limit": 1000, "period": "1day" }
///     ] }
/// }"#).unwrap();
/// assert_eq!(config.get("pro").unwrap().max_cost(), 200);
/// assert_eq!(config.get("api").unwrap().as_slice().len(), 2);
/// # }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(transparent))]
pub struct TierConfig {
    tiers: BTreeMap<String, Quotas>,
}

impl TierConfig {
    /// No tiers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) tier `name` with `quotas`: a [`Quota`](super::Quota), or [`Quotas`]
    /// that a request must fit together.
    #[must_use]
    pub fn tier(mut self, name: impl Into<String>, quotas: impl Into<Quotas>) -> Self {
        self.tiers.insert(name.into(), quotas.into());
        self
    }

    /// The quotas of tier `name`.
    pub fn get(&self, name: &str) -> Option<&Quotas> {
        self.tiers.get(name)
    }

    /// The tiers and their quotas, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Quotas)> {
        self.tiers
            .iter()
            .map(|(name, quotas)| (name.as_str(), quotas))
    }

    /// Checks every tier name: non-empty, at most 64 bytes of ASCII letters, digits and
    /// `_ . : / -` (they name metrics labels, store keys and HTTP header parameters). The
    /// limiters' `replace` checks this too.
    pub fn validate(&self) -> Result<(), ConfigError> {
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

    /// Builds the state of each tier, keeping the state of tiers whose quotas are unchanged.
    pub(crate) fn build<T>(
        &self,
        previous: Option<&HashMap<Box<str>, Arc<T>>>,
        quotas_of: impl Fn(&T) -> &Quotas,
        mut make: impl FnMut(&str, &Quotas) -> Result<T, ConfigError>,
    ) -> Result<HashMap<Box<str>, Arc<T>>, ConfigError> {
        self.validate()?;
        self.iter()
            .map(|(name, quotas)| {
                let kept = previous
                    .and_then(|tiers| tiers.get(name))
                    .filter(|tier| quotas_of(tier) == quotas)
                    .cloned();
                let tier = match kept {
                    Some(tier) => tier,
                    None => Arc::new(make(name, quotas)?),
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
