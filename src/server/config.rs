//! `errand serve`'s configuration file (TOML): where to listen, the limits,
//! the users with their bearer tokens, and the mini-programs' app keys.
//!
//! ```toml
//! [server]
//! addr = "127.0.0.1:8080"
//! max_message_bytes = 16384
//! allowed_origins = ["https://shop.example"]   # pages that embed the widget
//!
//! [[users]]
//! id = "alice"
//! token = "tok-alice-…"
//! wallet = "alice"          # the sandbox wallet that pays (default: the id)
//!
//! [[apps]]
//! id = "florist"
//! key = "key-florist-…"
//! scopes = ["apps:write", "orders:read"]
//! ```
//!
//! With no file, `errand serve` writes one with a fresh random token for the
//! user `me`, so a first start works and is still not open to anyone else on
//! the machine.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the server config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write the server config {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("the server config {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Where to listen (the command line's `--addr` wins).
    #[serde(default = "default_addr")]
    pub addr: SocketAddr,
    /// Largest user message or frame, in bytes; bigger ones get an error.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Chat sessions kept per user; a new one evicts the least recently
    /// used (never refused).
    #[serde(default = "default_sessions")]
    pub sessions_per_user: usize,
    /// Minutes a session with nobody attached and nothing running is kept.
    #[serde(default = "default_session_idle")]
    pub session_idle_minutes: u64,
    /// Inputs (chat messages, API requests) per user per minute.
    #[serde(default = "default_rate")]
    pub requests_per_minute: u32,
    /// Open WebSocket connections in all; a quarter of them at most may be
    /// waiting for `hello`.
    #[serde(default = "default_connections")]
    pub max_connections: usize,
    /// Open WebSocket connections per user.
    #[serde(default = "default_connections_per_user")]
    pub connections_per_user: usize,
    /// Frames queued to one WebSocket client before it counts as too slow.
    #[serde(default = "default_client_buffer")]
    pub client_buffer: usize,
    /// Model requests waiting beyond which new work is answered "busy".
    #[serde(default = "default_queue")]
    pub queue_limit: usize,
    /// Seconds a shutdown waits for replies in progress.
    #[serde(default = "default_drain")]
    pub drain_seconds: u64,
    /// Host names the server answers to besides loopback and the address
    /// it listens on (`errand.home`); other `Host` headers get 421.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Web origins whose pages may call the server (`https://shop.example`,
    /// for the widget on a mini-program's page); other origins get 403.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

fn default_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_max_message() -> usize {
    16 * 1024
}
fn default_sessions() -> usize {
    16
}
fn default_session_idle() -> u64 {
    24 * 60
}
fn default_rate() -> u32 {
    60
}
fn default_connections() -> usize {
    256
}
fn default_connections_per_user() -> usize {
    32
}
fn default_client_buffer() -> usize {
    512
}
fn default_queue() -> usize {
    8
}
fn default_drain() -> u64 {
    60
}

impl Limits {
    pub fn session_idle(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.session_idle_minutes.saturating_mul(60))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            addr: default_addr(),
            max_message_bytes: default_max_message(),
            sessions_per_user: default_sessions(),
            session_idle_minutes: default_session_idle(),
            requests_per_minute: default_rate(),
            max_connections: default_connections(),
            connections_per_user: default_connections_per_user(),
            client_buffer: default_client_buffer(),
            queue_limit: default_queue(),
            drain_seconds: default_drain(),
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub id: String,
    pub token: String,
    /// The payment wallet; the user id when unset.
    #[serde(default)]
    pub wallet: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppEntry {
    pub id: String,
    pub key: String,
    #[serde(default)]
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default)]
    pub server: Limits,
    #[serde(default)]
    pub users: Vec<UserEntry>,
    #[serde(default)]
    pub apps: Vec<AppEntry>,
}

/// Scopes an app key may carry.
pub const SCOPES: [&str; 3] = ["apps:write", "apps:read", "orders:read"];

impl ServerConfig {
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: ServerConfig = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        cfg.check().map_err(|message| ConfigError::Invalid { path: path.to_owned(), message })?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Reads the file, or creates it with one user (`me`) and a random token.
    /// Returns the config and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), ConfigError> {
        if path.exists() {
            return Ok((Self::load(path)?, false));
        }
        let cfg = ServerConfig {
            users: vec![UserEntry {
                id: "me".into(),
                token: new_secret("tok"),
                wallet: Some("demo".into()),
            }],
            ..Default::default()
        };
        let text = format!(
            "# errand serve: users (bearer tokens), mini-program app keys and limits.\n\
             # Written on first start; see docs/server.md.\n{}",
            toml::to_string_pretty(&cfg).expect("the config serializes")
        );
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ConfigError::Write { path: path.to_owned(), source })?;
        }
        write_private(path, &text).map_err(|source| ConfigError::Write { path: path.to_owned(), source })?;
        Ok((cfg, true))
    }

    fn check(&self) -> Result<(), String> {
        let mut tokens = std::collections::HashSet::new();
        let mut ids = std::collections::HashSet::new();
        for u in &self.users {
            if u.id.is_empty() || u.id.len() > 64 || !u.id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(format!("user id `{}` must be 1–64 letters, digits, `-`, `_` or `.`", u.id));
            }
            if !ids.insert(u.id.clone()) {
                return Err(format!("user `{}` is listed twice", u.id));
            }
            if u.token.len() < 16 {
                return Err(format!("user `{}` has a token shorter than 16 characters; use a long random one", u.id));
            }
            if !tokens.insert(u.token.clone()) {
                return Err(format!("user `{}` shares a token with another user or app", u.id));
            }
        }
        let mut app_ids = std::collections::HashSet::new();
        for a in &self.apps {
            if a.id.is_empty() || a.id.len() > 64 || !a.id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
                return Err(format!("app id `{}` must be 1–64 characters of a-z, 0-9 and _", a.id));
            }
            if !app_ids.insert(a.id.clone()) {
                return Err(format!("app `{}` is listed twice", a.id));
            }
            if a.key.len() < 16 {
                return Err(format!("app `{}` has a key shorter than 16 characters", a.id));
            }
            if !tokens.insert(a.key.clone()) {
                return Err(format!("app `{}` shares its key with a user or another app", a.id));
            }
            for s in &a.scopes {
                if !SCOPES.contains(&s.as_str()) {
                    return Err(format!("app `{}` has unknown scope `{s}`; scopes are {}", a.id, SCOPES.join(", ")));
                }
            }
        }
        let l = &self.server;
        if l.max_message_bytes < 256 || l.sessions_per_user == 0 || l.requests_per_minute == 0 || l.max_connections == 0 || l.connections_per_user == 0 || l.client_buffer < 16 {
            return Err("limits must be positive (max_message_bytes at least 256, client_buffer at least 16)".into());
        }
        Ok(())
    }
}

/// A random secret with a readable prefix (`tok-…`, `key-…`).
pub fn new_secret(prefix: &str) -> String {
    format!("{prefix}-{}", hex::encode(rand::random::<[u8; 24]>()))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        f.write_all(text.as_bytes())
    }
    #[cfg(not(unix))]
    {
        std::fs::write(path, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let p = Path::new("x.toml");
        let e = ServerConfig::parse("[[users]]\nid = \"a\"\ntoken = \"short\"\n", p).unwrap_err();
        assert!(e.to_string().contains("shorter than 16"), "{e}");
        let e = ServerConfig::parse("[[apps]]\nid = \"a\"\nkey = \"0123456789abcdefgh\"\nscopes = [\"root\"]\n", p).unwrap_err();
        assert!(e.to_string().contains("unknown scope `root`"), "{e}");
        let e = ServerConfig::parse("[[apps]]\nid = \"../x\"\nkey = \"0123456789abcdefgh\"\n", p).unwrap_err();
        assert!(e.to_string().contains("a-z, 0-9"), "{e}");
        let e = ServerConfig::parse("[server]\nport = 1\n", p).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = ServerConfig::parse(
            "[[users]]\nid = \"a\"\ntoken = \"0123456789abcdefgh\"\n[[users]]\nid = \"b\"\ntoken = \"0123456789abcdefgh\"\n",
            p,
        )
        .unwrap_err();
        assert!(e.to_string().contains("shares a token"), "{e}");
    }

    #[test]
    fn first_start_writes_a_private_config_with_a_random_token() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("server.toml");
        let (a, created) = ServerConfig::load_or_create(&p).unwrap();
        assert!(created);
        assert_eq!(a.users[0].id, "me");
        let (b, created) = ServerConfig::load_or_create(&p).unwrap();
        assert!(!created);
        assert_eq!(a.users[0].token, b.users[0].token);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let other = ServerConfig::load_or_create(&dir.path().join("other.toml")).unwrap().0;
        assert_ne!(other.users[0].token, a.users[0].token);
    }
}
