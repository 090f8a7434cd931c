//! The wire format (one JSON object per line) and a small pooled client.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;

/// What the driver asks of a service.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ServiceRequest {
    /// Read a product through the cache; answers the version served.
    Read {
        /// The product.
        key: String,
    },
    /// Read a product through the cache with a fleet-wide single flight (one load per key
    /// across every instance).
    ReadLocked {
        /// The product.
        key: String,
    },
    /// Change a product in the database, then in the cache; answers the new version.
    Write {
        /// The product.
        key: String,
    },
    /// Place an order once per idempotency key, within the tenant's rate limit.
    Checkout {
        /// The customer, the scope of the key and of the rate limit.
        tenant: String,
        /// The customer's rate-limit tier.
        tier: String,
        /// The idempotency key.
        key: String,
    },
    /// Database-heavy work of the lowest priority.
    Report,
    /// Write `count` products of its own as fast as the instance can.
    Burst {
        /// How many writes.
        count: u32,
    },
    /// The instance's counters.
    Stats,
}

/// What a service answers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceResponse {
    /// `ok`, or why not: `shed`, `rate_limited`, `in_progress`, `db`, `cache`, `idempotency`.
    pub outcome: String,
    /// The product version served or written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The order placed (the same for every retry of one key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<u64>,
    /// Whether the order was a replay.
    #[serde(default)]
    pub replayed: bool,
    /// Counters, for `Stats`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
}

impl ServiceResponse {
    /// An answer with only an outcome.
    pub fn outcome(outcome: &str) -> Self {
        Self {
            outcome: outcome.to_owned(),
            ..Self::default()
        }
    }

    /// Whether the request did what it asked.
    pub fn is_ok(&self) -> bool {
        self.outcome == "ok"
    }
}

/// One instance's counters since it started.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    /// L1 flushes by reason (`headroom_cache_invalidation_flushes_total`).
    pub flushes: std::collections::BTreeMap<String, u64>,
    /// L2 hits of the product cache.
    pub l2_hits: u64,
    /// L2 misses of the product cache.
    pub l2_misses: u64,
    /// Loader calls made by this instance.
    pub loads: u64,
    /// Invalidation messages this instance failed to publish.
    pub publish_errors: u64,
    /// Whether L1 is in use now.
    pub l1_in_use: bool,
}

impl Stats {
    /// Counters added up (`l1_in_use` from `other`, the later look).
    pub fn plus(&self, other: &Stats) -> Stats {
        let mut flushes = self.flushes.clone();
        for (reason, count) in &other.flushes {
            *flushes.entry(reason.clone()).or_default() += count;
        }
        Stats {
            flushes,
            l2_hits: self.l2_hits + other.l2_hits,
            l2_misses: self.l2_misses + other.l2_misses,
            loads: self.loads + other.loads,
            publish_errors: self.publish_errors + other.publish_errors,
            l1_in_use: other.l1_in_use,
        }
    }

    /// What was counted since `earlier`, a look at the same process.
    pub fn since(&self, earlier: &Stats) -> Stats {
        let flushes = self
            .flushes
            .iter()
            .map(|(reason, count)| {
                let before = earlier.flushes.get(reason).copied().unwrap_or(0);
                (reason.clone(), count.saturating_sub(before))
            })
            .collect();
        Stats {
            flushes,
            l2_hits: self.l2_hits.saturating_sub(earlier.l2_hits),
            l2_misses: self.l2_misses.saturating_sub(earlier.l2_misses),
            loads: self.loads.saturating_sub(earlier.loads),
            publish_errors: self.publish_errors.saturating_sub(earlier.publish_errors),
            l1_in_use: self.l1_in_use,
        }
    }

    /// L1 flushes over every reason.
    pub fn total_flushes(&self) -> u64 {
        self.flushes.values().sum()
    }
}

/// What a service asks of the database.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum DbRequest {
    /// The current version of a product (a cache load).
    Get {
        /// The product.
        key: String,
        /// Microseconds the load waited behind its instance's shedder before this request
        /// (the cache had missed L2 before that wait began).
        queued_us: u64,
    },
    /// A new version of a product.
    Put {
        /// The product.
        key: String,
    },
    /// Place the order of an idempotency key (counted per key).
    Checkout {
        /// The idempotency key (tenant first).
        key: String,
    },
    /// Heavy work.
    Report,
}

/// What the database answers: a version or an order number.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DbResponse {
    /// The version or order number.
    pub value: u64,
}

/// A pool of persistent connections to one address; one request per line, answered in order.
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    timeout: Duration,
    idle: Mutex<Vec<Connection>>,
}

#[derive(Debug)]
struct Connection {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    /// A client for `addr` whose calls fail after `timeout`.
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        Self {
            addr,
            timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends `request` and reads the answer. A connection that failed is dropped, not reused.
    pub async fn call<Q: Serialize, A: DeserializeOwned>(&self, request: &Q) -> io::Result<A> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        let pooled = self.idle.lock().await.pop();
        let work = async {
            let mut connection = match pooled {
                Some(connection) => connection,
                None => {
                    let (read, writer) = TcpStream::connect(self.addr).await?.into_split();
                    Connection {
                        reader: BufReader::new(read),
                        writer,
                    }
                }
            };
            connection.writer.write_all(&line).await?;
            let mut answer = String::new();
            if connection.reader.read_line(&mut answer).await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
            }
            let answer = serde_json::from_str(&answer)?;
            Ok((connection, answer))
        };
        let (connection, answer) = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))??;
        self.idle.lock().await.push(connection);
        Ok(answer)
    }
}

/// Serves one connection: reads request lines, answers each with `handle`, in order.
pub async fn serve_lines<Q, A, F, Fut>(stream: TcpStream, handle: F)
where
    Q: DeserializeOwned,
    A: Serialize,
    F: Fn(Q) -> Fut,
    Fut: Future<Output = A>,
{
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(request) = serde_json::from_str::<Q>(&line) else {
            return;
        };
        let mut answer = match serde_json::to_vec(&handle(request).await) {
            Ok(answer) => answer,
            Err(_) => return,
        };
        answer.push(b'\n');
        if write.write_all(&answer).await.is_err() {
            return;
        }
    }
}
