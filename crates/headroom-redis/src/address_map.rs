//! Dialing nodes at other addresses than the ones they announce.
//!
//! A cluster behind NAT, port forwarding or a proxy announces addresses its clients cannot
//! reach (ioredis calls the remedy `natMap`, redis-py `address_remap`). The map applies to
//! every connection a cluster client makes: seeds, redirects and nodes it discovers. A
//! standalone URL already names the address to dial.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use redis::io::AsyncDNSResolver;

/// Announced `(host, port)` to the `(host, port)` to dial.
#[derive(Clone, Debug, Default)]
pub(crate) struct AddressMap(Arc<HashMap<(String, u16), (String, u16)>>);

impl AddressMap {
    /// Parses `"host:port"` pairs; an IPv6 host is written in brackets.
    pub(crate) fn parse(map: &BTreeMap<String, String>) -> Result<Self, String> {
        let pairs = map
            .iter()
            .map(|(announced, reachable)| Ok((host_port(announced)?, host_port(reachable)?)))
            .collect::<Result<_, String>>()?;
        Ok(Self(Arc::new(pairs)))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn host_port(address: &str) -> Result<(String, u16), String> {
    let invalid = || format!("address map entry {address:?} is not host:port");
    let (host, port) = address.rsplit_once(':').ok_or_else(invalid)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = port.parse().map_err(|_| invalid())?;
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err(invalid());
    }
    Ok((host.to_owned(), port))
}

impl AsyncDNSResolver for AddressMap {
    fn resolve<'a, 'b: 'a>(
        &'a self,
        host: &'b str,
        port: u16,
    ) -> redis::RedisFuture<'a, Box<dyn Iterator<Item = SocketAddr> + Send + 'a>> {
        let (host, port) = self
            .0
            .get(&(host.to_owned(), port))
            .cloned()
            .unwrap_or_else(|| (host.to_owned(), port));
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect();
            Ok(Box::new(addrs.into_iter()) as Box<dyn Iterator<Item = SocketAddr> + Send>)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_or_are_refused() {
        let map = |a: &str, b: &str| AddressMap::parse(&BTreeMap::from([(a.into(), b.into())]));
        assert!(map("10.0.0.5:6379", "127.0.0.1:17000").is_ok());
        assert!(map("[::1]:6379", "localhost:7000").is_ok());
        for bad in ["10.0.0.5", "10.0.0.5:", ":6379", "10.0.0.5:70000", "a b:1"] {
            assert!(map(bad, "127.0.0.1:1").is_err(), "{bad}");
            assert!(map("127.0.0.1:1", bad).is_err(), "{bad}");
        }
    }
}
