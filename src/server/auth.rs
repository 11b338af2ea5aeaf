//! Who is calling: users with bearer tokens, mini-programs with app keys
//! that carry scopes. Tokens are kept only as SHA-256 digests, so a lookup
//! never compares secrets byte by byte.
//!
//! Every handler that touches a user's data takes [`UserAuth`] and reads
//! only rows of that user; ids of other users' objects answer "not found",
//! exactly like ids that do not exist.

use super::config::ServerConfig;
use super::error::ApiError;
use super::AppState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub enum Principal {
    User { id: String, wallet: String },
    App { id: String, scopes: Vec<String> },
}

impl Principal {
    /// The key rate limits are counted under.
    pub fn key(&self) -> String {
        match self {
            Principal::User { id, .. } => format!("user:{id}"),
            Principal::App { id, .. } => format!("app:{id}"),
        }
    }
}

pub struct Auth {
    by_digest: HashMap<[u8; 32], Principal>,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Auth {
    pub fn from_config(cfg: &ServerConfig) -> Self {
        let mut by_digest = HashMap::new();
        for u in &cfg.users {
            by_digest.insert(
                digest(&u.token),
                Principal::User { id: u.id.clone(), wallet: u.wallet.clone().unwrap_or_else(|| u.id.clone()) },
            );
        }
        for a in &cfg.apps {
            by_digest.insert(digest(&a.key), Principal::App { id: a.id.clone(), scopes: a.scopes.clone() });
        }
        Self { by_digest }
    }

    pub fn check(&self, secret: &str) -> Option<Principal> {
        if secret.is_empty() {
            return None;
        }
        self.by_digest.get(&digest(secret)).cloned()
    }

    /// The principal named by an `Authorization: Bearer …` header.
    pub fn from_headers(&self, headers: &axum::http::HeaderMap) -> Option<Principal> {
        let v = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
        let token = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))?;
        self.check(token.trim())
    }
}

/// Any authenticated caller (user or app).
pub struct Caller(pub Principal);

/// An authenticated user: `id` and the wallet that pays.
pub struct UserAuth {
    pub id: String,
    pub wallet: String,
}

/// An authenticated mini-program with its scopes.
pub struct AppAuth {
    pub id: String,
    pub scopes: Vec<String>,
}

impl AppAuth {
    pub fn require(&self, scope: &str) -> Result<(), ApiError> {
        if self.scopes.iter().any(|s| s == scope) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!("app `{}` lacks the `{scope}` scope; add it to the app's entry in the server config", self.id)))
        }
    }
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        match state.auth.from_headers(&parts.headers) {
            Some(p) => Ok(Caller(p)),
            None => {
                state.metrics.inc("errand_auth_failures_total", &[("interface", "http")]);
                Err(ApiError::unauthorized())
            }
        }
    }
}

impl FromRequestParts<Arc<AppState>> for UserAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        match Caller::from_request_parts(parts, state).await?.0 {
            Principal::User { id, wallet } => Ok(UserAuth { id, wallet }),
            Principal::App { id, .. } => Err(ApiError::forbidden(format!(
                "this endpoint is for users; app `{id}` must call it with a user's token"
            ))),
        }
    }
}

impl FromRequestParts<Arc<AppState>> for AppAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        match Caller::from_request_parts(parts, state).await?.0 {
            Principal::App { id, scopes } => Ok(AppAuth { id, scopes }),
            Principal::User { .. } => Err(ApiError::forbidden("this endpoint takes a mini-program's app key, not a user token")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::config::{AppEntry, UserEntry};

    #[test]
    fn tokens_map_to_their_principal_only() {
        let cfg = ServerConfig {
            users: vec![UserEntry { id: "alice".into(), token: "tok-alice-0123456789".into(), wallet: None }],
            apps: vec![AppEntry { id: "florist".into(), key: "key-florist-0123456789".into(), scopes: vec!["apps:write".into()] }],
            ..Default::default()
        };
        let a = Auth::from_config(&cfg);
        assert_eq!(a.check("tok-alice-0123456789"), Some(Principal::User { id: "alice".into(), wallet: "alice".into() }));
        assert!(matches!(a.check("key-florist-0123456789"), Some(Principal::App { .. })));
        assert_eq!(a.check("tok-alice-012345678"), None);
        assert_eq!(a.check(""), None);
        let mut h = axum::http::HeaderMap::new();
        h.insert("authorization", "Bearer tok-alice-0123456789".parse().unwrap());
        assert!(a.from_headers(&h).is_some());
        h.insert("authorization", "Basic tok-alice-0123456789".parse().unwrap());
        assert!(a.from_headers(&h).is_none());
    }
}
