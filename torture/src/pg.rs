//! The PostgreSQL a `--backend postgres` run starts for itself: a primary and a synchronous
//! standby made by the repository's `tools/pg-cluster.sh`, one database on them for every
//! broker, and the failover the fault schedule asks for (kill -9 of the primary, then the
//! standby promoted).
//!
//! The brokers get both servers in one multi-host URL with `target_session_attrs=read-write`,
//! as in production, so after the failover they find the promoted standby by themselves. The
//! promoted standby runs alone (the script starts it with no synchronous standby of its own):
//! from then on a commit is on one server, which the run's summary says.
//!
//! The cluster lives in a fresh directory from the system's temporary directory: as root the
//! script hands it to the OS user postgres, who cannot reach it inside another private
//! directory. It is stopped and removed when the [`Cluster`] is dropped, on every way out of
//! the run; should this process die without dropping it (SIGKILL), a watchdog started with it
//! stops it once this process is gone.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// The database every broker of the run shares.
const DATABASE: &str = "outboxd_torture";

/// How long one command of the script may take (start waits for the standby to be 'sync').
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

/// `tools/pg-cluster.sh`: the one given, else the one of the working directory's checkout,
/// else the one of the checkout this program was built from.
/// The path is made absolute: the watchdog may outlive this process's working directory.
pub fn script(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = given {
        return std::fs::canonicalize(p).map_err(|e| format!("--pg-cluster {}: {e}", p.display()));
    }
    let here = PathBuf::from("tools/pg-cluster.sh");
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/pg-cluster.sh");
    [here, built_from]
        .into_iter()
        .find_map(|p| std::fs::canonicalize(p).ok())
        .ok_or_else(|| {
            "cannot find tools/pg-cluster.sh: run from the repository or pass --pg-cluster PATH"
                .to_string()
        })
}

/// Runs the script with `args`; its stdout, or why it failed (with what it said).
async fn run_script(script: &Path, args: &[&str]) -> Result<String, String> {
    let out = tokio::time::timeout(
        SCRIPT_TIMEOUT,
        tokio::process::Command::new(script)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| {
        format!(
            "{} {}: no answer within {SCRIPT_TIMEOUT:?}",
            script.display(),
            args.join(" ")
        )
    })?
    .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{} {} failed ({}): {}{}",
            script.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim_end()
        ))
    }
}

/// Whether PostgreSQL's programs are installed: `Err` holds the script's reason when not.
pub async fn check(script: &Path) -> Result<(), String> {
    run_script(script, &["check"]).await.map(|_| ())
}

/// A running primary and standby; stopped and removed on drop.
pub struct Cluster {
    script: PathBuf,
    dir: PathBuf,
    bindir: PathBuf,
    primary_port: u16,
    standby_port: u16,
    /// Where the servers' logs are copied before the directory goes (`--workdir`).
    keep_logs: Option<PathBuf>,
}

/// The value of `key` in the text of a `cluster.env`.
fn env_value<'a>(env: &'a str, key: &str) -> Option<&'a str> {
    env.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// The URL every broker gets: both servers, the writable one found by libpq's rule.
fn multi_host_url(primary_port: u16, standby_port: u16, database: &str) -> String {
    format!(
        "postgres://postgres@127.0.0.1:{primary_port},127.0.0.1:{standby_port}/{database}\
         ?target_session_attrs=read-write"
    )
}

impl Cluster {
    /// Starts the primary and its synchronous standby, and the watchdog.
    pub async fn start(script: PathBuf, keep_logs: Option<PathBuf>) -> Result<Cluster, String> {
        let dir = tempfile::Builder::new()
            .prefix("outboxd-torture-pg-")
            .tempdir()
            .map_err(|e| format!("a temporary directory for PostgreSQL: {e}"))?
            .keep();
        let dir_arg = dir.to_string_lossy().into_owned();
        watchdog(&script, &dir);
        let started = run_script(&script, &["start", &dir_arg, "--standby"]).await;
        // From here on a failure drops the cluster, which stops whatever did start.
        let env = std::fs::read_to_string(dir.join("cluster.env")).unwrap_or_default();
        let port = |key: &str| env_value(&env, key).and_then(|v| v.parse::<u16>().ok());
        let cluster = Cluster {
            bindir: PathBuf::from(env_value(&env, "PG_BINDIR").unwrap_or_default()),
            primary_port: port("PRIMARY_PORT").unwrap_or(0),
            standby_port: port("STANDBY_PORT").unwrap_or(0),
            script,
            dir,
            keep_logs,
        };
        started?;
        if cluster.primary_port == 0 || cluster.standby_port == 0 {
            return Err(format!(
                "{}/cluster.env names no primary or no standby port",
                cluster.dir.display()
            ));
        }
        Ok(cluster)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the run's database on the primary; returns the URL the brokers get.
    pub async fn create_database(&self) -> Result<String, String> {
        let primary = format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.primary_port
        );
        let out = tokio::process::Command::new(self.bindir.join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &primary, "-c"])
            .arg(format!("CREATE DATABASE {DATABASE}"))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("cannot run {}/psql: {e}", self.bindir.display()))?;
        if !out.status.success() {
            return Err(format!(
                "psql CREATE DATABASE {DATABASE} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim_end()
            ));
        }
        Ok(multi_host_url(
            self.primary_port,
            self.standby_port,
            DATABASE,
        ))
    }

    /// SIGKILL of every process of the primary, as in a crash.
    pub async fn kill_primary(&self) -> Result<(), String> {
        run_script(&self.script, &["kill-primary", &self.dir.to_string_lossy()])
            .await
            .map(|_| ())
    }

    /// Promotes the standby; returns once it takes writes.
    pub async fn promote(&self) -> Result<(), String> {
        run_script(&self.script, &["promote", &self.dir.to_string_lossy()])
            .await
            .map(|_| ())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Blocking, on purpose: the run is over (or failing) and nothing else waits on it. A
        // start that failed before it wrote cluster.env stopped what it started itself.
        if self.dir.join("cluster.env").exists() {
            let stopped = std::process::Command::new(&self.script)
                .arg("stop")
                .arg(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output();
            match stopped {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "outboxd-torture: stopping PostgreSQL failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim_end()
                ),
                Err(e) => eprintln!("outboxd-torture: cannot stop PostgreSQL: {e}"),
            }
        }
        if let Some(to) = &self.keep_logs {
            for name in ["primary.log", "standby.log"] {
                let _ = std::fs::copy(self.dir.join(name), to.join(format!("pg-{name}")));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts, in a session of its own (so a signal to this process group does not reach it), a
/// shell that waits until this process is gone, then stops the cluster in `dir` and removes
/// it. After a normal end it finds the directory gone and does nothing.
fn watchdog(script: &Path, dir: &Path) {
    let wait_then_stop = r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done
if [ -d "$3" ]; then "$2" stop "$3" >/dev/null 2>&1; rm -rf "$3"; fi"#;
    let spawned = std::process::Command::new("setsid")
        .args(["bash", "-c", wait_then_stop, "outboxd-torture-pg-watchdog"])
        .arg(std::process::id().to_string())
        .arg(script)
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let Err(e) = spawned {
        eprintln!(
            "outboxd-torture: no watchdog for PostgreSQL ({e}): should this program be killed, \
             stop it with: {} stop {}",
            script.display(),
            dir.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_brokers_get_both_servers_and_look_for_the_writable_one() {
        assert_eq!(
            multi_host_url(5432, 5433, "db"),
            "postgres://postgres@127.0.0.1:5432,127.0.0.1:5433/db?target_session_attrs=read-write"
        );
    }

    #[test]
    fn cluster_env_values_are_found_by_their_whole_key() {
        let env = "PRIMARY_URL=postgres://x\nPRIMARY_PORT=41\nSTANDBY_PORT=42\nPG_BINDIR=/b\n";
        assert_eq!(env_value(env, "PRIMARY_PORT"), Some("41"));
        assert_eq!(env_value(env, "STANDBY_PORT"), Some("42"));
        assert_eq!(env_value(env, "PRIMARY"), None);
        assert_eq!(env_value(env, "STANDBY_URL"), None);
    }
}
