//! The operator files in `dist/` against the broker's real `/metrics`: every metric the Grafana
//! dashboard and the Prometheus alert rules name must be one the broker serves, so a renamed
//! or removed metric cannot leave a dashboard panel empty or an alert that never fires.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{Broker, Opts};

/// What one scrape of a fresh broker shows: the metric names (`# TYPE` lines and sample names,
/// so `_bucket`, `_sum` and `_count` of histograms count too) and every `name{label="value"}`
/// pair a sample carries.
struct Served {
    names: BTreeSet<String>,
    labels: BTreeSet<(String, String, String)>,
}

async fn served() -> Served {
    let broker = Broker::start(Opts::new());
    let r = broker.admin_get("/metrics").await;
    assert_eq!(r.status, 200, "GET /metrics: {r:?}");
    let mut names = BTreeSet::new();
    let mut labels = BTreeSet::new();
    for line in r.body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split(' ').next() {
                names.insert(name.to_string());
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        names.insert(name.to_string());
        if let Some(inner) = line[name_end..]
            .strip_prefix('{')
            .and_then(|l| l.split_once('}'))
            .map(|(inner, _)| inner)
        {
            for pair in inner.split(',') {
                if let Some((k, v)) = pair.split_once('=') {
                    labels.insert((name.to_string(), k.to_string(), v.trim_matches('"').into()));
                }
            }
        }
    }
    assert!(
        names.len() > 20,
        "the scrape names too few metrics to check against: {names:?}"
    );
    Served { names, labels }
}

/// Every `outboxd_…` identifier in `text`, in order of first appearance.
fn metric_names(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("outboxd_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            let name = tail[..len].to_string();
            if !out.contains(&name) {
                out.push(name);
            }
        }
        rest = &tail[len..];
    }
    out
}

/// Every exact matcher `name{label="value"}` (not `=~`, `!=`) in `text`.
fn exact_matchers(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for name in metric_names(text) {
        let opening = format!("{name}{{");
        let mut rest = text;
        while let Some(at) = rest.find(&opening) {
            let inner = &rest[at + opening.len()..];
            let Some(end) = inner.find('}') else { break };
            for pair in inner[..end].split(',') {
                let pair = pair.trim();
                if pair.contains("=~") || pair.contains("!=") {
                    continue;
                }
                if let Some((k, v)) = pair.split_once('=') {
                    let v = v.trim().trim_matches('"');
                    // Grafana variables are filled in by the dashboard.
                    if !v.starts_with('$') {
                        out.push((name.clone(), k.trim().to_string(), v.to_string()));
                    }
                }
            }
            rest = &inner[end..];
        }
    }
    out
}

fn read(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn assert_served(file: &str, text: &str, served: &Served) {
    let names = metric_names(text);
    assert!(
        names.len() >= 5,
        "{file} names almost no outboxd metric: {names:?}"
    );
    let unknown: Vec<&String> = names
        .iter()
        .filter(|n| !served.names.contains(*n))
        .collect();
    assert!(
        unknown.is_empty(),
        "{file} uses metrics the broker does not serve: {unknown:?}\nserved: {:?}",
        served.names
    );
    for (name, k, v) in exact_matchers(text) {
        assert!(
            served
                .labels
                .contains(&(name.clone(), k.clone(), v.clone())),
            "{file} selects {name}{{{k}=\"{v}\"}}, a series the broker does not serve"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_and_the_alert_rules_use_only_metrics_the_broker_serves() {
    let served = served().await;
    let dashboard = read("dist/grafana/outboxd.json");
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(
        parsed["panels"].as_array().is_some_and(|p| !p.is_empty()),
        "the dashboard has no panels"
    );
    assert_served("dist/grafana/outboxd.json", &dashboard, &served);
    assert_served(
        "dist/prometheus/outboxd-rules.yml",
        &read("dist/prometheus/outboxd-rules.yml"),
        &served,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metric_check_refuses_a_name_or_a_label_the_broker_does_not_serve() {
    // Catches a check that passes whatever the files say.
    let served = served().await;
    let ok = r#"outboxd_acked_total outboxd_connections outboxd_sessions outboxd_outboxes rate(outboxd_refused_total{code="outbox_full"}[5m])"#;
    assert_served("ok", ok, &served);
    let wrong_name = std::panic::catch_unwind(|| {
        assert_served(
            "x",
            "outboxd_acked_total outboxd_connections outboxd_sessions outboxd_outboxes outboxd_no_such_metric",
            &served,
        )
    });
    assert!(wrong_name.is_err(), "an unknown metric name passed");
    let wrong_label = std::panic::catch_unwind(|| {
        assert_served(
            "x",
            r#"outboxd_acked_total outboxd_connections outboxd_sessions outboxd_outboxes outboxd_refused_total{code="no_such_code"}"#,
            &served,
        )
    });
    assert!(wrong_label.is_err(), "an unknown label value passed");
}

#[test]
fn metric_names_finds_each_outboxd_identifier_once() {
    assert_eq!(
        metric_names(
            r#"sum(rate(outboxd_a_total{x="1"}[5m])) / outboxd_b + outboxd_a_total myoutboxd_c"#
        ),
        vec!["outboxd_a_total", "outboxd_b"]
    );
    assert_eq!(
        exact_matchers(r#"outboxd_a{code="x", reason=~"y", instance=~"$instance", k="$v"}"#),
        vec![("outboxd_a".into(), "code".into(), "x".into())]
    );
}
