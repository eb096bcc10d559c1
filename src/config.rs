//! The broker's settings: defaults, `config.toml`, `OUTBOXD_<SECTION>__<KEY>` overrides, checks.
//!
//! Every limit the broker enforces is a field here, so an operator can find and change it in
//! one place. Loading refuses any value that makes no sense and names the key, so a typo stops
//! the broker at start instead of misbehaving later.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// The largest payload a broker may accept. The store sizes sled's segments so that a tree leaf
/// of sixteen such messages stays a record in sled's log; anything bigger would be written to
/// a separate blob file, which sled never syncs (`store::SEGMENT_BYTES`).
pub const PAYLOAD_CEILING: u64 = 65_536;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config: {0}")]
    Load(#[from] config::ConfigError),
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Confirm and send only after an fdatasync covers the write.
    Fsync,
    /// Confirm after the in-memory write; sled's background flush persists it later.
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
}

/// TLS for the listeners (see [`crate::tls`]); an empty `cert_file` means TLS is off.
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

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    pub data_dir: PathBuf,
    pub durability: Durability,
    pub group_commit_max_delay_us: u64,
    pub cache_capacity_bytes: u64,
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
            data_dir: PathBuf::from("data"),
            durability: Durability::Fsync,
            group_commit_max_delay_us: 0,
            cache_capacity_bytes: 64 * 1024 * 1024,
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
    /// Loads defaults, then the file (required only when `required`), then the environment.
    ///
    /// `env` is the process environment as pairs; only `OUTBOXD_<SECTION>__<KEY>` names are read,
    /// so unrelated `OUTBOXD_*` variables never turn into config keys.
    pub fn load(
        path: &Path,
        required: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        if required && !path.exists() {
            return Err(ConfigError::Missing(path.to_owned()));
        }
        let overrides: HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("OUTBOXD_") && k["OUTBOXD_".len()..].contains("__"))
            .collect();
        let token = overrides.get("OUTBOXD_ADMIN__TOKEN").cloned();
        let secret = overrides.get("OUTBOXD_AUTH__HMAC_SECRET").cloned();
        let mut cfg: Config = config::Config::builder()
            .add_source(config::File::from(path).required(required))
            .add_source(
                config::Environment::with_prefix("OUTBOXD")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("server.allowed_origins")
                    .source(Some(overrides)),
            )
            .build()?
            .try_deserialize()?;
        // Taken verbatim: `try_parsing` would turn a token like "0123" into the number 123.
        if let Some(token) = token {
            cfg.admin.token = token;
        }
        if let Some(secret) = secret {
            cfg.auth.hmac_secret = secret;
        }
        cfg.validate()?;
        Ok(cfg)
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
        let s = &self.server;
        if s.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if s.max_frame_bytes < 1024 {
            return Err(invalid("server.max_frame_bytes", "must be at least 1024"));
        }
        if s.hello_timeout_ms == 0 {
            return Err(invalid("server.hello_timeout_ms", "must be at least 1"));
        }
        if s.write_queue_frames < 2 {
            return Err(invalid("server.write_queue_frames", "must be at least 2"));
        }
        if s.max_bad_frames == 0 {
            return Err(invalid("server.max_bad_frames", "must be at least 1"));
        }
        for o in &s.allowed_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                return Err(invalid(
                    "server.allowed_origins",
                    format!("{o:?} is not an origin: write scheme://host[:port], e.g. \"https://app.example.com\""),
                ));
            }
        }
        if self.limits.publish_rate_per_sec > 0 && self.limits.publish_burst == 0 {
            return Err(invalid(
                "limits.publish_burst",
                "must be at least 1 while limits.publish_rate_per_sec is set",
            ));
        }
        self.validate_tls()?;
        if let Err(e) = crate::auth::Verifier::from_config(&self.auth) {
            return Err(invalid(e.key(), e.to_string()));
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            return Err(invalid("storage.data_dir", "must not be empty"));
        }
        if self.storage.group_commit_max_delay_us > 1_000_000 {
            return Err(invalid(
                "storage.group_commit_max_delay_us",
                "must be at most 1000000 (1 s)",
            ));
        }
        if self.storage.cache_capacity_bytes < 1024 * 1024 {
            return Err(invalid(
                "storage.cache_capacity_bytes",
                "must be at least 1048576",
            ));
        }
        let h = &self.heartbeat;
        if h.interval_ms == 0 {
            return Err(invalid("heartbeat.interval_ms", "must be at least 1"));
        }
        if h.timeout_ms <= h.interval_ms {
            return Err(invalid(
                "heartbeat.timeout_ms",
                format!(
                    "must be greater than heartbeat.interval_ms ({})",
                    h.interval_ms
                ),
            ));
        }
        if self.delivery.max_inflight == 0 {
            return Err(invalid("delivery.max_inflight", "must be at least 1"));
        }
        let l = &self.limits;
        if l.max_payload_bytes == 0 || l.max_payload_bytes > PAYLOAD_CEILING {
            return Err(invalid(
                "limits.max_payload_bytes",
                format!(
                    "must be 1 to {PAYLOAD_CEILING}: larger values would be stored as blob files the store cannot make durable"
                ),
            ));
        }
        if l.max_payload_bytes.saturating_add(1024) > s.max_frame_bytes {
            return Err(invalid(
                "server.max_frame_bytes",
                format!(
                    "must leave room for a full payload: at least limits.max_payload_bytes + 1024 ({})",
                    l.max_payload_bytes + 1024
                ),
            ));
        }
        Ok(())
    }

    /// `[tls]`: the certificate and the key come together. The files themselves are read at
    /// start ([`crate::tls::Tls::load`]), where an unusable one also stops the broker.
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
        self.server
            .listen
            .parse()
            .map_err(|e| ConfigError::Invalid {
                key: "server.listen",
                reason: format!("{e} (expected HOST:PORT)"),
            })
    }

    /// The admin API's address; `None` when `server.admin_listen` is empty (API off).
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let s = self.server.admin_listen.trim();
        if s.is_empty() {
            return Ok(None);
        }
        s.parse().map(Some).map_err(|e| ConfigError::Invalid {
            key: "server.admin_listen",
            reason: format!("{e} (expected HOST:PORT, or \"\" to turn the admin API off)"),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load(
            &path,
            true,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_are_valid() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.server.max_connections, 10_000);
        assert_eq!(c.storage.durability, Durability::Fsync);
    }

    #[test]
    fn environment_overrides_with_double_underscore_keys() {
        let c = load(
            "[server]\nmax_connections = 5\n",
            &[
                ("OUTBOXD_SERVER__MAX_CONNECTIONS", "7"),
                ("OUTBOXD_STORAGE__DURABILITY", "relaxed"),
                ("OUTBOXD_FAULT_FSYNC_FAIL_AFTER", "3"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.max_connections, 7);
        assert_eq!(c.storage.durability, Durability::Relaxed);
    }

    #[test]
    fn invalid_values_name_their_key() {
        let e = load("[heartbeat]\ninterval_ms = 100\ntimeout_ms = 50\n", &[]).unwrap_err();
        assert!(e.to_string().contains("heartbeat.timeout_ms"), "{e}");
        let e = load("[limits]\nmax_payload_bytes = 200000\n", &[]).unwrap_err();
        assert!(e.to_string().contains("limits.max_payload_bytes"), "{e}");
        let e = load("", &[("OUTBOXD_SERVER__MAX_CONNECTIONS", "lots")]).unwrap_err();
        assert!(e.to_string().contains("max_connections"), "{e}");
        let e = load("[server]\nlisten = \"nowhere\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("server.listen"), "{e}");
    }

    #[test]
    fn admin_api_beyond_loopback_needs_a_token() {
        let e = load("[server]\nadmin_listen = \"0.0.0.0:9090\"\n", &[]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("admin.token") && msg.contains("server.admin_listen"),
            "{msg}"
        );
        let c = load(
            "[server]\nadmin_listen = \"0.0.0.0:9090\"\n",
            &[("OUTBOXD_ADMIN__TOKEN", "s3cret")],
        )
        .unwrap();
        assert_eq!(c.admin.token, "s3cret");
        // A token that looks like a number stays the string it was.
        let c = load("", &[("OUTBOXD_ADMIN__TOKEN", "0123")]).unwrap();
        assert_eq!(c.admin.token, "0123");
        let c = load("[server]\nadmin_listen = \"[::1]:0\"\n", &[]).unwrap();
        assert!(c.admin_addr().unwrap().unwrap().ip().is_loopback());
    }

    #[test]
    fn empty_admin_listen_turns_the_admin_api_off() {
        let c = load("[server]\nadmin_listen = \"\"\n", &[]).unwrap();
        assert_eq!(c.admin_addr().unwrap(), None);
        let e = load("[server]\nadmin_listen = \"nowhere\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("server.admin_listen"), "{e}");
    }

    #[test]
    fn the_token_is_not_in_debug_output() {
        let c = load("", &[("OUTBOXD_ADMIN__TOKEN", "s3cret")]).unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn the_shipped_config_toml_loads_and_holds_the_defaults() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"));
        let c = Config::load(path, true, Vec::new()).unwrap();
        let d = Config::default();
        assert_eq!(c.server.admin_listen, d.server.admin_listen);
        assert_eq!(c.admin.token, d.admin.token);
        assert_eq!(c.server.listen, d.server.listen);
    }

    #[test]
    fn tls_certificate_and_key_come_together() {
        let c = load("", &[]).unwrap();
        assert!(!c.tls.enabled());
        let e = load("[tls]\ncert_file = \"cert.pem\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("tls.key_file"), "{e}");
        let e = load("[tls]\nkey_file = \"key.pem\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("tls.cert_file"), "{e}");
        let e = load("[tls]\nadmin = true\n", &[]).unwrap_err();
        assert!(e.to_string().contains("tls.admin"), "{e}");
        let c = load(
            "",
            &[
                ("OUTBOXD_TLS__CERT_FILE", "/etc/outboxd/cert.pem"),
                ("OUTBOXD_TLS__KEY_FILE", "/etc/outboxd/key.pem"),
                ("OUTBOXD_TLS__ADMIN", "true"),
            ],
        )
        .unwrap();
        assert!(c.tls.enabled() && c.tls.admin);
        assert_eq!(c.tls.key_file, Path::new("/etc/outboxd/key.pem"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = load("[server]\nmax_conections = 5\n", &[]).unwrap_err();
        assert!(e.to_string().contains("max_conections"), "{e}");
    }

    #[test]
    fn missing_required_file_is_an_error() {
        let e = Config::load(Path::new("/nonexistent/outboxd.toml"), true, Vec::new()).unwrap_err();
        assert!(matches!(e, ConfigError::Missing(_)));
    }
}
