use std::collections::BTreeMap;
use std::time::Duration;

use crate::address_map::AddressMap;

/// Standalone server or cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum RedisMode {
    /// One server (`urls` holds exactly one URL).
    #[default]
    Standalone,
    /// A Redis Cluster (`urls` holds one or more seed nodes).
    Cluster,
}

/// How to reach Redis, and how long to wait for it.
///
/// Loadable with serde (feature `serde`), with human-readable durations:
///
/// ```
/// # #[cfg(feature = "serde")] {
/// let config: headroom_redis::RedisConfig = serde_json::from_str(r#"{
///     "mode": "cluster",
///     "urls": ["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"],
///     "command_timeout": "150ms",
///     "address_map": { "10.0.0.1:6379": "127.0.0.1:16379" }
/// }"#).unwrap();
/// assert_eq!(config.command_timeout, std::time::Duration::from_millis(150));
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct RedisConfig {
    /// Standalone or cluster.
    pub mode: RedisMode,
    /// `redis://` URLs: the server, or the cluster's seed nodes. `rediss://` (TLS) needs a
    /// TLS feature of the `redis` crate, which headroom leaves off (add, for example,
    /// `redis = { version = "1", features = ["tokio-rustls-comp"] }` to the service's
    /// manifest); without one, `Redis::connect` fails with a `Config` error saying so.
    pub urls: Vec<String>,
    /// The longest a connection attempt may take.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub connect_timeout: Duration,
    /// The longest any command (or pipeline) may take, reconnection included. A command that
    /// exceeds it fails with a timeout error; it never hangs.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub command_timeout: Duration,
    /// The shortest wait between reconnection attempts (the first goes out at once); it
    /// doubles while attempts fail, up to `reconnect_max_delay`.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub reconnect_min_delay: Duration,
    /// The longest wait between reconnection attempts (at least 1 ms), and how often idle
    /// connections are checked with a `PING`.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub reconnect_max_delay: Duration,
    /// Addresses to dial instead of the ones the nodes announce, `"host:port"` to
    /// `"host:port"` (an IPv6 host in brackets): for a cluster behind NAT, port forwarding or
    /// a proxy. It applies to every connection to a cluster: seeds, redirects and discovered
    /// nodes (a standalone URL already names the address to dial).
    pub address_map: BTreeMap<String, String>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            mode: RedisMode::Standalone,
            urls: vec!["redis://127.0.0.1:6379".to_owned()],
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_millis(500),
            reconnect_min_delay: Duration::from_millis(10),
            reconnect_max_delay: Duration::from_secs(1),
            address_map: BTreeMap::new(),
        }
    }
}

impl RedisConfig {
    /// A standalone server at `url`.
    pub fn standalone(url: impl Into<String>) -> Self {
        Self {
            urls: vec![url.into()],
            ..Self::default()
        }
    }

    /// A Redis Cluster reached through `seeds`.
    pub fn cluster<I, S>(seeds: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            mode: RedisMode::Cluster,
            urls: seeds.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Sets the command timeout.
    #[must_use]
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Sets the connection timeout.
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Dials `reachable` whenever a connection to `announced` is made (see
    /// [`address_map`](Self::address_map)).
    #[must_use]
    pub fn with_address(
        mut self,
        announced: impl Into<String>,
        reachable: impl Into<String>,
    ) -> Self {
        self.address_map.insert(announced.into(), reachable.into());
        self
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        AddressMap::parse(&self.address_map)?;
        match (self.mode, self.urls.len()) {
            (_, 0) => return Err("no Redis URL given".into()),
            (RedisMode::Standalone, n) if n > 1 => {
                return Err(format!("standalone mode takes one URL, {n} given"));
            }
            _ => {}
        }
        for (field, timeout) in [
            ("command_timeout", self.command_timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if timeout.is_zero() {
                return Err(format!("{field} must be greater than zero"));
            }
        }
        // It is also how often connections are checked: zero would ping without a pause.
        if self.reconnect_max_delay < Duration::from_millis(1) {
            return Err("reconnect_max_delay must be at least 1 ms".into());
        }
        if self.reconnect_min_delay > self.reconnect_max_delay {
            return Err("reconnect_min_delay exceeds reconnect_max_delay".into());
        }
        Ok(())
    }
}
