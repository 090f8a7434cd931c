//! The service processes: started, drained, stopped gracefully or killed, and found by the load
//! through the instances that are up.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::proto::{Client, ServiceRequest, ServiceResponse, Stats};

/// How long an instance may take to start or to stop gracefully.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the driver waits for an instance's answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// One running service process.
#[derive(Debug)]
struct Process {
    child: Child,
    /// The instance's standard input, held open while the trial runs: when the trial dies,
    /// however it dies, the pipe closes and the instance exits with it.
    _lifeline: tokio::process::ChildStdin,
}

/// The counters of one slot across its processes.
#[derive(Clone, Debug, Default)]
struct Counted {
    /// What the slot's earlier processes counted.
    carried: Stats,
    /// What the current process had counted when it was rebased (not the slot's doing).
    offset: Stats,
}

/// The instances of the service, by slot; a slot is empty while its instance is down.
///
/// Each slot's counters add up over its processes, so that a window sees what the slot
/// counted however often it was restarted.
#[derive(Debug)]
pub struct Fleet {
    binary: PathBuf,
    db: SocketAddr,
    seeds: Vec<String>,
    /// Per slot: cluster node addresses its instance dials through other addresses.
    routes: Vec<Vec<(SocketAddr, SocketAddr)>>,
    slots: Vec<RwLock<Option<Arc<Client>>>>,
    processes: tokio::sync::Mutex<Vec<Option<Process>>>,
    counted: tokio::sync::Mutex<Vec<Counted>>,
}

impl Fleet {
    /// A fleet of `size` slots running `binary` against the database and the cluster seeds.
    pub fn new(binary: PathBuf, size: usize, db: SocketAddr, seeds: Vec<String>) -> Self {
        Self {
            binary,
            db,
            seeds,
            routes: vec![Vec::new(); size],
            slots: (0..size).map(|_| RwLock::new(None)).collect(),
            processes: tokio::sync::Mutex::new((0..size).map(|_| None).collect()),
            counted: tokio::sync::Mutex::new(vec![Counted::default(); size]),
        }
    }

    /// Makes every instance of `slot` reach each cluster node (`announced`) through
    /// `reachable` instead, e.g. a fault proxy that can cut it from Redis.
    pub fn with_route(mut self, slot: usize, announced: SocketAddr, reachable: SocketAddr) -> Self {
        self.routes[slot].push((announced, reachable));
        self
    }

    /// How many slots the fleet has.
    pub fn size(&self) -> usize {
        self.slots.len()
    }

    /// Starts the instance of `slot` and waits until it serves.
    pub async fn start(&self, slot: usize) -> io::Result<()> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut child = Command::new(&self.binary)
            .arg(port.to_string())
            .arg(self.db.to_string())
            .arg(slot.to_string())
            .args(self.routes[slot].iter().flat_map(|(announced, reachable)| {
                ["--via".to_owned(), format!("{announced}={reachable}")]
            }))
            .args(&self.seeds)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let lifeline = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        if !matches!(ready, Ok(Ok(Some(ref line))) if line == "ready") {
            return Err(io::Error::other(format!("instance {slot} did not start")));
        }
        self.counted.lock().await[slot].offset = Stats::default();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let client = Arc::new(Client::new(addr, ANSWER_TIMEOUT));
        self.processes.lock().await[slot] = Some(Process {
            child,
            _lifeline: lifeline,
        });
        *self.slot(slot) = Some(client);
        Ok(())
    }

    /// Takes the instance of `slot` out of the load, waits for its requests to finish, and
    /// stops it with SIGTERM (it shuts headroom down gracefully). The slot is emptied first,
    /// as in [`Fleet::kill`]: the load tells a request cut off by the schedule by that.
    pub async fn stop(&self, slot: usize) -> io::Result<()> {
        let client = self.slot(slot).take();
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.carry(slot, client).await;
        let Some(mut process) = self.processes.lock().await[slot].take() else {
            return Ok(());
        };
        if let Some(pid) = process.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(START_TIMEOUT, process.child.wait()).await {
            Ok(status) => status.map(drop),
            Err(_) => Err(io::Error::other(format!("instance {slot} did not stop"))),
        }
    }

    /// Kills the instance of `slot` with SIGKILL, requests in flight included.
    pub async fn kill(&self, slot: usize) -> io::Result<()> {
        let client = self.slot(slot).take();
        self.carry(slot, client).await;
        if let Some(mut process) = self.processes.lock().await[slot].take() {
            process.child.kill().await?;
        }
        Ok(())
    }

    /// The client of the instance of `slot`, if it is up.
    pub fn client(&self, slot: usize) -> Option<Arc<Client>> {
        self.slots[slot]
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What each slot counted over all its processes (`None` while a slot is down or does
    /// not answer), leaving out what a process counted before it was rebased.
    pub async fn stats(&self) -> Vec<Option<Stats>> {
        let mut all = Vec::new();
        for slot in 0..self.size() {
            let current = match self.client(slot) {
                Some(client) => process_stats(&client).await,
                None => None,
            };
            let counted = self.counted.lock().await[slot].clone();
            all.push(current.map(|now| counted.carried.plus(&now.since(&counted.offset))));
        }
        all
    }

    /// Leaves out of the slot's counters what its current process counted so far: a newcomer
    /// catching up (its empty L1 flushed as it first hears each other instance) is not
    /// something another instance's fault caused.
    pub async fn rebase(&self, slot: usize) {
        if let Some(client) = self.client(slot)
            && let Some(now) = process_stats(&client).await
        {
            self.counted.lock().await[slot].offset = now;
        }
    }

    /// Adds what the slot's ending process counted (since its rebase) to what it carries.
    async fn carry(&self, slot: usize, client: Option<Arc<Client>>) {
        let Some(client) = client else { return };
        if let Some(last) = process_stats(&client).await {
            let mut counted = self.counted.lock().await;
            let entry = &mut counted[slot];
            entry.carried = entry.carried.plus(&last.since(&entry.offset));
        }
    }

    /// Stops every instance gracefully.
    pub async fn stop_all(&self) {
        for slot in 0..self.size() {
            let _ = self.stop(slot).await;
        }
    }

    /// Puts `client` in `slot` (or empties it) with no process behind it: the load's view
    /// of an instance, for tests that serve it themselves.
    #[cfg(test)]
    pub(crate) fn set_client(&self, slot: usize, client: Option<Arc<Client>>) {
        *self.slot(slot) = client;
    }

    fn slot(&self, slot: usize) -> std::sync::RwLockWriteGuard<'_, Option<Arc<Client>>> {
        self.slots[slot]
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

async fn process_stats(client: &Client) -> Option<Stats> {
    client
        .call::<_, ServiceResponse>(&ServiceRequest::Stats)
        .await
        .ok()
        .and_then(|answer| answer.stats)
}
