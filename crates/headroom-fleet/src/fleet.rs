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

/// One running service process.
#[derive(Debug)]
struct Process {
    child: Child,
}

/// The instances of the service, by slot; a slot is empty while its instance is down.
#[derive(Debug)]
pub struct Fleet {
    binary: PathBuf,
    db: SocketAddr,
    seeds: Vec<String>,
    slots: Vec<RwLock<Option<Arc<Client>>>>,
    processes: tokio::sync::Mutex<Vec<Option<Process>>>,
}

impl Fleet {
    /// A fleet of `size` slots running `binary` against the database and the cluster seeds.
    pub fn new(binary: PathBuf, size: usize, db: SocketAddr, seeds: Vec<String>) -> Self {
        Self {
            binary,
            db,
            seeds,
            slots: (0..size).map(|_| RwLock::new(None)).collect(),
            processes: tokio::sync::Mutex::new((0..size).map(|_| None).collect()),
        }
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
            .args(&self.seeds)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        if !matches!(ready, Ok(Ok(Some(ref line))) if line == "ready") {
            return Err(io::Error::other(format!("instance {slot} did not start")));
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let client = Arc::new(Client::new(addr, Duration::from_secs(5)));
        self.processes.lock().await[slot] = Some(Process { child });
        *self.slot(slot) = Some(client);
        Ok(())
    }

    /// Takes the instance of `slot` out of the load, waits for its requests to finish, and
    /// stops it with SIGTERM (it shuts headroom down gracefully).
    pub async fn stop(&self, slot: usize) -> io::Result<()> {
        self.slot(slot).take();
        tokio::time::sleep(Duration::from_millis(300)).await;
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
        self.slot(slot).take();
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

    /// The counters of every instance that is up, by slot.
    pub async fn stats(&self) -> Vec<Option<Stats>> {
        let mut all = Vec::new();
        for slot in 0..self.size() {
            let stats = match self.client(slot) {
                Some(client) => client
                    .call::<_, ServiceResponse>(&ServiceRequest::Stats)
                    .await
                    .ok()
                    .and_then(|answer| answer.stats),
                None => None,
            };
            all.push(stats);
        }
        all
    }

    /// Stops every instance gracefully.
    pub async fn stop_all(&self) {
        for slot in 0..self.size() {
            let _ = self.stop(slot).await;
        }
    }

    fn slot(&self, slot: usize) -> std::sync::RwLockWriteGuard<'_, Option<Arc<Client>>> {
        self.slots[slot]
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
