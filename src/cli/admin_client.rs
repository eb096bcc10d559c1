//! The client side of a running broker's admin API: the HTTP(S) agent with the certificates it
//! trusts, the bearer token, and answers turned into views or into a [`ToolError`] whose words
//! say what to fix.

use std::path::PathBuf;

use serde::de::DeserializeOwned;

use super::tool_error::ToolError;

/// Percent-encodes a path segment (client ids may hold characters a URL path does not).
pub(super) fn encode_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A running broker's admin API.
pub(super) struct Admin {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Admin {
    /// Trusts the certificates in `ca_files` for https://, or the public certificate
    /// authorities when there are none. Reads the files.
    pub(super) fn new(
        base: String,
        token: Option<String>,
        ca_files: &[PathBuf],
    ) -> Result<Admin, ToolError> {
        let fail = |message: String| ToolError::Admin {
            url: base.clone(),
            message,
        };
        let mut roots = Vec::new();
        for path in ca_files {
            let pem = std::fs::read(path)
                .map_err(|e| fail(format!("cannot read --ca {}: {e}", path.display())))?;
            let before = roots.len();
            for item in ureq::tls::parse_pem(&pem) {
                match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => roots.push(c),
                    Ok(_) => {}
                    Err(e) => {
                        return Err(fail(format!("{} is not valid PEM: {e}", path.display())))
                    }
                }
            }
            if roots.len() == before {
                return Err(fail(format!(
                    "{} holds no PEM certificate (\"BEGIN CERTIFICATE\")",
                    path.display()
                )));
            }
        }
        let root_certs = if roots.is_empty() {
            ureq::tls::RootCerts::WebPki
        } else {
            ureq::tls::RootCerts::from(roots)
        };
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .http_status_as_error(false)
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(root_certs)
                    .build(),
            )
            .build()
            .into();
        Ok(Admin { base, token, agent })
    }

    fn fail(&self, message: impl Into<String>) -> ToolError {
        ToolError::Admin {
            url: self.base.clone(),
            message: message.into(),
        }
    }

    fn call(
        &self,
        req: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    ) -> Result<(u16, String), ToolError> {
        let req = match &self.token {
            Some(t) => req.header("Authorization", &format!("Bearer {t}")),
            None => req,
        };
        self.read(req.call())
    }

    fn read(
        &self,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, String), ToolError> {
        let mut resp = r.map_err(|e| match rejected_certificate(&e) {
            Some(words) => self.fail(format!("its TLS certificate was rejected: {words}")),
            None => self.fail(format!(
                "{e} (is the broker running, and is its admin API on this address?)"
            )),
        })?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| self.fail(e.to_string()))?;
        Ok((status, body))
    }

    fn decode<T: DeserializeOwned>(&self, status: u16, body: &str) -> Result<T, ToolError> {
        if status == 401 || status == 403 {
            return Err(self.fail(format!(
                "refused ({status}): pass the admin token with --token or OUTBOXD_ADMIN__TOKEN"
            )));
        }
        if !(200..300).contains(&status) {
            return Err(self.fail(format!("HTTP {status}: {}", error_message(body))));
        }
        serde_json::from_str(body).map_err(|e| self.fail(format!("unexpected answer: {e}")))
    }

    pub(super) fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ToolError> {
        let (status, body) = self.call(self.agent.get(&format!("{}{path}", self.base)))?;
        self.decode(status, &body)
    }

    /// Like [`Admin::get`], with a 404 meaning the client has no outbox.
    pub(super) fn get_client<T: DeserializeOwned>(
        &self,
        path: &str,
        client: &str,
    ) -> Result<T, ToolError> {
        let (status, body) = self.call(self.agent.get(&format!("{}{path}", self.base)))?;
        if status == 404 {
            return Err(ToolError::NoSuchClient(client.to_string()));
        }
        self.decode(status, &body)
    }

    /// A DELETE; a 404 means the client (or its subscription) does not exist.
    pub(super) fn delete(&self, path: &str, client: &str) -> Result<serde_json::Value, ToolError> {
        let (status, body) = self.call(self.agent.delete(&format!("{}{path}", self.base)))?;
        if status == 404 && body.contains("not subscribed") {
            return Err(self.fail(error_message(&body)));
        }
        if status == 404 {
            return Err(ToolError::NoSuchClient(client.to_string()));
        }
        self.decode(status, &body)
    }

    pub(super) fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, ToolError> {
        let req = self.agent.post(&format!("{}{path}", self.base));
        let req = match &self.token {
            Some(t) => req.header("Authorization", &format!("Bearer {t}")),
            None => req,
        };
        let (status, text) = self.read(req.send_json(body))?;
        self.decode(status, &text)
    }
}

/// The reason in words when `e` is the admin API's certificate failing verification.
fn rejected_certificate(e: &ureq::Error) -> Option<String> {
    let tls = match e {
        ureq::Error::Rustls(tls) => tls,
        ureq::Error::Io(io) => io
            .get_ref()?
            .downcast_ref::<tokio_rustls::rustls::Error>()?,
        _ => return None,
    };
    crate::client::tls::rejection_in_words(tls)
}

/// The `message` of an API error body, or the body itself.
fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let e = v.get("error")?;
            let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("error");
            let msg = e.get("message").and_then(|m| m.as_str()).unwrap_or("");
            Some(format!("{code}: {msg}"))
        })
        .unwrap_or_else(|| body.trim().chars().take(300).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_percent_encoded_in_api_paths() {
        assert_eq!(encode_path("a b/c"), "a%20b%2Fc");
    }
}
