use std::fmt;
use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use headroom_core::{BackendError, BackendErrorKind};
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};

use crate::address_map::AddressMap;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, FromRedisValue, Pipeline, RedisResult, ScriptInvocation,
};
use tokio::sync::Notify;

use crate::error::backend_error;
use crate::{RedisConfig, RedisMode};

/// One shared connection to Redis, standalone or cluster: clone it freely, every clone shares
/// the same multiplexed connections.
///
/// - Every command is bounded by [`RedisConfig::command_timeout`], reconnection included:
///   a stalled or cut connection yields [`BackendErrorKind::Timeout`] or
///   [`BackendErrorKind::Connection`], never a hang.
/// - A lost connection is re-established by itself in the background: the first dial goes out
///   at once, and while dials fail the waits between them double from
///   [`RedisConfig::reconnect_min_delay`] up to [`RedisConfig::reconnect_max_delay`], on one
///   schedule per handle however many commands arrive. Meanwhile commands fail at once with
///   [`BackendErrorKind::Connection`] (or time out, on a cluster or a silent connection); once
///   a dial succeeds they succeed again. No caller has to rebuild the handle.
/// - A connection that goes silent without closing (a frozen host, a dead NAT entry), which
///   the socket never reports, is replaced: the handle `PING`s it (standalone, asks its
///   `ROLE`) every [`RedisConfig::reconnect_max_delay`], and at once after a command timed
///   out, and when that gets no answer within the command timeout it dials a new connection
///   to take its place. Commands fail with [`BackendErrorKind::Timeout`] until then.
/// - A standalone server that a failover demoted to a replica without dropping its clients
///   (writes answer `READONLY`, an [`BackendErrorKind::Unavailable`] here) is left: after such
///   a refusal the handle asks the server's `ROLE` at once and dials the address again, which
///   the failover moves to the new primary.
#[derive(Clone)]
pub struct Redis {
    link: Arc<Link>,
    config: Arc<RedisConfig>,
}

/// A multiplexed connection: clones share it. The handle's standalone connection is a plain
/// one that it redials itself; the bus's reconnects and resubscribes by itself.
#[derive(Clone)]
pub(crate) enum Conn<S = ConnectionManager> {
    Standalone(S),
    Cluster(ClusterConnection),
}

impl<S: ConnectionLike + Send> Conn<S> {
    /// Runs one command within `timeout`.
    pub(crate) async fn query<T: FromRedisValue>(
        self,
        cmd: &Cmd,
        timeout: Duration,
    ) -> Result<T, BackendError> {
        match self {
            Self::Standalone(mut c) => bounded(timeout, cmd.query_async(&mut c)).await,
            Self::Cluster(mut c) => bounded(timeout, cmd.query_async(&mut c)).await,
        }
    }
}

/// The connection in use, and what dials a new one when it goes silent or closes.
struct Link {
    conn: ArcSwap<Conn<MultiplexedConnection>>,
    dialer: Dialer,
    /// Wakes the watcher early: a command timed out (or found a standalone connection closed).
    suspect: Arc<Notify>,
}

enum Dialer {
    Standalone(Client),
    Cluster(Box<ClusterClient>),
}

impl Dialer {
    async fn dial(
        &self,
        config: &RedisConfig,
    ) -> Result<Conn<MultiplexedConnection>, BackendError> {
        let deadline = config.connect_timeout.saturating_mul(2);
        Ok(match self {
            Self::Standalone(client) => {
                let settings = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(config.connect_timeout))
                    .set_response_timeout(Some(config.command_timeout));
                let dial = client.get_multiplexed_async_connection_with_config(&settings);
                Conn::Standalone(bounded(deadline, dial).await?)
            }
            Self::Cluster(client) => {
                Conn::Cluster(bounded(deadline, client.get_async_connection()).await?)
            }
        })
    }
}

/// Why a connection must be replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// A `PING` got no answer within the command timeout.
    Silent,
    /// A standalone connection closed: the handle redials it itself.
    Lost,
    /// A standalone server that is a replica now (a failover demoted it and kept its
    /// clients): the address may lead to the new primary.
    Demoted,
}

impl Link {
    /// `PING`s the connection (standalone, asks its `ROLE`): whether it must be replaced,
    /// and why.
    async fn check(&self, config: &RedisConfig) -> Option<Fault> {
        let conn = Conn::clone(&self.conn.load());
        if self.is_cluster() {
            // A cluster connection reconnects its nodes and follows failovers by itself.
            let ping = conn
                .query::<()>(&redis::cmd("PING"), config.command_timeout)
                .await;
            return (ping.map_err(|error| error.kind()) == Err(BackendErrorKind::Timeout))
                .then_some(Fault::Silent);
        }
        let role = conn
            .query::<Vec<redis::Value>>(&redis::cmd("ROLE"), config.command_timeout)
            .await;
        match role {
            Ok(role) => match role.first() {
                Some(redis::Value::BulkString(role)) if role.as_slice() == b"slave" => {
                    Some(Fault::Demoted)
                }
                _ => None,
            },
            Err(error) => match error.kind() {
                BackendErrorKind::Timeout => Some(Fault::Silent),
                BackendErrorKind::Connection => Some(Fault::Lost),
                // A server that refuses `ROLE` (a restricted command) answered: it is there.
                _ => None,
            },
        }
    }

    /// Dials a new connection in the old one's place; whether it did. The old connection
    /// closes once the commands still holding it end.
    async fn redial(&self, config: &RedisConfig, fault: Fault) -> bool {
        match self.dialer.dial(config).await {
            Ok(fresh) => {
                tracing::warn!(?fault, "Redis connection replaced by a new one");
                self.conn.store(Arc::new(fresh));
                true
            }
            Err(error) => {
                tracing::warn!(%error, ?fault, "dialing a new Redis connection failed");
                false
            }
        }
    }

    fn is_cluster(&self) -> bool {
        matches!(self.dialer, Dialer::Cluster(_))
    }
}

/// Checks the connection every `reconnect_max_delay`, and at once after a command timed out
/// (or, standalone, failed on a closed connection), until every handle is dropped, and
/// replaces a connection that went silent or closed. Callers that give up before the command
/// timeout (the cache's L2 timeout, a rate limiter's) see no timeout of the handle's: the
/// regular checks notice the silence all the same.
///
/// The first dial goes out at once; then each waits, from `reconnect_min_delay` doubling up
/// to `reconnect_max_delay`, until a check finds a connection answering (a connection that
/// drops again before that is redialed after the grown wait: a flapping server is not
/// dialed faster): an outage costs Redis
/// one dial per `reconnect_max_delay` per handle, however many commands fail meanwhile. A
/// replacement of a silent connection is followed by a full interval, so that a server that is
/// slow rather than gone is not redialed over and over.
async fn watch(link: Weak<Link>, suspect: Arc<Notify>, config: Arc<RedisConfig>) {
    let every = config.reconnect_max_delay;
    let mut wait: Option<Duration> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = suspect.notified() => {}
        }
        let Some(strong) = link.upgrade() else {
            return;
        };
        let Some(fault) = strong.check(&config).await else {
            wait = None;
            continue;
        };
        drop(strong);
        loop {
            if let Some(wait) = wait {
                tokio::time::sleep(wait).await;
            }
            wait = Some(next_wait(wait, &config));
            let Some(strong) = link.upgrade() else {
                return;
            };
            if strong.redial(&config, fault).await {
                break;
            }
        }
        // Not redialed over and over: a slow server, or an address still leading to the
        // demoted one.
        if matches!(fault, Fault::Silent | Fault::Demoted) {
            tokio::time::sleep(every).await;
        }
    }
}

/// The wait before the dial after one that waited `wait` (none: the first).
fn next_wait(wait: Option<Duration>, config: &RedisConfig) -> Duration {
    // At least 1 ms, so that a zero `reconnect_min_delay` still grows.
    wait.map_or(config.reconnect_min_delay, |wait| {
        wait.saturating_mul(2).max(Duration::from_millis(1))
    })
    .min(config.reconnect_max_delay)
}

impl Redis {
    /// Connects to Redis as `config` says; fails if the first connection cannot be made.
    pub async fn connect(config: RedisConfig) -> Result<Self, BackendError> {
        config
            .validate()
            .map_err(|detail| BackendError::with_detail(BackendErrorKind::Config, detail))?;
        let dialer = match config.mode {
            RedisMode::Standalone => {
                Dialer::Standalone(Client::open(config.urls[0].as_str()).map_err(backend_error)?)
            }
            RedisMode::Cluster => {
                let client = ClusterClientBuilder::new(config.urls.iter().map(String::as_str))
                    .connection_timeout(config.connect_timeout)
                    // Past the command timeout: the client sends a timed-out command again
                    // by itself, and a write the caller saw fail must not run twice.
                    .response_timeout(config.command_timeout.saturating_mul(2))
                    .retries(2)
                    .min_retry_wait(millis(config.reconnect_min_delay))
                    .max_retry_wait(millis(config.reconnect_max_delay));
                Dialer::Cluster(Box::new(
                    cluster_address_map(client, &config)
                        .build()
                        .map_err(backend_error)?,
                ))
            }
        };
        let conn = dialer.dial(&config).await?;
        let suspect = Arc::new(Notify::new());
        let link = Arc::new(Link {
            conn: ArcSwap::from_pointee(conn),
            dialer,
            suspect: Arc::clone(&suspect),
        });
        let config = Arc::new(config);
        tokio::spawn(watch(Arc::downgrade(&link), suspect, Arc::clone(&config)));
        Ok(Self { link, config })
    }

    /// The configuration this handle was made with.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// Whether this handle talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.link.is_cluster()
    }

    fn conn(&self) -> Conn<MultiplexedConnection> {
        Conn::clone(&self.link.conn.load())
    }

    /// Passes `result` on; a timeout, or on a standalone server a closed connection or a
    /// refusal of a server not able to serve (a replica's `READONLY`), makes the watcher
    /// check the connection at once.
    fn noticed<T>(&self, result: Result<T, BackendError>) -> Result<T, BackendError> {
        if let Err(error) = &result
            && (error.kind() == BackendErrorKind::Timeout
                || matches!(
                    error.kind(),
                    BackendErrorKind::Connection | BackendErrorKind::Unavailable
                ) && !self.is_cluster())
        {
            self.link.suspect.notify_one();
        }
        result
    }

    /// Runs one command within the command timeout.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, BackendError> {
        let result = self.conn().query(cmd, self.config.command_timeout).await;
        self.noticed(result)
    }

    /// Runs a pipeline (one round trip) within the command timeout.
    ///
    /// On a cluster, every command of the pipeline must address keys of one slot.
    pub async fn query_pipeline<T: FromRedisValue>(
        &self,
        pipeline: &Pipeline,
    ) -> Result<T, BackendError> {
        let timeout = self.config.command_timeout;
        let result = match self.conn() {
            Conn::Standalone(mut c) => bounded(timeout, pipeline.query_async(&mut c)).await,
            Conn::Cluster(mut c) => bounded(timeout, pipeline.query_async(&mut c)).await,
        };
        self.noticed(result)
    }

    /// Runs a Lua script by its SHA (`EVALSHA`), loading it first if the server lacks it,
    /// within the command timeout.
    pub async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, BackendError> {
        let timeout = self.config.command_timeout;
        let result = match self.conn() {
            Conn::Standalone(mut c) => bounded(timeout, invocation.invoke_async(&mut c)).await,
            Conn::Cluster(mut c) => bounded(timeout, invocation.invoke_async(&mut c)).await,
        };
        self.noticed(result)
    }

    /// Sends `PING` and waits for the answer: a health check.
    pub async fn ping(&self) -> Result<(), BackendError> {
        let pong: String = self.query(&redis::cmd("PING")).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(BackendError::with_detail(
                BackendErrorKind::Protocol,
                format!("PING answered {pong:?}"),
            ))
        }
    }
}

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redis")
            .field("mode", &self.config.mode)
            .field("urls", &self.config.urls)
            .finish_non_exhaustive()
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Runs `future` within `timeout`, mapping both failures to a [`BackendError`].
pub(crate) async fn bounded<T>(
    timeout: Duration,
    future: impl Future<Output = RedisResult<T>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout(timeout, future).await {
        Ok(result) => result.map_err(backend_error),
        Err(_) => Err(BackendError::with_detail(
            BackendErrorKind::Timeout,
            format!("no answer from Redis within {timeout:?}"),
        )),
    }
}

/// A cluster client that dials through `config.address_map`.
pub(crate) fn cluster_address_map(
    builder: ClusterClientBuilder,
    config: &RedisConfig,
) -> ClusterClientBuilder {
    match AddressMap::parse(&config.address_map) {
        Ok(map) if !map.is_empty() => builder.async_dns_resolver(map),
        _ => builder,
    }
}
