//! Where the commands on the stored state read it from: a data directory (or the PostgreSQL
//! database) read offline through [`crate::store::Inspector`], or a running broker's admin API.
//! Both answer with the same shapes ([`crate::views`]), so a command never asks which one it
//! has.

use std::path::PathBuf;

use clap::Args;

use super::admin_client::{encode_path, Admin};
use super::tool_error::ToolError;
use crate::config::{Backend, Config};
use crate::store::Inspector;
use crate::views::{ClientView, OutboxPage, SortBy, StatsView, TopicView};

/// Where the stored state is read from.
#[derive(Debug, Args, Clone, Default)]
pub struct SourceArgs {
    /// Config file [default: ./config.toml, used only if present].
    #[arg(long, value_name = "PATH", global = true)]
    config: Option<PathBuf>,
    /// Read this data directory offline [default: storage.data_dir]. A broker must not be
    /// running on it; use --admin for a running one.
    #[arg(long, value_name = "DIR", global = true, conflicts_with = "admin")]
    pub(super) data: Option<PathBuf>,
    /// Ask a running broker's admin API at URL, http:// or https:// [default:
    /// http://<server.admin_listen>, https:// when the config sets tls.admin, and then its
    /// tls.cert_file is trusted]: `--admin URL`, `--admin=URL`, or a bare `--admin` (also
    /// right before the subcommand: `inspect --admin stats`).
    #[arg(long, value_name = "URL", global = true, num_args = 0..=1, default_missing_value = "")]
    pub(super) admin: Option<String>,
    /// Bearer token for the admin API [default: admin.token from the config].
    #[arg(
        long,
        value_name = "TOKEN",
        global = true,
        env = "OUTBOXD_ADMIN__TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// For an https:// admin API: trust the certificates in this PEM file (a private CA, or
    /// the broker's self-signed certificate) instead of the public certificate authorities.
    /// May be given more than once
    #[arg(long = "ca", value_name = "FILE", global = true)]
    ca: Vec<PathBuf>,
}

/// Where the views come from.
pub(super) enum Source {
    Offline(Inspector),
    Online(Admin),
}

impl Source {
    pub(super) fn open(args: &SourceArgs) -> Result<Source, ToolError> {
        let cfg = Config::for_command(args.config.as_deref())?;
        if let Some(url) = &args.admin {
            let mut ca = args.ca.clone();
            let base = if !url.is_empty() {
                url.trim_end_matches('/').to_string()
            } else if cfg.tls.admin && cfg.tls.enabled() {
                // The broker's own certificate, as `pub` and `sub` trust it for wss://.
                ca.push(cfg.tls.cert_file.clone());
                format!("https://{}", cfg.server.admin_listen)
            } else {
                format!("http://{}", cfg.server.admin_listen)
            };
            let token = args.token.clone().or_else(|| admin_token(&cfg));
            return Ok(Source::Online(Admin::new(base, token, &ca)?));
        }
        if args.data.is_none() && cfg.storage.backend == Backend::Postgres {
            let opts = crate::store::StoreOptions::from_config(&cfg);
            return Ok(Source::Offline(Inspector::open_postgres(&opts)?));
        }
        let dir = args
            .data
            .clone()
            .unwrap_or_else(|| cfg.storage.data_dir.clone());
        Ok(Source::Offline(Inspector::open_offline(&dir)?))
    }

    pub(super) fn clients(&self, sort: SortBy, limit: usize) -> Result<Vec<ClientView>, ToolError> {
        let mut clients = match self {
            Source::Offline(i) => i
                .clients()?
                .into_iter()
                .map(ClientView::from)
                .collect::<Vec<_>>(),
            Source::Online(a) => {
                a.get(&format!("/v1/clients?sort={}&limit={limit}", sort.as_str()))?
            }
        };
        sort.sort(&mut clients);
        if limit > 0 {
            clients.truncate(limit);
        }
        Ok(clients)
    }

    pub(super) fn outbox(
        &self,
        client: &str,
        from: u64,
        limit: usize,
    ) -> Result<OutboxPage, ToolError> {
        let limit = if limit == 0 { usize::MAX } else { limit };
        match self {
            Source::Offline(i) => i
                .outbox(client, from, limit)?
                .map(OutboxPage::from)
                .ok_or_else(|| ToolError::NoSuchClient(client.to_string())),
            Source::Online(a) => {
                // Page through the API so a large dump does not need one huge response.
                let mut page: Option<OutboxPage> = None;
                let mut next = Some(from);
                while let Some(from) = next {
                    let have = page.as_ref().map_or(0, |p| p.messages.len());
                    let want = (limit - have).min(1000);
                    let path = format!(
                        "/v1/clients/{}/outbox?from={from}&limit={want}",
                        encode_path(client)
                    );
                    let got: OutboxPage = a.get_client(&path, client)?;
                    next = got.next_from;
                    match &mut page {
                        None => page = Some(got),
                        Some(p) => p.messages.extend(got.messages),
                    }
                    if page.as_ref().map_or(0, |p| p.messages.len()) >= limit {
                        break;
                    }
                }
                let mut page = page.ok_or_else(|| ToolError::NoSuchClient(client.to_string()))?;
                page.next_from = next;
                Ok(page)
            }
        }
    }

    pub(super) fn topics(&self) -> Result<Vec<TopicView>, ToolError> {
        match self {
            Source::Offline(i) => Ok(i.topics()?.into_iter().map(TopicView::from).collect()),
            Source::Online(a) => a.get("/v1/topics"),
        }
    }

    pub(super) fn stats(&self) -> Result<StatsView, ToolError> {
        match self {
            Source::Offline(i) => Ok(i.stats()?.into()),
            Source::Online(a) => a.get("/v1/stats"),
        }
    }
}

fn admin_token(cfg: &Config) -> Option<String> {
    let t = cfg.admin.token.trim();
    (!t.is_empty()).then(|| t.to_string())
}
