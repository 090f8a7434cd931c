use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::sync::Mutex;

const INSTALL_HINT: &str = "redis-server was not found on PATH. Install it with \
     `sudo apt-get install -y redis-server` (Debian/Ubuntu), or run the README's test command, \
     which installs it.";

/// How long a server may take to serve: to listen, and to load its data.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a [`RedisServer`] with extra configuration.
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct RedisServerBuilder {
    args: Vec<String>,
    port: Option<u16>,
    /// A cluster node: its bus port, `port + 10000`, must be free too.
    bus: bool,
}

impl RedisServerBuilder {
    /// Adds a configuration directive, for example `.config("notify-keyspace-events", "KEA")`.
    pub fn config(mut self, name: &str, value: &str) -> Self {
        self.args.push(format!("--{name}"));
        self.args.push(value.to_owned());
        self
    }

    /// Listens on `port` instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Chooses a port whose cluster bus port (`port + 10000`) is free too.
    fn cluster_node(mut self) -> Self {
        self.bus = true;
        self
    }

    /// Starts the server and waits until it serves (its data loaded). A port the kit chose that was
    /// taken before the server could listen on it is given up for another.
    ///
    /// # Panics
    ///
    /// If `redis-server` is missing or does not start: test support fails loudly.
    pub fn start(self) -> RedisServer {
        let mut attempts = 0;
        loop {
            let port = self.port.unwrap_or_else(|| free_port(self.bus));
            let server = RedisServer {
                port,
                dir: scratch_dir(port),
                args: self.args.clone(),
                process: Mutex::new(None),
            };
            let Err(log) = server.try_spawn() else {
                return server;
            };
            // Not `kill`, which waits for the port to close: it may be another's.
            server.stop();
            if self.port.is_some() || attempts >= 10 || !log.contains(PORT_TAKEN) {
                panic!(
                    "redis-server on port {port} did not serve within {START_TIMEOUT:?}; log:\n{log}"
                );
            }
            attempts += 1;
        }
    }
}

/// A real `redis-server` process on a loopback port, stopped when dropped.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    process: Mutex<Option<Process>>,
}

#[derive(Debug)]
struct Process {
    guard: Child,
    // Closing this pipe tells the guard shell to kill the server.
    _lifeline: ChildStdin,
    pid: u32,
}

impl RedisServer {
    /// Starts a server with default configuration (no persistence) on a free port.
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// Starts building a server.
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    /// The port the server listens on (it keeps it across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket address of the server.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The `redis://` URL of the server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's working directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills the server with `SIGKILL` and waits for it to exit. Unpersisted data is lost.
    pub fn kill(&self) {
        if self.stop() {
            wait_until_port_closed(self.port);
        }
    }

    /// Kills the server's process, if it runs, and waits for it to exit; whether it ran.
    fn stop(&self) -> bool {
        let Some(mut process) = self.lock().take() else {
            return false;
        };
        signal(process.pid, "KILL");
        drop(process._lifeline);
        // The guard shell exits once its server is gone.
        let _ = process.guard.wait();
        true
    }

    /// Starts the server again on the same port (after [`kill`](Self::kill), or to restart it).
    pub fn restart(&self) {
        self.kill();
        self.spawn();
    }

    /// Freezes the server with `SIGSTOP`: connections stay open but nothing is answered.
    pub fn pause(&self) {
        if let Some(process) = self.lock().as_ref() {
            signal(process.pid, "STOP");
        }
    }

    /// Thaws a server frozen by [`pause`](Self::pause).
    pub fn resume(&self) {
        if let Some(process) = self.lock().as_ref() {
            signal(process.pid, "CONT");
        }
    }

    /// Whether the server process is running (it may be paused).
    pub fn is_running(&self) -> bool {
        self.lock().is_some()
    }

    /// Runs `redis-cli` against this server and returns its output, for admin commands in
    /// tests (`CONFIG SET`, `CLIENT KILL`, `DEBUG`, writing foreign data).
    ///
    /// # Panics
    ///
    /// If `redis-cli` cannot run or exits with an error.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Process>> {
        self.process
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn spawn(&self) {
        if let Err(log) = self.try_spawn() {
            self.stop();
            panic!(
                "redis-server on port {} did not serve within {START_TIMEOUT:?}; log:\n{log}",
                self.port
            );
        }
    }

    /// Starts the server and waits until it serves (its data loaded); its log when it does not.
    fn try_spawn(&self) -> Result<(), String> {
        ensure_installed();
        let mut args = vec![
            "--port".to_owned(),
            self.port.to_string(),
            "--bind".to_owned(),
            "127.0.0.1".to_owned(),
            "--save".to_owned(),
            String::new(),
            "--appendonly".to_owned(),
            "no".to_owned(),
            "--dir".to_owned(),
            self.dir.display().to_string(),
            "--logfile".to_owned(),
            "redis.log".to_owned(),
        ];
        args.extend(self.args.iter().cloned());
        // The guard shell starts the server, prints its pid, then waits for its stdin to close
        // (the test process ended or dropped the server) and kills it.
        let mut guard = Command::new("sh")
            .arg("-c")
            .arg(r#"redis-server "$@" & echo $!; cat >/dev/null; kill -9 $! 2>/dev/null; wait"#)
            .arg("sh")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}. {INSTALL_HINT}"));
        let lifeline = guard.stdin.take().expect("guard stdin is piped");
        let mut line = String::new();
        BufReader::new(guard.stdout.take().expect("guard stdout is piped"))
            .read_line(&mut line)
            .expect("read redis-server pid");
        let pid = line
            .trim()
            .parse()
            .expect("guard prints the redis-server pid");
        *self.lock() = Some(Process {
            guard,
            _lifeline: lifeline,
            pid,
        });
        wait_until_serving(self.port, pid, &self.dir)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume();
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real Redis Cluster of `masters` masters, each with `replicas` replicas, on loopback.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    masters: usize,
}

impl RedisCluster {
    /// Starts a cluster of three masters and no replicas.
    pub fn start() -> Self {
        Self::start_with(3, 0)
    }

    /// Starts a cluster of `masters` masters (at least 3) with `replicas` replicas each, and
    /// waits until every node reports `cluster_state:ok`.
    pub fn start_with(masters: usize, replicas: usize) -> Self {
        assert!(masters >= 3, "a Redis Cluster needs at least three masters");
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| {
                RedisServer::builder()
                    .cluster_node()
                    .config("cluster-enabled", "yes")
                    .config("cluster-config-file", "nodes.conf")
                    .config("cluster-node-timeout", "2000")
                    // Replicas sync at once instead of waiting to batch a diskless transfer.
                    .config("repl-diskless-sync-delay", "0")
                    .start()
            })
            .collect();
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())));
        args.extend([
            "--cluster-replicas".into(),
            replicas.to_string(),
            "--cluster-yes".into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        redis_cli(nodes[0].port(), &args);
        let cluster = Self { nodes, masters };
        cluster.wait_until_ok();
        cluster.wait_until_replicas_synced();
        cluster
    }

    /// Waits until every running replica has a live link to its master: a replica that never
    /// finished its first sync refuses to fail over.
    ///
    /// # Panics
    ///
    /// If that does not happen within 30 seconds.
    pub fn wait_until_replicas_synced(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            loop {
                let info = redis_cli_lenient(node.port(), &["INFO", "replication"]);
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "replica not synced in time: {info}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Every node, masters first (as created).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The number of masters the cluster was created with.
    pub fn masters(&self) -> usize {
        self.masters
    }

    /// The URLs of every node, to use as seeds.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Waits until every running node reports `cluster_state:ok`.
    ///
    /// # Panics
    ///
    /// If that does not happen within 30 seconds.
    pub fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            loop {
                let info = redis_cli_lenient(node.port(), &["CLUSTER", "INFO"]);
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster not ok in time: {info}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// One line of `CLUSTER NODES`: a node's id, port, role and the slots it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    /// The node's cluster id.
    pub id: String,
    /// Its client port on 127.0.0.1.
    pub port: u16,
    /// Whether it is a master now (replicas become masters on failover).
    pub master: bool,
    /// Whether the cluster considers it failed.
    pub failed: bool,
    /// The slot ranges it serves (inclusive), empty for a replica.
    pub slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    /// The cluster's view of its nodes, asked of the first running node.
    ///
    /// # Panics
    ///
    /// If no node runs or the output cannot be read.
    pub fn topology(&self) -> Vec<ClusterNode> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.is_running())
            .expect("a running cluster node");
        parse_cluster_nodes(&redis_cli(node.port(), &["CLUSTER", "NODES"]))
    }

    /// The index in [`nodes`](Self::nodes) of the master serving `slot` now.
    ///
    /// # Panics
    ///
    /// If no master serves it.
    pub fn slot_owner(&self, slot: u16) -> usize {
        let owner = self
            .topology()
            .into_iter()
            .find(|n| {
                n.master && !n.failed && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
            })
            .unwrap_or_else(|| panic!("no master serves slot {slot}"));
        self.index_of_port(owner.port)
    }

    /// The slot of `key`, as the cluster computes it (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        let node = self
            .nodes
            .iter()
            .find(|n| n.is_running())
            .expect("a running cluster node");
        redis_cli(node.port(), &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT answers a number")
    }

    /// Moves `slot` and its keys to the master at index `to` while the cluster keeps serving
    /// (`SETSLOT IMPORTING/MIGRATING`, `MIGRATE` in batches, then `SETSLOT NODE` on every
    /// master), as `redis-cli --cluster reshard` does. Clients see `ASK` and `MOVED` redirects.
    ///
    /// # Panics
    ///
    /// If `to` is not a running master, or a step fails.
    pub fn migrate_slot(&self, slot: u16, to: usize) {
        let from = self.slot_owner(slot);
        if from == to {
            return;
        }
        let topology = self.topology();
        let id_of = |index: usize| {
            let port = self.nodes[index].port();
            topology
                .iter()
                .find(|n| n.port == port)
                .map(|n| n.id.clone())
                .expect("node in topology")
        };
        let (from_id, to_id) = (id_of(from), id_of(to));
        let (source, target) = (&self.nodes[from], &self.nodes[to]);
        let slot_arg = slot.to_string();
        target.cli(&["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &from_id]);
        source.cli(&["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &to_id]);
        let target_port = target.port().to_string();
        loop {
            let keys = source.cli(&["CLUSTER", "GETKEYSINSLOT", &slot_arg, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec![
                "MIGRATE",
                "127.0.0.1",
                &target_port,
                "",
                "0",
                "5000",
                "REPLACE",
                "KEYS",
            ];
            args.extend(keys);
            source.cli(&args);
        }
        // The new owner first, then the old one, then every other master (as redis-cli does).
        target.cli(&["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id]);
        source.cli(&["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id]);
        for node in topology.iter().filter(|n| n.master && !n.failed) {
            let index = self.index_of_port(node.port);
            if index != from && index != to {
                self.nodes[index].cli(&["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id]);
            }
        }
        self.wait_until_ok();
    }

    /// Kills the master at index `master` with `SIGKILL` and waits until one of its replicas has
    /// taken over every slot it served (needs a cluster started with replicas). Returns the index
    /// of the promoted replica. The killed node stays down; [`RedisServer::restart`] brings it
    /// back as a replica of the new master.
    ///
    /// # Panics
    ///
    /// If `master` has no replica or no failover happens within 30 seconds.
    pub fn fail_over(&self, master: usize) -> usize {
        let topology = self.topology();
        let port = self.nodes[master].port();
        let old = topology
            .iter()
            .find(|n| n.port == port && n.master)
            .cloned()
            .expect("the node to fail over is a master");
        assert!(!old.slots.is_empty(), "the master serves no slot");
        let slot = old.slots[0].0;
        self.nodes[master].kill();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let promoted = self.topology().into_iter().find(|n| {
                n.master
                    && !n.failed
                    && n.port != port
                    && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
            });
            if let Some(promoted) = promoted {
                self.wait_until_ok();
                return self.index_of_port(promoted.port);
            }
            assert!(
                Instant::now() < deadline,
                "no replica took over from node {master} in time"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn index_of_port(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| n.port() == port)
            .expect("a node of this cluster")
    }
}

fn parse_cluster_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert!(fields.len() >= 8, "unexpected CLUSTER NODES line: {line}");
            let port = fields[1]
                .split(['@', ','])
                .next()
                .and_then(|addr| addr.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("no port in CLUSTER NODES line: {line}"));
            let flags = fields[2];
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .map(|s| match s.split_once('-') {
                    Some((a, b)) => (a.parse().expect("slot"), b.parse().expect("slot")),
                    None => {
                        let one = s.parse().expect("slot");
                        (one, one)
                    }
                })
                .collect();
            ClusterNode {
                id: fields[0].to_owned(),
                port,
                master: flags.contains("master"),
                failed: flags.contains("fail") && !flags.contains("fail?"),
                slots,
            }
        })
        .collect()
}

/// One standalone server shared by every test of a test binary (for conformance suites that
/// do not disturb the server). Each test should use its own [`unique_namespace`](crate::unique_namespace).
pub fn shared_server() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

/// One three-master cluster shared by every test of a test binary.
pub fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(RedisCluster::start)
}

fn ensure_installed() {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(found, "{INSTALL_HINT}");
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}

/// What `redis-server` logs when its port was taken.
const PORT_TAKEN: &str = "Address already in use";

/// A port that is free now (and, for cluster nodes, whose bus port `port + 10000` is free
/// too), below the range the system gives outgoing connections: a port from that range could
/// be taken by a connection of another test between this check and the server's listening.
fn free_port(with_bus: bool) -> u16 {
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let bus = if with_bus { 10_000 } else { 0 };
    let end = first_ephemeral.saturating_sub(bus);
    if end > 10_000 {
        for _ in 0..1_000 {
            let port = fastrand::u16(10_000..end);
            if TcpListener::bind(("127.0.0.1", port)).is_ok()
                && (!with_bus || TcpListener::bind(("127.0.0.1", port + bus)).is_ok())
            {
                return port;
            }
        }
    }
    // No room below the ephemeral range: one from it (a taken one is retried at start).
    for _ in 0..1_000 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = listener.local_addr().expect("local addr").port();
        if !with_bus || (port < 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()) {
            return port;
        }
    }
    panic!("no free loopback port found");
}

/// A fresh directory of its own for a server on `port` (each start of the kit's servers gets
/// another, so a start that failed never removes a running server's). The directories of
/// test processes that are gone (killed before they could remove them) are removed first.
fn scratch_dir(port: u16) -> PathBuf {
    remove_dirs_of_gone_processes();
    static STARTS: AtomicU64 = AtomicU64::new(0);
    let start = STARTS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "headroom-redis-{}-{port}-{start}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a scratch directory for redis-server");
    dir
}

/// Removes the scratch directories (`headroom-redis-<pid>-...`) whose process is no longer
/// running. Linux only, where `/proc` says which processes run.
fn remove_dirs_of_gone_processes() {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix("headroom-redis-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Waits until the server of `pid` answers on `port` (another server there, which took the
/// port first, does not count); its log when it does not in time, or when it could not listen
/// on its port.
fn wait_until_serving(port: u16, pid: u32, dir: &Path) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let log = || std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
    loop {
        if serving_pid(port) == Some(pid) {
            return Ok(());
        }
        let log = log();
        if Instant::now() >= deadline || log.contains(PORT_TAKEN) {
            return Err(log);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The process id of the Redis server answering on `port` once it has loaded its data (from
/// `INFO server persistence`; a server still loading its append-only file answers nothing).
fn serving_pid(port: u16) -> Option<u32> {
    let stream = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    (&stream)
        .write_all(b"*3\r\n$4\r\nINFO\r\n$6\r\nserver\r\n$11\r\npersistence\r\n")
        .ok()?;
    let mut reply = BufReader::new(&stream);
    let mut header = String::new();
    reply.read_line(&mut header).ok()?;
    let len: usize = header.strip_prefix('$')?.trim().parse().ok()?;
    let mut body = vec![0; len];
    reply.read_exact(&mut body).ok()?;
    let info = String::from_utf8_lossy(&body);
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    if field("loading") != Some("0") {
        return None;
    }
    field("process_id")?.parse().ok()
}

fn wait_until_port_closed(port: u16) {
    let deadline = Instant::now() + START_TIMEOUT;
    while TcpStream::connect(("127.0.0.1", port)).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}. {INSTALL_HINT}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && !stdout.starts_with("ERR") && !stdout.contains("[ERR]"),
        "redis-cli {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn redis_cli_lenient(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_the_kit_chooses_are_below_the_range_of_outgoing_connections() {
        let first_ephemeral: u16 =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
                .expect("a Linux port range")
                .split_whitespace()
                .next()
                .and_then(|first| first.parse().ok())
                .expect("its first port");
        for _ in 0..100 {
            assert!(free_port(false) < first_ephemeral);
            assert!(free_port(true) + 10_000 < first_ephemeral);
        }
    }

    /// `restart` returns once the server has loaded its data, not while it answers `LOADING`.
    #[test]
    fn a_restarted_server_has_loaded_its_data_when_restart_returns() {
        let server = RedisServer::builder()
            // Test-only: each key takes 100 µs to load, 0.5 s for these, and the server
            // answers (`LOADING`) while it loads.
            .config("key-load-delay", "100")
            .config("loading-process-events-interval-bytes", "1024")
            .start();
        let mut args = vec!["MSET".to_owned()];
        for i in 0..5_000 {
            args.extend([format!("k{i}"), "v".to_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        server.cli(&args);
        // A snapshot, which the restarted server loads key by key.
        server.cli(&["SAVE"]);
        server.restart();
        assert_eq!(server.cli(&["GET", "k1"]).trim(), "v");
    }

    /// The scratch directory a test process killed outright left behind goes at the next
    /// start of a server; a running process's stays.
    #[test]
    fn directories_of_a_killed_test_process_are_removed() {
        let mut gone = Command::new("true").spawn().expect("spawn true");
        let gone_pid = gone.id();
        gone.wait().expect("true exits");
        let left = std::env::temp_dir().join(format!("headroom-redis-{gone_pid}-1-0"));
        let ours =
            std::env::temp_dir().join(format!("headroom-redis-{}-1-999999", std::process::id()));
        for dir in [&left, &ours] {
            std::fs::create_dir_all(dir).expect("create");
        }
        let _server = RedisServer::builder().start();
        assert!(!left.exists(), "a gone process's directory stays");
        assert!(ours.exists(), "a running process's directory was removed");
        std::fs::remove_dir_all(&ours).expect("remove");
    }

    /// A server whose port was taken fails at once, saying so, whether the taker speaks Redis
    /// or not, and leaves the taker's directory alone.
    #[test]
    fn a_server_whose_port_is_taken_says_so_at_once() {
        let refused = |port: u16| {
            let start = Instant::now();
            let started = std::panic::catch_unwind(|| RedisServer::builder().port(port).start());
            let message = started.expect_err("the port is taken");
            let message = message
                .downcast_ref::<String>()
                .expect("a panic message")
                .clone();
            assert!(message.contains(PORT_TAKEN), "{message}");
            assert!(start.elapsed() < START_TIMEOUT, "{:?}", start.elapsed());
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        refused(listener.local_addr().expect("addr").port());
        let taker = RedisServer::start();
        refused(taker.port());
        assert!(taker.dir().exists());
        assert!(taker.is_running());
    }
}
