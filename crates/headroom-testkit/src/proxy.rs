use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Pass,
    Delay(Duration),
    Stall,
    Cut,
}

/// A TCP proxy on a loopback port between a client and a server, with faults on command.
///
/// - [`cut`](Self::cut): every open connection is closed at once and new ones are closed as
///   soon as they are accepted, until [`restore`](Self::restore).
/// - [`stall`](Self::stall): connections stay open but no byte is forwarded either way (bytes
///   are held and delivered in order after [`restore`](Self::restore)).
/// - [`delay`](Self::delay): every chunk is forwarded after a delay.
/// - [`silence`](Self::silence): the connections open now go silent for good, while new ones
///   pass, as when a peer vanishes without closing (a frozen host, a dead NAT entry).
/// - [`redirect`](Self::redirect): new connections go to another server, open ones stay, as
///   when a failover moves a DNS name or a service's address to the new primary.
///
/// The proxy runs on the tokio runtime that started it and stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Connections numbered below this forward nothing any more.
    silenced_below: watch::Sender<u64>,
    /// Connections numbered below this are closed.
    cut_below: watch::Sender<u64>,
    upstream: watch::Sender<SocketAddr>,
    opened: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` on a free loopback port.
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy port");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, watcher) = watch::channel(Mode::Pass);
        let (silenced_below, silenced) = watch::channel(0);
        let (cut_below, cut) = watch::channel(0);
        let (upstream, upstreams) = watch::channel(upstream);
        let opened = Arc::new(AtomicU64::new(0));
        let links = Links {
            mode: watcher,
            silenced,
            cut,
            opened: Arc::clone(&opened),
        };
        let task = tokio::spawn(accept_loop(listener, upstreams, links));
        Self {
            addr,
            mode,
            silenced_below,
            cut_below,
            upstream,
            opened,
            task,
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `redis://` URL clients connect to.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Closes every connection and refuses new ones until [`restore`](Self::restore). The
    /// connections open now are closed even if `restore` follows at once.
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
        self.cut_below
            .send_replace(self.opened.load(Ordering::SeqCst));
    }

    /// Holds every byte in both directions until [`restore`](Self::restore).
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stall);
    }

    /// Delays every forwarded chunk by `delay`.
    pub fn delay(&self, delay: Duration) {
        self.mode.send_replace(Mode::Delay(delay));
    }

    /// Forwards normally again. Connections made silent by [`silence`](Self::silence) stay so.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Pass);
    }

    /// Sends the connections made from now on to `upstream`; the open ones stay where they are.
    pub fn redirect(&self, upstream: SocketAddr) {
        self.upstream.send_replace(upstream);
    }

    /// Makes every connection open now silent for good: it stays open, and the bytes sent on
    /// it in either direction are dropped. Connections made afterwards forward normally.
    pub fn silence(&self) {
        self.silenced_below
            .send_replace(self.opened.load(Ordering::SeqCst));
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cut_below.send_replace(u64::MAX);
        self.mode.send_replace(Mode::Cut);
        self.task.abort();
    }
}

/// What every connection of a proxy watches.
#[derive(Clone)]
struct Links {
    mode: watch::Receiver<Mode>,
    silenced: watch::Receiver<u64>,
    cut: watch::Receiver<u64>,
    opened: Arc<AtomicU64>,
}

async fn accept_loop(listener: TcpListener, upstreams: watch::Receiver<SocketAddr>, links: Links) {
    while let Ok((client, _)) = listener.accept().await {
        let upstream = *upstreams.borrow();
        if *links.mode.borrow() == Mode::Cut {
            drop(client);
            continue;
        }
        let number = links.opened.fetch_add(1, Ordering::SeqCst);
        let (mode, silenced, mut cut) = (
            links.mode.clone(),
            links.silenced.clone(),
            links.cut.clone(),
        );
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            // Either direction ending (EOF, error or cut) closes the whole connection.
            let silenced = move || *silenced.borrow() > number;
            tokio::select! {
                () = pump(client_read, server_write, mode.clone(), silenced.clone()) => {}
                () = pump(server_read, client_write, mode, silenced) => {}
                _ = cut.wait_for(|&below| below > number) => {}
            }
        });
    }
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    silenced: impl Fn() -> bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if silenced() {
            continue;
        }
        loop {
            let current = *mode.borrow_and_update();
            match current {
                Mode::Pass => break,
                Mode::Delay(delay) => {
                    tokio::time::sleep(delay).await;
                    break;
                }
                Mode::Stall => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
                Mode::Cut => return,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
