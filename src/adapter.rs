//! Adapters: how a validated tool call reaches a mini-program's backend.
//!
//! One trait, [`Adapter`], so the agent does not care whether a service is
//! the in-process sandbox, a third party's HTTP API or a test double. The
//! [`HttpAdapter`] maps a call onto the manifest's endpoint:
//!
//! - arguments are checked against the tool's schema *before* anything is
//!   sent; a rejection comes back as an error the model can act on;
//! - `{name}` path segments are filled from the arguments; the rest go in
//!   the query string (GET) or a JSON body (writes);
//! - every request has a timeout; GETs are retried with backoff on timeouts,
//!   connection failures and 5xx answers, writes never are (a write that
//!   timed out may have happened), and each write carries an
//!   `Idempotency-Key` so that a deliberate repeat runs at most once;
//! - answers are checked against the manifest's `result` schema;
//! - failures carry two texts: a short one for the user and a precise one
//!   for the model.

use crate::tools::{path_params, Endpoint, Tool};
use serde_json::{Map, Value};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The arguments do not fit the schema; nothing was sent.
    InvalidArguments,
    /// The service did not answer in time.
    Timeout,
    /// The service could not be reached.
    Unreachable,
    /// The service refused the request (4xx): the model can fix and retry.
    Rejected,
    /// The service failed (5xx).
    ServerError,
    /// The answer was not what the manifest promises.
    BadResult,
}

#[derive(Debug, Clone)]
pub struct AdapterError {
    pub kind: ErrorKind,
    /// HTTP status, when there was an answer.
    pub status: Option<u16>,
    /// The service's own error code (`{"error": {"code"}}`), when it gave one.
    pub code: Option<String>,
    /// Short, for the person: what happened and what to do.
    pub user: String,
    /// Precise, for the model (and logs): endpoint, status, the service's words.
    pub model: String,
}

impl std::fmt::Display for AdapterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.model)
    }
}

impl std::error::Error for AdapterError {}

/// One call to one endpoint of a tool.
pub struct CallRequest<'a> {
    pub tool: &'a Tool,
    pub endpoint: &'a Endpoint,
    pub args: &'a Map<String, Value>,
    /// Sent as `Idempotency-Key` on writes.
    pub idempotency_key: Option<String>,
    /// Check the answer against the tool's `result` schema (not for quotes).
    pub check_result: bool,
    /// The amount and currency the person confirmed, sent as
    /// `X-Errand-Confirmed-Amount` / `-Currency` so the service can refuse
    /// (409 `terms_changed`) if its terms moved since the quote.
    pub confirmed: Option<(i64, String)>,
}

pub trait Adapter: Send + Sync {
    fn call<'a>(&'a self, req: CallRequest<'a>) -> BoxFuture<'a, Result<Value, AdapterError>>;
}

#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Replaces `{sandbox}` in manifests' `base_url`.
    pub sandbox_url: Option<String>,
    pub timeout: Duration,
    /// Extra attempts for idempotent (GET) calls.
    pub retries: u32,
    pub backoff: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            sandbox_url: None,
            timeout: Duration::from_secs(8),
            retries: 2,
            backoff: Duration::from_millis(200),
        }
    }
}

pub struct HttpAdapter {
    client: reqwest::Client,
    opts: HttpOptions,
}

impl HttpAdapter {
    pub fn new(opts: HttpOptions) -> Self {
        let client = reqwest::Client::builder()
            .timeout(opts.timeout)
            .connect_timeout(opts.timeout.min(Duration::from_secs(3)))
            // A mini-program answers its own calls: a redirect could send
            // the call (and its confirmed terms) somewhere a manifest could
            // not name, such as the payment service.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a plain HTTP client builds");
        Self { client, opts }
    }

    /// The full URL and the arguments left after path parameters are taken.
    pub fn url(&self, tool: &Tool, ep: &Endpoint, args: &Map<String, Value>) -> Result<(String, Map<String, Value>), AdapterError> {
        let base = tool.base_url.as_deref().ok_or_else(|| AdapterError {
            kind: ErrorKind::Unreachable,
            status: None,
            code: None,
            user: format!("The {} service is not set up.", tool.app),
            model: format!("tool `{}` has no base_url in its manifest", tool.def.name),
        })?;
        let base = match (base.strip_prefix("{sandbox}"), &self.opts.sandbox_url) {
            (Some(rest), Some(sb)) => format!("{}{rest}", sb.trim_end_matches('/')),
            (Some(_), None) => {
                return Err(AdapterError {
                    kind: ErrorKind::Unreachable,
                    status: None,
                    code: None,
                    user: format!("The {} service is not running.", tool.app),
                    model: format!("tool `{}` lives in the sandbox, and no sandbox is running", tool.def.name),
                })
            }
            (None, _) => base.to_string(),
        };
        let mut rest = args.clone();
        let mut path = ep.path.clone();
        for p in path_params(&ep.path) {
            let v = rest.remove(p).ok_or_else(|| AdapterError {
                kind: ErrorKind::InvalidArguments,
                status: None,
                code: None,
                user: "Something is missing from that request.".into(),
                model: format!("`{}` needs the argument `{p}`", tool.def.name),
            })?;
            let text = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            if text.is_empty() || text.chars().all(|c| c == '.') {
                return Err(AdapterError {
                    kind: ErrorKind::InvalidArguments,
                    status: None,
                    code: None,
                    user: "That request was not valid.".into(),
                    model: format!("`{p}` = {text:?} is not a valid id"),
                });
            }
            path = path.replace(&format!("{{{p}}}"), &encode_segment(&text));
        }
        Ok((format!("{}{}", base.trim_end_matches('/'), path), rest))
    }

    async fn once(
        &self,
        method: &reqwest::Method,
        url: &str,
        rest: &Map<String, Value>,
        key: Option<&str>,
        confirmed: Option<&(i64, String)>,
    ) -> Result<Value, AdapterError> {
        let mut req = self.client.request(method.clone(), url);
        if let Some((amount, currency)) = confirmed {
            req = req
                .header("X-Errand-Confirmed-Amount", amount.to_string())
                .header("X-Errand-Confirmed-Currency", currency.as_str());
        }
        if *method == reqwest::Method::GET {
            let q: Vec<(String, String)> = rest
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| {
                    let s = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), s)
                })
                .collect();
            req = req.query(&q);
        } else {
            req = req.json(rest);
            if let Some(k) = key {
                req = req.header("Idempotency-Key", k);
            }
        }
        let what = format!("{method} {url}");
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                AdapterError {
                    kind: ErrorKind::Timeout,
                    status: None,
                    code: None,
                    user: String::new(),
                    model: format!("{what} timed out after {:?}", self.opts.timeout),
                }
            } else {
                AdapterError {
                    kind: ErrorKind::Unreachable,
                    status: None,
                    code: None,
                    user: String::new(),
                    model: format!("{what} failed: {e}"),
                }
            }
        })?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let json: Option<Value> = serde_json::from_str(&body).ok();
        if status.is_success() {
            return json.ok_or_else(|| AdapterError {
                kind: ErrorKind::BadResult,
                status: Some(status.as_u16()),
                code: None,
                user: String::new(),
                model: format!("{what} answered {status} with a body that is not JSON"),
            });
        }
        let code = json
            .as_ref()
            .and_then(|j| j["error"]["code"].as_str())
            .map(str::to_owned);
        let msg = json
            .as_ref()
            .and_then(|j| j["error"]["message"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| body.chars().take(300).collect());
        Err(AdapterError {
            kind: if status.is_server_error() {
                ErrorKind::ServerError
            } else {
                ErrorKind::Rejected
            },
            status: Some(status.as_u16()),
            code,
            user: msg.clone(),
            model: format!("{what} answered {status}: {msg}"),
        })
    }
}

impl Adapter for HttpAdapter {
    fn call<'a>(&'a self, req: CallRequest<'a>) -> BoxFuture<'a, Result<Value, AdapterError>> {
        Box::pin(async move {
            let tool = req.tool;
            if let Err(e) = tool.validate(req.args) {
                return Err(AdapterError {
                    kind: ErrorKind::InvalidArguments,
                    status: None,
                    code: None,
                    user: "That request was not complete or not valid.".into(),
                    model: e,
                });
            }
            let (url, rest) = self.url(tool, req.endpoint, req.args)?;
            let method = reqwest::Method::from_bytes(req.endpoint.method.as_bytes()).map_err(|_| AdapterError {
                kind: ErrorKind::InvalidArguments,
                status: None,
                code: None,
                user: format!("The {} service is misconfigured.", tool.app),
                model: format!("bad method {}", req.endpoint.method),
            })?;
            let idempotent = method == reqwest::Method::GET;
            let attempts = if idempotent { 1 + self.opts.retries } else { 1 };
            let mut last = None;
            for attempt in 0..attempts {
                if attempt > 0 {
                    tokio::time::sleep(self.opts.backoff * 2u32.pow(attempt - 1)).await;
                }
                match self.once(&method, &url, &rest, req.idempotency_key.as_deref(), req.confirmed.as_ref()).await {
                    Ok(v) => {
                        if req.check_result {
                            if let Err(e) = tool.validate_result(&v) {
                                return Err(AdapterError {
                                    kind: ErrorKind::BadResult,
                                    status: None,
                                    code: None,
                                    user: user_text(ErrorKind::BadResult, &tool.app, idempotent),
                                    model: e,
                                });
                            }
                        }
                        return Ok(v);
                    }
                    Err(e) => {
                        let retry = matches!(e.kind, ErrorKind::Timeout | ErrorKind::Unreachable | ErrorKind::ServerError);
                        last = Some(e);
                        if !retry {
                            break;
                        }
                    }
                }
            }
            let mut e = last.expect("at least one attempt");
            if e.kind != ErrorKind::Rejected {
                e.user = user_text(e.kind, &tool.app, idempotent);
            }
            if attempts > 1 {
                e.model = format!("{} (after {attempts} attempts)", e.model);
            }
            Err(e)
        })
    }
}

fn user_text(kind: ErrorKind, app: &str, idempotent: bool) -> String {
    let after = if idempotent {
        "Please try again in a moment."
    } else {
        "Nothing was charged by this step; I'll check the order before trying again."
    };
    match kind {
        ErrorKind::Timeout => format!("The {app} service did not answer in time. {after}"),
        ErrorKind::Unreachable => format!("The {app} service cannot be reached right now. {after}"),
        ErrorKind::ServerError => format!("The {app} service had a problem. {after}"),
        ErrorKind::BadResult => format!("The {app} service sent an answer I could not understand. {after}"),
        ErrorKind::InvalidArguments | ErrorKind::Rejected => format!("The {app} service could not do that."),
    }
}

/// Percent-encodes one path segment.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'@') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::{Localized, ToolDef};
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn tool(method: &str, path: &str, base: &str) -> Tool {
        let mut t = Tool::new(
            "demo",
            ToolDef {
                name: "demo_call".into(),
                description: Localized { en: "d".into(), zh: None, ko: None },
                parameters: json!({"type": "object", "properties": {"id": {"type": "string"}, "n": {"type": "integer"}}, "required": ["id"], "additionalProperties": false}),
                confirm: false,
                endpoint: Some(Endpoint { method: method.into(), path: path.into() }),
                card: None,
                quote: None,
                result: Some(json!({"type": "object", "required": ["ok"]})),
                role: None,
                order_id: None,
                final_statuses: Vec::new(),
            },
        )
        .unwrap();
        t.base_url = Some(base.into());
        t
    }

    async fn serve(app: Router) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        format!("http://{addr}")
    }

    fn args(v: Value) -> Map<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    /// Regression (issue 23, finding 6): a mini-program that answers with a
    /// redirect does not get its call sent on to where it points.
    #[tokio::test]
    async fn redirects_are_not_followed() {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let target = serve(Router::new().route(
            "/pay/v1/trades/x/pay",
            post(move || async move {
                h.fetch_add(1, Ordering::SeqCst);
                Json(json!({"ok": true}))
            }),
        ))
        .await;
        let to = format!("{target}/pay/v1/trades/x/pay");
        let redirector = serve(Router::new().route(
            "/v1/go",
            post(move || async move { (axum::http::StatusCode::TEMPORARY_REDIRECT, [(axum::http::header::LOCATION, to)]) }),
        ))
        .await;
        let ad = HttpAdapter::new(HttpOptions { backoff: Duration::from_millis(1), ..Default::default() });
        let t = tool("POST", "/v1/go", &redirector);
        let ep = t.def.endpoint.clone().unwrap();
        let a = args(json!({"id": "x"}));
        let r = ad.call(CallRequest { tool: &t, endpoint: &ep, args: &a, idempotency_key: None, check_result: true, confirmed: None }).await;
        assert!(r.is_err(), "{r:?}");
        assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect was followed");
    }

    #[tokio::test]
    async fn gets_retry_on_5xx_and_writes_do_not() {
        let hits = Arc::new(AtomicUsize::new(0));
        let (h1, h2) = (hits.clone(), hits.clone());
        let app = Router::new()
            .route(
                "/v1/things/{id}",
                get(move |axum::extract::Path(id): axum::extract::Path<String>, axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>| async move {
                    let n = h1.fetch_add(1, Ordering::SeqCst);
                    if n < 2 {
                        return Err((axum::http::StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": {"code": "busy", "message": "try later"}}))));
                    }
                    Ok(Json(json!({"ok": true, "id": id, "n": q.get("n")})))
                }),
            )
            .route(
                "/v1/writes",
                post(move |headers: axum::http::HeaderMap| async move {
                    h2.fetch_add(100, Ordering::SeqCst);
                    assert_eq!(headers.get("idempotency-key").unwrap(), "k-1");
                    (axum::http::StatusCode::BAD_GATEWAY, Json(json!({"error": {"code": "down", "message": "backend down"}})))
                }),
            );
        let base = serve(app).await;
        let ad = HttpAdapter::new(HttpOptions { backoff: Duration::from_millis(1), ..Default::default() });
        let t = tool("GET", "/v1/things/{id}", &base);
        let ep = t.def.endpoint.clone().unwrap();
        let a = args(json!({"id": "a b/c", "n": 3}));
        let v = ad
            .call(CallRequest { tool: &t, endpoint: &ep, args: &a, idempotency_key: None, check_result: true, confirmed: None })
            .await
            .unwrap();
        assert_eq!(v, json!({"ok": true, "id": "a b/c", "n": "3"}));
        assert_eq!(hits.load(Ordering::SeqCst), 3, "two 503s, then success");

        let w = tool("POST", "/v1/writes", &base);
        let ep = w.def.endpoint.clone().unwrap();
        let a = args(json!({"id": "x"}));
        let e = ad
            .call(CallRequest { tool: &w, endpoint: &ep, args: &a, idempotency_key: Some("k-1".into()), check_result: true, confirmed: None })
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::ServerError);
        assert_eq!(hits.load(Ordering::SeqCst), 103, "the write ran exactly once");
        assert!(e.model.contains("502") && e.model.contains("backend down"), "{}", e.model);
        assert!(e.user.contains("demo service had a problem"), "{}", e.user);
    }

    #[tokio::test]
    async fn bad_arguments_are_never_sent_and_timeouts_are_clear() {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let app = Router::new().route(
            "/slow/{id}",
            get(move || async move {
                h.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(5)).await;
                Json(json!({"ok": true}))
            }),
        );
        let base = serve(app).await;
        let ad = HttpAdapter::new(HttpOptions {
            timeout: Duration::from_millis(200),
            retries: 1,
            backoff: Duration::from_millis(1),
            ..Default::default()
        });
        let t = tool("GET", "/slow/{id}", &base);
        let ep = t.def.endpoint.clone().unwrap();
        let bad = args(json!({"n": "three"}));
        let e = ad
            .call(CallRequest { tool: &t, endpoint: &ep, args: &bad, idempotency_key: None, check_result: true, confirmed: None })
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArguments);
        assert!(e.model.contains("id") && e.model.contains("n"), "{}", e.model);
        assert_eq!(hits.load(Ordering::SeqCst), 0);

        let ok = args(json!({"id": "1"}));
        let e = ad
            .call(CallRequest { tool: &t, endpoint: &ep, args: &ok, idempotency_key: None, check_result: true, confirmed: None })
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Timeout);
        assert!(e.user.contains("did not answer in time"), "{}", e.user);
        assert!(e.model.contains("timed out") && e.model.contains("2 attempts"), "{}", e.model);
    }

    #[tokio::test]
    async fn results_are_checked_against_the_manifest() {
        let app = Router::new().route("/r/{id}", get(|| async { Json(json!({"nope": 1})) }));
        let base = serve(app).await;
        let ad = HttpAdapter::new(HttpOptions::default());
        let t = tool("GET", "/r/{id}", &base);
        let ep = t.def.endpoint.clone().unwrap();
        let a = args(json!({"id": "1"}));
        let e = ad
            .call(CallRequest { tool: &t, endpoint: &ep, args: &a, idempotency_key: None, check_result: true, confirmed: None })
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadResult);
        assert!(e.model.contains("malformed") && e.model.contains("ok"), "{}", e.model);
    }
}
