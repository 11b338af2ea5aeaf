//! What every listener checks before a handler runs: the server's and the
//! sandbox's alike.
//!
//! - **Host.** A request must name a host the listener answers to
//!   (loopback names, the address it is bound to, and any configured names).
//!   Anything else is answered 421 Misdirected Request. This closes DNS
//!   rebinding: a page on `rebind.attacker.example` that resolves to
//!   127.0.0.1 still sends `Host: rebind.attacker.example`.
//! - **Origin.** A browser sends `Origin` on cross-site requests and on
//!   WebSocket upgrades. It must be the listener's own origin or one the
//!   operator listed; anything else, `null` included, is answered 403.
//!   Requests without `Origin` (curl, servers, the SDK outside a browser) pass.
//! - **JSON bodies** (where the listener asks for it). A write whose body is
//!   not `application/json` is answered 415. A web page can send
//!   `text/plain`, form and multipart bodies without a CORS preflight; it
//!   cannot send JSON that way.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::Arc;

/// The rules one listener applies (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// Host names (no port, lower case) besides the loopback names.
    hosts: Vec<String>,
    /// Browser origins besides the listener's own (`scheme://host[:port]`, lower case).
    origins: Vec<String>,
    json_only: bool,
}

const LOOPBACK: [&str; 4] = ["localhost", "127.0.0.1", "::1", "[::1]"];

impl Guard {
    /// Loopback names only, no foreign origins, any body.
    pub fn loopback() -> Self {
        Self::default()
    }

    /// Also answers to `host` (a name or an address, with or without a port).
    pub fn host(mut self, host: &str) -> Self {
        let h = host_name(host);
        if !h.is_empty() && !self.hosts.contains(&h) {
            self.hosts.push(h);
        }
        self
    }

    /// Also answers to the address it listens on (nothing is added for an
    /// unspecified address such as 0.0.0.0: list the names with [`Guard::host`]).
    pub fn bound(self, addr: std::net::SocketAddr) -> Self {
        if addr.ip().is_unspecified() {
            return self;
        }
        self.host(&addr.ip().to_string())
    }

    /// Also accepts browser requests from `origin` (`https://shop.example`).
    pub fn origin(mut self, origin: &str) -> Self {
        let o = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        if !o.is_empty() && !self.origins.contains(&o) {
            self.origins.push(o);
        }
        self
    }

    /// Writes must carry `Content-Type: application/json` (or no body at all).
    pub fn json_only(mut self) -> Self {
        self.json_only = true;
        self
    }

    /// Checks one request's headers; `Err` is the answer to send instead.
    pub fn check(&self, method: &Method, headers: &HeaderMap) -> Result<(), (StatusCode, &'static str, String)> {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
        let name = host_name(host);
        if !LOOPBACK.contains(&name.as_str()) && !self.hosts.contains(&name) {
            return Err((
                StatusCode::MISDIRECTED_REQUEST,
                "unknown_host",
                format!("this service does not answer to host '{host}'; add it to the allowed hosts if it is yours"),
            ));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let o = origin.to_str().unwrap_or("").trim_end_matches('/').to_ascii_lowercase();
            let own = ["http://", "https://"].iter().any(|s| o.strip_prefix(s) == Some(&host.to_ascii_lowercase()));
            if !own && !self.origins.contains(&o) {
                return Err((
                    StatusCode::FORBIDDEN,
                    "foreign_origin",
                    format!("requests from the web origin '{o}' are not allowed; add it to the allowed origins if it is yours"),
                ));
            }
        }
        if self.json_only && matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE) {
            let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
            let empty = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim() == "0")
                || (headers.get(header::CONTENT_LENGTH).is_none() && headers.get(header::TRANSFER_ENCODING).is_none());
            let json = ct.is_some_and(|c| {
                let mime = c.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
                mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
            });
            if !json && (ct.is_some() || !empty) {
                return Err((
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    format!("bodies must be JSON (Content-Type: application/json), not '{}'", ct.unwrap_or("none")),
                ));
            }
        }
        Ok(())
    }
}

/// The host part of a `Host` header or an address, lower case, without the port.
fn host_name(host: &str) -> String {
    let h = host.trim().to_ascii_lowercase();
    if let Some(rest) = h.strip_prefix('[') {
        // [::1]:8080 → ::1
        return rest.split(']').next().unwrap_or("").to_owned();
    }
    if h.matches(':').count() > 1 {
        return h; // a bare IPv6 address
    }
    h.split(':').next().unwrap_or("").to_owned()
}

/// The middleware: `.layer(from_fn_with_state(Arc::new(guard), guard::layer))`.
pub async fn layer(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    match g.check(req.method(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err((status, code, message)) => (status, Json(json!({"error": {"code": code, "message": message}}))).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn hosts_are_loopback_bound_or_listed() {
        let g = Guard::loopback().bound("10.0.0.5:8080".parse().unwrap()).host("Errand.Home");
        for ok in ["127.0.0.1:8080", "localhost", "[::1]:9000", "10.0.0.5:8080", "errand.home:80"] {
            assert!(g.check(&Method::GET, &headers(&[("host", ok)])).is_ok(), "{ok}");
        }
        for bad in ["rebind.attacker.example", "127.0.0.1.nip.io:8080", "", "localhost.attacker.example"] {
            let e = g.check(&Method::GET, &headers(&[("host", bad)])).unwrap_err();
            assert_eq!(e.0, StatusCode::MISDIRECTED_REQUEST, "{bad}");
        }
        assert!(g.check(&Method::GET, &HeaderMap::new()).is_err(), "no Host at all");
        // An unspecified bind address adds nothing.
        let any = Guard::loopback().bound("0.0.0.0:80".parse().unwrap());
        assert!(any.check(&Method::GET, &headers(&[("host", "0.0.0.0")])).is_err());
    }

    #[test]
    fn origins_are_the_listeners_own_or_listed() {
        let g = Guard::loopback().origin("https://shop.example/");
        let with = |o: &str| g.check(&Method::GET, &headers(&[("host", "127.0.0.1:8080"), ("origin", o)]));
        assert!(with("http://127.0.0.1:8080").is_ok());
        assert!(with("https://shop.example").is_ok());
        for bad in ["http://evil.example", "null", "http://127.0.0.1:9999", "https://shop.example.evil"] {
            assert_eq!(with(bad).unwrap_err().0, StatusCode::FORBIDDEN, "{bad}");
        }
        assert!(g.check(&Method::POST, &headers(&[("host", "localhost")])).is_ok(), "no Origin: not a browser");
    }

    #[test]
    fn json_only_refuses_other_bodies() {
        let g = Guard::loopback().json_only();
        let post = |h: &[(&str, &str)]| {
            let mut all = vec![("host", "localhost")];
            all.extend_from_slice(h);
            g.check(&Method::POST, &headers(&all))
        };
        assert!(post(&[("content-type", "application/json"), ("content-length", "2")]).is_ok());
        assert!(post(&[("content-type", "application/json; charset=utf-8"), ("content-length", "2")]).is_ok());
        assert!(post(&[("content-length", "0")]).is_ok(), "an empty write");
        assert!(post(&[]).is_ok(), "no body at all");
        for bad in [
            vec![("content-type", "text/plain"), ("content-length", "10")],
            vec![("content-type", "application/x-www-form-urlencoded"), ("content-length", "10")],
            vec![("content-type", "multipart/form-data; boundary=x"), ("content-length", "10")],
            vec![("content-type", "text/plain"), ("content-length", "0")],
            vec![("content-length", "10")],
        ] {
            assert_eq!(post(&bad).unwrap_err().0, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{bad:?}");
        }
        // Reads are not writes.
        assert!(g.check(&Method::GET, &headers(&[("host", "localhost"), ("content-type", "text/plain")])).is_ok());
        // Without json_only any body passes.
        assert!(Guard::loopback().check(&Method::POST, &headers(&[("host", "localhost"), ("content-type", "text/plain")])).is_ok());
    }
}
