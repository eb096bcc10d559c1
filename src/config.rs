//! The broker's settings: defaults, `config.toml`, `OUTBOXD_<SECTION>__<KEY>` overrides, checks.
//!
//! Every limit the broker enforces is a field here, so an operator can find and change it in
//! one place. Loading refuses any value that makes no sense, naming the key, the value given
//! (and where it came from: the file, an environment variable or a flag) and what the key
//! accepts, so a typo stops the broker at start instead of misbehaving later.
//!
//! Nothing is coerced. Each value is checked against `KEYS` before it is deserialized: `1.5`
//! and `1e3` are not whole numbers, `"yes"` and `1` are not booleans, and a number beyond a
//! key's range is refused with the range. The file is read with TOML's own parser, which keeps
//! each number as written (so an integer too large for any type still names its key);
//! environment values are text, read strictly by the key's kind (digits for a whole number,
//! `true` or `false` for a boolean, verbatim for a string).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use toml::de::DeValue;

use crate::protocol::PAYLOAD_CEILING;

/// Why a configuration was refused. Every variant about a setting names it.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The checked values did not deserialize (a bug in `KEYS` if it ever happens).
    #[error("cannot read config: {0}")]
    Load(#[from] config::ConfigError),
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    #[error("cannot read config file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read config file {}: it is not valid TOML: {message}", .path.display())]
    Syntax { path: PathBuf, message: String },
    /// A name that is no setting: a typo, or a section that does not exist.
    #[error("config: {name}{origin} is not a setting; {hint}")]
    Unknown {
        name: String,
        origin: Origin,
        hint: String,
    },
    /// A value its key cannot take: the wrong type, out of range, not an allowed word, or a
    /// directory or address that cannot be used.
    #[error("config: {key} = {value}{origin}: {expected}")]
    Value {
        key: String,
        /// As given (TOML as written, text quoted); a secret is not shown.
        value: String,
        origin: Origin,
        expected: String,
    },
    /// A rule between keys.
    #[error("config: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Where a setting's value came from, so a refusal can say what to change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    #[default]
    Default,
    /// The config file.
    File,
    /// An `OUTBOXD_<SECTION>__<KEY>` variable, by name.
    Env(String),
    /// A command-line flag (`--listen`, `--data`).
    Flag(&'static str),
}

/// Shown after the value in a message: nothing for the file and the defaults, ` (from NAME)`
/// for a variable or a flag.
impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default | Origin::File => Ok(()),
            Origin::Env(name) => write!(f, " (from {name})"),
            Origin::Flag(name) => write!(f, " (from {name})"),
        }
    }
}

/// One setting as `outboxd config check` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// `section.key`.
    pub name: &'static str,
    pub value: SettingValue,
    pub origin: Origin,
}

/// A setting's effective value. A secret is never carried, only whether it is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingValue {
    Whole(u64),
    Bool(bool),
    Text(String),
    List(Vec<String>),
    Secret { set: bool },
}

/// As TOML writes it (text quoted), a secret as `<set>` or `<empty>`.
impl fmt::Display for SettingValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SettingValue::Whole(n) => write!(f, "{n}"),
            SettingValue::Bool(b) => write!(f, "{b}"),
            SettingValue::Text(s) => write!(f, "{s:?}"),
            SettingValue::List(items) => {
                let items: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
                write!(f, "[{}]", items.join(", "))
            }
            SettingValue::Secret { set: true } => f.write_str("<set>"),
            SettingValue::Secret { set: false } => f.write_str("<empty>"),
        }
    }
}

impl Origin {
    /// Where the value came from, in words: `default`, `file`, `env NAME`, `flag --NAME`.
    pub fn describe(&self) -> String {
        match self {
            Origin::Default => "default".to_string(),
            Origin::File => "file".to_string(),
            Origin::Env(name) => format!("env {name}"),
            Origin::Flag(name) => format!("flag {name}"),
        }
    }
}

/// A command-line flag that replaces a key's value (after the file and the environment).
#[derive(Debug, Clone)]
pub enum Flag {
    /// `--listen ADDR`: `server.listen`.
    Listen(String),
    /// `--data DIR`: `storage.data_dir`.
    Data(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Confirm and send only after an fdatasync covers the write.
    Fsync,
    /// Confirm after the in-memory write; the next checkpoint (within about 50 ms) persists
    /// it.
    Relaxed,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: Server,
    pub storage: Storage,
    pub heartbeat: Heartbeat,
    pub delivery: Delivery,
    pub limits: Limits,
    pub admin: Admin,
    pub auth: crate::auth::AuthConfig,
    pub tls: TlsSettings,
    pub postgres: Postgres,
    pub log: Log,
    /// Where each value that is not a default came from, for refusals.
    #[serde(skip)]
    origins: BTreeMap<&'static str, Origin>,
}

/// How the broker writes its log (to stderr).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    pub format: LogFormat,
    /// Which events are written: a level (`info`), or a level with `target=level` exceptions
    /// (`warn,outboxd=debug`). `RUST_LOG`, when set, replaces it.
    pub level: String,
}

impl Log {
    /// `level` as a tracing filter (the spaces an operator may write after a comma removed).
    pub fn filter(&self) -> String {
        let directives: Vec<&str> = self.level.split(',').map(str::trim).collect();
        directives.join(",")
    }
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

/// The shape of each log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields` (with `message`), `target`,
    /// and the spans the event happened in.
    Json,
}

/// Levels a `log.level` directive may name.
const LOG_LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// TLS for the listeners (see `net::tls`); an empty `cert_file` means TLS is off.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf certificate.
    pub key_file: PathBuf,
    /// Whether the admin listener speaks TLS too (with the same certificate).
    pub admin: bool,
}

impl TlsSettings {
    /// True when the listeners speak TLS.
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }
}

/// The admin HTTP API's settings (its address is `server.admin_listen`).
#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admin {
    /// Bearer token every admin endpoint but `/healthz` requires; empty = no authentication,
    /// which is only allowed while `server.admin_listen` is a loopback address.
    pub token: String,
}

// By hand, so the token never reaches a log line.
impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field(
                "token",
                &if self.token.is_empty() {
                    "<empty>"
                } else {
                    "<set>"
                },
            )
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Server {
    pub listen: String,
    pub admin_listen: String,
    pub max_connections: u32,
    pub max_frame_bytes: u64,
    pub hello_timeout_ms: u64,
    /// How long the broker waits for the peer's close frame after sending its own, before it
    /// drops the TCP connection (0 = not at all).
    pub close_timeout_ms: u64,
    pub write_queue_frames: u32,
    pub max_bad_frames: u32,
    /// Open connections from one IP address at most (0 = no per-address limit).
    pub max_connections_per_ip: u32,
    /// Origins a browser may connect from (exact `scheme://host[:port]`); empty = any.
    pub allowed_origins: Vec<String>,
    /// Refuse upgrade requests without an Origin header (non-browser clients send none).
    pub require_origin: bool,
}

/// Which engine holds the outboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// sled in `storage.data_dir`: one node, one disk.
    Sled,
    /// A PostgreSQL database (`[postgres]`): several nodes, the database's replication.
    Postgres,
}

/// The PostgreSQL backend's settings (used when `storage.backend = "postgres"`).
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Postgres {
    /// libpq URL or key=value string; several hosts with `target_session_attrs=read-write`
    /// find the primary.
    pub url: String,
    /// Connections for reads (deliveries, inspection), besides the writer's and the listener's.
    pub pool_size: u32,
    /// How long a connection attempt may take.
    pub connect_timeout_ms: u64,
    /// Statement timeout of the read connections (never of the writer's).
    pub read_timeout_ms: u64,
    /// How often a node re-reads the outboxes of its connected clients, so a lost wake-up
    /// only delays a delivery and an older connection on another node is closed.
    pub recheck_ms: u64,
}

// By hand, so a password in the URL never reaches a log line.
impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field(
                "url",
                &if self.url.is_empty() {
                    "<empty>"
                } else {
                    "<set>"
                },
            )
            .field("pool_size", &self.pool_size)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("read_timeout_ms", &self.read_timeout_ms)
            .field("recheck_ms", &self.recheck_ms)
            .finish()
    }
}

impl Default for Postgres {
    fn default() -> Self {
        Self {
            url: String::new(),
            pool_size: 4,
            connect_timeout_ms: 5000,
            read_timeout_ms: 10_000,
            recheck_ms: 500,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    pub backend: Backend,
    pub data_dir: PathBuf,
    pub durability: Durability,
    pub group_commit_max_delay_us: u64,
    pub cache_capacity_bytes: u64,
    /// Emptied body log segments kept for reuse (0 = delete them).
    pub spare_segments: u32,
    /// Bytes of just-committed messages kept in memory for their recipients' connections,
    /// over all outboxes (0 = every delivery reads the store).
    pub delivery_cache_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Heartbeat {
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Delivery {
    pub max_inflight: u32,
    pub ack_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_payload_bytes: u64,
    pub max_outbox_messages: u64,
    pub max_outbox_bytes: u64,
    pub message_ttl_ms: u64,
    pub dedup_window_ms: u64,
    /// Sustained publishes per second one connection may send (0 = no limit)...
    pub publish_rate_per_sec: u32,
    /// ...and the burst above that rate it may send at once.
    pub publish_burst: u32,
    /// Durable subscriptions one client may hold (0 = no limit).
    pub max_subscriptions: u32,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            max_connections: 10_000,
            max_frame_bytes: 131_072,
            hello_timeout_ms: 10_000,
            close_timeout_ms: 1000,
            write_queue_frames: 256,
            max_bad_frames: 16,
            max_connections_per_ip: 1000,
            allowed_origins: Vec::new(),
            require_origin: false,
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            backend: Backend::Sled,
            data_dir: PathBuf::from("data"),
            durability: Durability::Fsync,
            group_commit_max_delay_us: 0,
            cache_capacity_bytes: 64 * 1024 * 1024,
            spare_segments: 4,
            delivery_cache_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            interval_ms: 15_000,
            timeout_ms: 45_000,
        }
    }
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            max_inflight: 1024,
            ack_timeout_ms: 30_000,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: PAYLOAD_CEILING,
            max_outbox_messages: 100_000,
            max_outbox_bytes: 100 * 1024 * 1024,
            message_ttl_ms: 0,
            dedup_window_ms: 600_000,
            publish_rate_per_sec: 5000,
            publish_burst: 10_000,
            max_subscriptions: 1000,
        }
    }
}

impl Config {
    /// The configuration a command runs with: the file `--config` names (which must exist), or
    /// else `./config.toml` when there is one, then the process environment (see [`Self::load`]).
    pub fn for_command(config: Option<&Path>) -> Result<Config, ConfigError> {
        match config {
            Some(p) => Config::load(p, true, std::env::vars()),
            None => Config::load(Path::new("config.toml"), false, std::env::vars()),
        }
    }

    /// Loads defaults, then the file (required only when `required`), then the environment.
    ///
    /// `env` is the process environment as pairs; only `OUTBOXD_<SECTION>__<KEY>` names are read,
    /// so unrelated `OUTBOXD_*` variables never turn into config keys.
    ///
    /// Errors: the file is missing (when required), unreadable or not TOML; a name is no
    /// setting; a value is refused by its key (see [`ConfigError::Value`]); or [`Self::validate`].
    pub fn load(
        path: &Path,
        required: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let cfg = Self::read_layers(path, required, env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`Self::load`] without the rules between keys ([`Self::validate`]): each value is
    /// still checked by its key.
    fn read_layers(
        path: &Path,
        required: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if required {
                    return Err(ConfigError::Missing(path.to_owned()));
                }
                None
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let mut values: BTreeMap<&'static str, (config::Value, Origin)> = BTreeMap::new();
        if let Some(text) = &text {
            let doc = toml::de::DeTable::parse(text).map_err(|e| ConfigError::Syntax {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
            for (section, body) in doc.get_ref().iter() {
                let section = section.get_ref();
                let DeValue::Table(body) = body.get_ref() else {
                    if KEYS
                        .iter()
                        .any(|k| k.name.split_once('.').map(|(s, _)| s) == Some(section))
                    {
                        return Err(ConfigError::Value {
                            key: section.to_string(),
                            value: show_toml(body.get_ref()),
                            origin: Origin::File,
                            expected: format!("expected a section: [{section}] and its keys"),
                        });
                    }
                    return Err(unknown(section, Origin::File));
                };
                for (name, value) in body.iter() {
                    let name = format!("{section}.{}", name.get_ref());
                    let key = key(&name).ok_or_else(|| unknown(&name, Origin::File))?;
                    let v = key.read(&Given::Toml(value.get_ref()), &Origin::File)?;
                    values.insert(key.name, (v, Origin::File));
                }
            }
        }
        let env: BTreeMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| {
                k.strip_prefix("OUTBOXD_")
                    .is_some_and(|rest| rest.contains("__"))
            })
            .collect();
        for (var, value) in &env {
            let name = var
                .strip_prefix("OUTBOXD_")
                .unwrap_or(var)
                .replacen("__", ".", 1)
                .to_ascii_lowercase();
            let origin = Origin::Env(var.clone());
            let key = key(&name).ok_or_else(|| unknown(&name, origin.clone()))?;
            let v = key.read(&Given::Text(value), &origin)?;
            values.insert(key.name, (v, origin));
        }
        let mut builder = config::Config::builder();
        let mut origins = BTreeMap::new();
        for (name, (value, origin)) in values {
            builder = builder.set_override(name, value)?;
            origins.insert(name, origin);
        }
        let mut cfg: Config = builder.build()?.try_deserialize()?;
        cfg.origins = origins;
        Ok(cfg)
    }

    /// Applies a command-line flag: its value replaces the key's, and a refusal of that key
    /// names the flag. Call [`Self::validate`] after the last flag.
    pub fn apply_flag(&mut self, flag: Flag) {
        match flag {
            Flag::Listen(addr) => {
                self.server.listen = addr;
                self.origins
                    .insert("server.listen", Origin::Flag("--listen"));
            }
            Flag::Data(dir) => {
                self.storage.data_dir = dir;
                self.origins
                    .insert("storage.data_dir", Origin::Flag("--data"));
            }
        }
    }

    /// Where the value of `key` came from.
    pub fn origin(&self, key: &str) -> Origin {
        self.origins.get(key).cloned().unwrap_or_default()
    }

    /// A refusal of `key`'s value (`value` as the message shows it), saying where the value
    /// came from and what would be accepted: for checks made after loading, such as a data
    /// directory that cannot be created or an address another process listens on.
    pub fn refuse(&self, key: &str, value: String, expected: impl Into<String>) -> ConfigError {
        ConfigError::Value {
            key: key.to_string(),
            value,
            origin: self.origin(key),
            expected: expected.into(),
        }
    }

    /// Refuses values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                reason: reason.into(),
            }
        }
        self.listen_addr()?;
        if let Some(admin) = self.admin_addr()? {
            if !admin.ip().is_loopback() && self.admin.token.is_empty() {
                return Err(invalid(
                    "admin.token",
                    format!(
                        "must be set when server.admin_listen ({admin}) is not a loopback address: \
                         set admin.token (env OUTBOXD_ADMIN__TOKEN), or listen on 127.0.0.1, \
                         or set server.admin_listen = \"\" to turn the admin API off"
                    ),
                ));
            }
        }
        for key in KEYS {
            if let Kind::Whole { min, max, get } = key.kind {
                let v = get(self);
                if !(min..=max).contains(&v) {
                    return Err(self.refuse(key.name, v.to_string(), key.expected()));
                }
            }
        }
        let s = &self.server;
        for o in &s.allowed_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                return Err(self.refuse(
                    "server.allowed_origins",
                    format!("{:?}", s.allowed_origins),
                    format!("{o:?} is not an origin: write scheme://host[:port], e.g. \"https://app.example.com\""),
                ));
            }
        }
        if self.limits.publish_rate_per_sec > 0 && self.limits.publish_burst == 0 {
            return Err(self.refuse(
                "limits.publish_burst",
                "0".to_string(),
                "expected at least 1 while limits.publish_rate_per_sec is set",
            ));
        }
        self.validate_tls()?;
        if let Err(e) = crate::auth::Verifier::from_config(&self.auth) {
            return Err(invalid(e.key(), e.to_string()));
        }
        if self.storage.backend == Backend::Postgres && self.postgres.url.trim().is_empty() {
            return Err(invalid(
                "postgres.url",
                "must be set when storage.backend = \"postgres\": a libpq URL such as \
                 postgres://outboxd@db1,db2/outboxd?target_session_attrs=read-write \
                 (env OUTBOXD_POSTGRES__URL)",
            ));
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            return Err(self.refuse(
                "storage.data_dir",
                "\"\"".to_string(),
                "expected a directory (it must not be empty)",
            ));
        }
        self.validate_log_level()?;
        let h = &self.heartbeat;
        if h.timeout_ms <= h.interval_ms {
            return Err(self.refuse(
                "heartbeat.timeout_ms",
                h.timeout_ms.to_string(),
                format!(
                    "expected more than heartbeat.interval_ms ({})",
                    h.interval_ms
                ),
            ));
        }
        let l = &self.limits;
        if l.max_payload_bytes.saturating_add(1024) > s.max_frame_bytes {
            return Err(self.refuse(
                "server.max_frame_bytes",
                s.max_frame_bytes.to_string(),
                format!(
                    "expected room for a full payload: at least limits.max_payload_bytes + 1024 ({})",
                    l.max_payload_bytes.saturating_add(1024)
                ),
            ));
        }
        Ok(())
    }

    /// `log.level`: levels and `target=level` pairs only. tracing's own syntax would take a
    /// misspelt level (`inof`) as a target name and silence the whole log.
    fn validate_log_level(&self) -> Result<(), ConfigError> {
        let level = &self.log.level;
        let directive_ok = |d: &str| match d.split_once('=') {
            None => LOG_LEVELS.contains(&d),
            Some((target, lvl)) => {
                !target.is_empty()
                    && target
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '-')
                    && LOG_LEVELS.contains(&lvl)
            }
        };
        let directives: Vec<&str> = level.split(',').map(str::trim).collect();
        if directives.iter().all(|d| directive_ok(d)) {
            return Ok(());
        }
        Err(self.refuse(
            "log.level",
            format!("{level:?}"),
            format!(
                "expected a level ({}), optionally followed by target=level pairs, comma-separated, \
                 e.g. \"warn,outboxd=debug\"",
                LOG_LEVELS.join(", ")
            ),
        ))
    }

    /// Every setting, in the order of the table of keys: its effective value (a secret only as
    /// `<set>` or `<empty>`) and where that value came from.
    pub fn settings(&self) -> impl Iterator<Item = Setting> + '_ {
        KEYS.iter().map(move |key| Setting {
            name: key.name,
            value: key.value(self),
            origin: self.origin(key.name),
        })
    }

    /// `[tls]`: the certificate and the key come together. The files themselves are read at
    /// start ([`crate::net::tls::Tls::load`]), where an unusable one also stops the broker.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let t = &self.tls;
        let invalid = |key, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_string(),
        };
        match (t.enabled(), t.key_file.as_os_str().is_empty()) {
            (true, true) => Err(invalid(
                "tls.key_file",
                "must be set when tls.cert_file is set (the PEM private key of the certificate)",
            )),
            (false, false) => Err(invalid(
                "tls.cert_file",
                "must be set when tls.key_file is set (the PEM certificate chain, leaf first)",
            )),
            (false, true) if t.admin => Err(invalid(
                "tls.admin",
                "needs tls.cert_file and tls.key_file: the admin listener uses the same certificate",
            )),
            _ if t.admin && self.server.admin_listen.trim().is_empty() => Err(invalid(
                "tls.admin",
                "is set but the admin API is off (server.admin_listen is empty)",
            )),
            _ => Ok(()),
        }
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.listen.parse().map_err(|e| {
            self.refuse(
                "server.listen",
                format!("{:?}", self.server.listen),
                format!("expected HOST:PORT, e.g. \"127.0.0.1:8080\" ({e})"),
            )
        })
    }

    /// The admin API's address; `None` when `server.admin_listen` is empty (API off).
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let s = self.server.admin_listen.trim();
        if s.is_empty() {
            return Ok(None);
        }
        s.parse().map(Some).map_err(|e| {
            self.refuse(
                "server.admin_listen",
                format!("{:?}", self.server.admin_listen),
                format!(
                    "expected HOST:PORT, e.g. \"127.0.0.1:9090\", or \"\" to turn the admin API off ({e})"
                ),
            )
        })
    }

    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.server.hello_timeout_ms)
    }

    pub fn close_timeout(&self) -> Duration {
        Duration::from_millis(self.server.close_timeout_ms)
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat.interval_ms)
    }

    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat.timeout_ms)
    }

    /// `None` when ack-timeout redelivery is off.
    pub fn ack_timeout(&self) -> Option<Duration> {
        (self.delivery.ack_timeout_ms > 0)
            .then(|| Duration::from_millis(self.delivery.ack_timeout_ms))
    }
}

/// What a key accepts.
#[derive(Clone, Copy)]
enum Kind {
    /// A whole number in `min..=max`: a TOML integer, or decimal digits from the environment.
    /// `get` reads the value back from a [`Config`], so [`Config::validate`] checks the same
    /// range on a configuration built in code or changed by a flag.
    Whole {
        min: u64,
        max: u64,
        get: fn(&Config) -> u64,
    },
    /// `true` or `false`.
    Bool { get: fn(&Config) -> bool },
    /// Any string (an address, a path, a token).
    Text { get: fn(&Config) -> String },
    /// One of these words; `get` names the word the value is.
    OneOf {
        words: &'static [&'static str],
        get: fn(&Config) -> &'static str,
    },
    /// A list of strings; from the environment, comma-separated.
    TextList { get: fn(&Config) -> &[String] },
}

/// One setting: `section.key`, what it accepts, and how a refusal shows it.
struct Key {
    name: &'static str,
    kind: Kind,
    /// Why the range is what it is, when that is not obvious.
    note: &'static str,
    /// A secret is never repeated in a message.
    secret: bool,
}

impl Key {
    const fn new(name: &'static str, kind: Kind) -> Key {
        Key {
            name,
            kind,
            note: "",
            secret: false,
        }
    }

    const fn whole(name: &'static str, min: u64, max: u64, get: fn(&Config) -> u64) -> Key {
        Key::new(name, Kind::Whole { min, max, get })
    }

    const fn flag(name: &'static str, get: fn(&Config) -> bool) -> Key {
        Key::new(name, Kind::Bool { get })
    }

    const fn text(name: &'static str, get: fn(&Config) -> String) -> Key {
        Key::new(name, Kind::Text { get })
    }

    const fn one_of(
        name: &'static str,
        words: &'static [&'static str],
        get: fn(&Config) -> &'static str,
    ) -> Key {
        Key::new(name, Kind::OneOf { words, get })
    }

    const fn list(name: &'static str, get: fn(&Config) -> &[String]) -> Key {
        Key::new(name, Kind::TextList { get })
    }

    /// The key's value in `cfg`; a secret only as set or empty.
    fn value(&self, cfg: &Config) -> SettingValue {
        let value = match self.kind {
            Kind::Whole { get, .. } => SettingValue::Whole(get(cfg)),
            Kind::Bool { get } => SettingValue::Bool(get(cfg)),
            Kind::Text { get } => SettingValue::Text(get(cfg)),
            Kind::OneOf { get, .. } => SettingValue::Text(get(cfg).to_string()),
            Kind::TextList { get } => SettingValue::List(get(cfg).to_vec()),
        };
        if !self.secret {
            return value;
        }
        let set = match value {
            SettingValue::Text(s) => !s.is_empty(),
            SettingValue::List(items) => !items.is_empty(),
            _ => true,
        };
        SettingValue::Secret { set }
    }

    const fn note(mut self, note: &'static str) -> Key {
        self.note = note;
        self
    }

    const fn secret(mut self) -> Key {
        self.secret = true;
        self
    }

    /// What the key accepts, as a refusal says it.
    fn expected(&self) -> String {
        let mut s = match self.kind {
            Kind::Whole { min, max, .. } => {
                format!("expected a whole number between {min} and {max}")
            }
            Kind::Bool { .. } => "expected true or false".to_string(),
            Kind::Text { .. } => "expected a string".to_string(),
            Kind::OneOf { words, .. } => {
                let words: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
                format!("expected one of {}", words.join(", "))
            }
            Kind::TextList { .. } => {
                "expected a list of strings (from the environment: comma-separated)".to_string()
            }
        };
        if !self.note.is_empty() {
            s.push_str(&format!(" ({})", self.note));
        }
        s
    }

    /// The value typed for the deserializer, or the refusal.
    fn read(&self, given: &Given<'_>, origin: &Origin) -> Result<config::Value, ConfigError> {
        use config::ValueKind as V;
        let text = |v: &Given<'_>| match v {
            Given::Toml(DeValue::String(s)) => Some(s.to_string()),
            Given::Text(s) => Some((*s).to_string()),
            Given::Toml(_) => None,
        };
        let kind = match self.kind {
            Kind::Whole { min, max, .. } => match given {
                Given::Toml(DeValue::Integer(i)) => u64::from_str_radix(i.as_str(), i.radix()).ok(),
                Given::Text(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                    s.parse::<u64>().ok()
                }
                _ => None,
            }
            .filter(|v| (min..=max).contains(v))
            .map(V::U64),
            Kind::Bool { .. } => match given {
                Given::Toml(DeValue::Boolean(b)) => Some(*b),
                Given::Text("true") => Some(true),
                Given::Text("false") => Some(false),
                _ => None,
            }
            .map(V::Boolean),
            Kind::Text { .. } => text(given).map(V::String),
            Kind::OneOf { words, .. } => text(given)
                .filter(|s| words.contains(&s.as_str()))
                .map(V::String),
            Kind::TextList { .. } => match given {
                Given::Toml(DeValue::Array(items)) => items
                    .iter()
                    .map(|item| match item.get_ref() {
                        DeValue::String(s) => Some(config::Value::from(s.to_string())),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>(),
                Given::Text(s) => Some(
                    s.split(',')
                        .filter(|item| !item.is_empty())
                        .map(|item| config::Value::from(item.to_string()))
                        .collect(),
                ),
                Given::Toml(_) => None,
            }
            .map(V::Array),
        };
        kind.map(|k| config::Value::new(None, k))
            .ok_or_else(|| ConfigError::Value {
                key: self.name.to_string(),
                value: if self.secret {
                    "(hidden)".to_string()
                } else {
                    given.show()
                },
                origin: origin.clone(),
                expected: self.expected(),
            })
    }
}

const U32: u64 = u32::MAX as u64;

/// Every setting. The deserializer sees a value only after its key here has accepted it.
const KEYS: &[Key] = &[
    Key::text("server.listen", |c| c.server.listen.clone()),
    Key::text("server.admin_listen", |c| c.server.admin_listen.clone()),
    Key::whole("server.max_connections", 1, U32, |c| {
        c.server.max_connections.into()
    }),
    Key::whole("server.max_frame_bytes", 1024, u64::MAX, |c| {
        c.server.max_frame_bytes
    }),
    Key::whole("server.hello_timeout_ms", 1, u64::MAX, |c| {
        c.server.hello_timeout_ms
    }),
    Key::whole("server.close_timeout_ms", 0, u64::MAX, |c| {
        c.server.close_timeout_ms
    }),
    Key::whole("server.write_queue_frames", 2, U32, |c| {
        c.server.write_queue_frames.into()
    }),
    Key::whole("server.max_bad_frames", 1, U32, |c| {
        c.server.max_bad_frames.into()
    }),
    Key::whole("server.max_connections_per_ip", 0, U32, |c| {
        c.server.max_connections_per_ip.into()
    }),
    Key::list("server.allowed_origins", |c| &c.server.allowed_origins),
    Key::flag("server.require_origin", |c| c.server.require_origin),
    Key::one_of("storage.backend", &["sled", "postgres"], |c| {
        match c.storage.backend {
            Backend::Sled => "sled",
            Backend::Postgres => "postgres",
        }
    }),
    Key::text("storage.data_dir", |c| path_text(&c.storage.data_dir)),
    Key::one_of("storage.durability", &["fsync", "relaxed"], |c| {
        match c.storage.durability {
            Durability::Fsync => "fsync",
            Durability::Relaxed => "relaxed",
        }
    }),
    Key::whole("storage.group_commit_max_delay_us", 0, 1_000_000, |c| {
        c.storage.group_commit_max_delay_us
    })
    .note("1 s at most"),
    Key::whole("storage.cache_capacity_bytes", 1024 * 1024, u64::MAX, |c| {
        c.storage.cache_capacity_bytes
    }),
    Key::whole("storage.spare_segments", 0, 64, |c| {
        c.storage.spare_segments.into()
    }),
    Key::whole("storage.delivery_cache_bytes", 0, u64::MAX, |c| {
        c.storage.delivery_cache_bytes
    }),
    Key::whole("heartbeat.interval_ms", 1, u64::MAX, |c| {
        c.heartbeat.interval_ms
    }),
    Key::whole("heartbeat.timeout_ms", 0, u64::MAX, |c| {
        c.heartbeat.timeout_ms
    }),
    Key::whole("delivery.max_inflight", 1, U32, |c| {
        c.delivery.max_inflight.into()
    }),
    Key::whole("delivery.ack_timeout_ms", 0, u64::MAX, |c| {
        c.delivery.ack_timeout_ms
    }),
    Key::whole("limits.max_payload_bytes", 1, PAYLOAD_CEILING, |c| {
        c.limits.max_payload_bytes
    })
    .note("larger payloads would be stored as blob files the store cannot make durable"),
    Key::whole("limits.max_outbox_messages", 0, u64::MAX, |c| {
        c.limits.max_outbox_messages
    }),
    Key::whole("limits.max_outbox_bytes", 0, u64::MAX, |c| {
        c.limits.max_outbox_bytes
    }),
    Key::whole("limits.message_ttl_ms", 0, u64::MAX, |c| {
        c.limits.message_ttl_ms
    }),
    Key::whole("limits.dedup_window_ms", 0, u64::MAX, |c| {
        c.limits.dedup_window_ms
    }),
    Key::whole("limits.publish_rate_per_sec", 0, U32, |c| {
        c.limits.publish_rate_per_sec.into()
    }),
    Key::whole("limits.publish_burst", 0, U32, |c| {
        c.limits.publish_burst.into()
    }),
    Key::whole("limits.max_subscriptions", 0, U32, |c| {
        c.limits.max_subscriptions.into()
    }),
    Key::text("admin.token", |c| c.admin.token.clone()).secret(),
    Key::one_of("auth.mode", &["none", "jwt"], |c| match c.auth.mode {
        crate::auth::AuthMode::None => "none",
        crate::auth::AuthMode::Jwt => "jwt",
    }),
    Key::text("auth.hmac_secret", |c| c.auth.hmac_secret.clone()).secret(),
    Key::text("auth.public_key_file", |c| {
        c.auth
            .public_key_file
            .as_deref()
            .map(path_text)
            .unwrap_or_default()
    }),
    Key::whole("auth.leeway_ms", 0, u64::MAX, |c| c.auth.leeway_ms),
    Key::text("tls.cert_file", |c| path_text(&c.tls.cert_file)),
    Key::text("tls.key_file", |c| path_text(&c.tls.key_file)),
    Key::flag("tls.admin", |c| c.tls.admin),
    Key::text("postgres.url", |c| c.postgres.url.clone()).secret(),
    Key::whole("postgres.pool_size", 1, 256, |c| {
        c.postgres.pool_size.into()
    }),
    Key::whole("postgres.connect_timeout_ms", 1, u64::MAX, |c| {
        c.postgres.connect_timeout_ms
    }),
    Key::whole("postgres.read_timeout_ms", 0, u64::MAX, |c| {
        c.postgres.read_timeout_ms
    }),
    Key::whole("postgres.recheck_ms", 10, 60_000, |c| c.postgres.recheck_ms)
        .note("a takeover on another node must close the older connection soon"),
    Key::one_of("log.format", &["text", "json"], |c| match c.log.format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    }),
    Key::text("log.level", |c| c.log.level.clone()),
];

/// A path as text; the config's own paths came from text, a flag's may not be UTF-8.
fn path_text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A value as given, before its key has checked it.
enum Given<'a> {
    /// From the file, typed by TOML's syntax.
    Toml(&'a DeValue<'a>),
    /// From the environment or a flag: text, read by the key's kind.
    Text(&'a str),
}

impl Given<'_> {
    /// The value as a message shows it: TOML as written, text quoted.
    fn show(&self) -> String {
        match self {
            Given::Toml(v) => show_toml(v),
            Given::Text(s) => format!("{s:?}"),
        }
    }
}

fn show_toml(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => format!("{s:?}"),
        DeValue::Integer(i) => i.to_string(),
        DeValue::Float(f) => f.to_string(),
        DeValue::Boolean(b) => b.to_string(),
        DeValue::Datetime(d) => d.to_string(),
        DeValue::Array(items) => {
            let items: Vec<String> = items.iter().map(|i| show_toml(i.get_ref())).collect();
            format!("[{}]", items.join(", "))
        }
        DeValue::Table(_) => "a table".to_string(),
    }
}

fn key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

/// What to say about a name that is no setting: the keys of its section, or the sections.
fn unknown(name: &str, origin: Origin) -> ConfigError {
    let section = name.split_once('.').map_or(name, |(s, _)| s);
    let in_section: Vec<&str> = KEYS
        .iter()
        .filter_map(|k| k.name.strip_prefix(section)?.strip_prefix('.'))
        .collect();
    let hint = if in_section.is_empty() {
        let mut sections: Vec<&str> = KEYS
            .iter()
            .filter_map(|k| k.name.split_once('.').map(|(s, _)| s))
            .collect();
        sections.dedup();
        format!(
            "settings are `section.key`; the sections are [{}]",
            sections.join("], [")
        )
    } else {
        format!("the keys of [{section}] are {}", in_section.join(", "))
    };
    ConfigError::Unknown {
        name: name.to_string(),
        origin,
        hint,
    }
}

#[cfg(test)]
mod tests;
