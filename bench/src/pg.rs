//! The PostgreSQL the `outboxd-pg` systems store in: one cluster per run of the driver (a
//! primary and a synchronous standby, both on this machine, started by the repository's own
//! `tools/pg-cluster.sh`), and a fresh database per case, dropped after it.
//!
//! Starting the cluster takes seconds (initdb, a base backup, the wait until the standby is
//! 'sync'), so it is started once; a database of its own per case gives each case the same
//! empty schema, as the sled cases get an empty data dir. The cluster is stopped when its
//! [`Cluster`] is dropped, which the driver makes sure of on an error, a panic or a signal too:
//! the servers run detached from the driver's terminal and would otherwise outlive it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// How long the script may take to start the two servers (it waits up to a minute per server
/// and 30 s for the standby to become 'sync').
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// A primary with a synchronous standby, in a temp dir of its own.
pub struct Cluster {
    script: PathBuf,
    /// Made by `mktemp -d` (tempfile); as root, the script hands it to the user postgres.
    dir: PathBuf,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    primary_url: String,
    primary_port: u16,
    primary_data: PathBuf,
    standby_data: PathBuf,
    bindir: PathBuf,
    /// The server's `--version`, for the report.
    pub version: String,
    next_db: AtomicU32,
}

impl Cluster {
    /// Starts a primary and a synchronous standby with `script start DIR --standby`.
    ///
    /// Errors when the script fails (its own message says why: PostgreSQL missing, a server
    /// that does not start, a standby that never becomes 'sync'); what it started is stopped.
    pub fn start(script: &Path) -> Result<Cluster> {
        let script = fs::canonicalize(script)
            .with_context(|| format!("{}: the cluster script", script.display()))?;
        // Kept by hand, not by TempDir's drop: the servers must be stopped before it goes.
        let dir = tempfile::Builder::new()
            .prefix("outboxd-bench-pg-")
            .tempdir()?
            .keep();
        let started = Instant::now();
        eprintln!(
            "pg: starting a primary and a synchronous standby in {}",
            dir.display()
        );
        let mut child = Command::new(&script)
            .arg("start")
            .arg(&dir)
            .arg("--standby")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("running {}", script.display()))?;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break Some(s);
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let failed = |why: String| {
            // Whatever came up before the failure goes down again.
            stop(&script, &dir);
            let _ = fs::remove_dir_all(&dir);
            anyhow!(
                "{} start {} --standby: {why}",
                script.display(),
                dir.display()
            )
        };
        match status {
            Some(s) if s.success() => {}
            Some(s) => return Err(failed(format!("exited with {s}"))),
            None => return Err(failed(format!("not done within {START_TIMEOUT:?}"))),
        }
        let env = match read_env(&dir.join("cluster.env")) {
            Ok(env) => env,
            Err(e) => return Err(failed(format!("{e:#}"))),
        };
        let get = |k: &str| {
            env.get(k)
                .cloned()
                .ok_or_else(|| anyhow!("cluster.env has no {k}"))
        };
        let parsed = (|| -> Result<_> {
            Ok((
                get("PRIMARY_URL")?,
                get("PRIMARY_PORT")?.parse::<u16>()?,
                get("PRIMARY_DATA")?,
                get("STANDBY_DATA")?,
                get("PG_BINDIR")?,
            ))
        })();
        let (primary_url, primary_port, primary_data, standby_data, bindir) = match parsed {
            Ok(p) => p,
            Err(e) => return Err(failed(format!("{e:#}"))),
        };
        let bindir = PathBuf::from(bindir);
        let version = Command::new(bindir.join("postgres"))
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        eprintln!(
            "pg: {version}, primary {primary_url}, up in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(Cluster {
            script,
            dir,
            primary_url,
            primary_port,
            primary_data: PathBuf::from(primary_data),
            standby_data: PathBuf::from(standby_data),
            bindir,
            version,
            next_db: AtomicU32::new(0),
        })
    }

    /// One SQL command on the primary's `postgres` database, through the cluster's psql.
    fn sql(&self, sql: &str) -> Result<()> {
        let out = Command::new(self.bindir.join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(&self.primary_url)
            .arg("-c")
            .arg(sql)
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql -c {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// A new, empty database for one case; dropped with the returned guard.
    ///
    /// Errors when psql cannot create it.
    pub fn database(&self) -> Result<Database<'_>> {
        let name = format!(
            "bench_{}_{}",
            std::process::id(),
            self.next_db.fetch_add(1, Ordering::Relaxed)
        );
        self.sql(&format!("CREATE DATABASE {name}"))?;
        Ok(Database {
            url: format!("postgres://postgres@127.0.0.1:{}/{name}", self.primary_port),
            name,
            cluster: self,
        })
    }

    /// The two servers' postmasters.
    pub fn postmasters(&self) -> Vec<u32> {
        [&self.primary_data, &self.standby_data]
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("postmaster.pid")).ok())
            .filter_map(|t| t.lines().next()?.trim().parse().ok())
            .collect()
    }
}

/// `postmasters` and their children (backends, WAL writer, WAL sender and receiver,
/// checkpointer): every process of the servers, for their CPU time and fsync calls.
pub fn processes_of(postmasters: &[u32]) -> Vec<u32> {
    let mut pids = postmasters.to_vec();
    if postmasters.is_empty() {
        return pids;
    }
    let Ok(rd) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // Field 4, the parent, comes after the command name, which may hold spaces.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid.is_some_and(|p| postmasters.contains(&p)) {
            pids.push(pid);
        }
    }
    pids
}

impl Drop for Cluster {
    fn drop(&mut self) {
        stop(&self.script, &self.dir);
        let _ = fs::remove_dir_all(&self.dir);
        eprintln!("pg: cluster stopped and {} removed", self.dir.display());
    }
}

/// `script stop DIR`: a fast shutdown of both servers (immediate, then SIGKILL, if that hangs).
fn stop(script: &Path, dir: &Path) {
    if !dir.join("cluster.env").exists() {
        return;
    }
    let _ = Command::new(script)
        .arg("stop")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn read_env(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// One case's database; dropped (with the brokers' connections forced off) with the guard.
pub struct Database<'a> {
    pub name: String,
    /// What the brokers get as `OUTBOXD_POSTGRES__URL`.
    pub url: String,
    cluster: &'a Cluster,
}

impl Drop for Database<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.cluster.sql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )) {
            eprintln!("pg: dropping {}: {e:#}", self.name);
        }
    }
}
