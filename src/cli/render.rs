//! How the commands on the stored state print: human tables (the last column cut to the
//! terminal width), ages and sizes in human units, and JSON. Kept apart from fetching, so a view
//! prints the same whichever source it came from.

use std::io::{IsTerminal as _, Write};

use crate::views::{ClientView, OutboxPage, StatsView, TopicView};

pub(super) fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// The width to cut lines at: the terminal's, or $COLUMNS, or no cut when piped.
pub(super) fn width() -> Option<usize> {
    if let Some(c) = std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()) {
        return Some(c);
    }
    if std::io::stdout().is_terminal() {
        return terminal_size::terminal_size().map(|(w, _)| usize::from(w.0));
    }
    None
}

/// "3d4h", "12m5s", "800ms": how long ago `then` (Unix ms) was.
pub fn age(now: u64, then: u64) -> String {
    let ms = now.saturating_sub(then);
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Cuts `s` to at most `max` characters, marking the cut with an ellipsis.
pub fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Prints rows as left-aligned columns; the last column is cut so lines fit `width`.
fn table(
    out: &mut impl Write,
    header: &[&str],
    rows: &[Vec<String>],
    width: Option<usize>,
) -> std::io::Result<()> {
    let n = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, cell) in r.iter().enumerate().take(n.saturating_sub(1)) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let lead: usize = widths.iter().take(n.saturating_sub(1)).map(|w| w + 2).sum();
    let last_room = width.map(|w| w.saturating_sub(lead).max(8));
    let line = |cells: &[String]| -> String {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == n {
                match last_room {
                    Some(room) => s.push_str(&cut(cell, room)),
                    None => s.push_str(cell),
                }
            } else {
                s.push_str(cell);
                let pad = widths[i].saturating_sub(cell.chars().count()) + 2;
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.trim_end().to_string()
    };
    let head: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    writeln!(out, "{}", line(&head))?;
    for r in rows {
        writeln!(out, "{}", line(r))?;
    }
    Ok(())
}

pub(super) fn print_clients(
    out: &mut impl Write,
    clients: &[ClientView],
    now: u64,
) -> std::io::Result<()> {
    if clients.is_empty() {
        return writeln!(out, "no clients");
    }
    let rows: Vec<Vec<String>> = clients
        .iter()
        .map(|c| {
            vec![
                c.client_id.clone(),
                c.epoch.clone(),
                c.pending.to_string(),
                human_bytes(c.bytes),
                c.next_seq.to_string(),
                c.acked.to_string(),
                c.oldest_unacked_ts.map_or("-".into(), |t| age(now, t)),
                c.last_seen
                    .map_or("never".into(), |t| format!("{} ago", age(now, t))),
                match c.connected {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "-".into(),
                },
                if c.subscriptions.is_empty() {
                    "-".into()
                } else {
                    c.subscriptions.join(",")
                },
            ]
        })
        .collect();
    table(
        out,
        &[
            "CLIENT",
            "EPOCH",
            "PENDING",
            "BYTES",
            "NEXT_SEQ",
            "ACKED",
            "OLDEST",
            "LAST_SEEN",
            "CONNECTED",
            "TOPICS",
        ],
        &rows,
        width(),
    )
}

pub(super) fn print_outbox(
    out: &mut impl Write,
    page: &OutboxPage,
    now: u64,
    width: Option<usize>,
) -> std::io::Result<()> {
    writeln!(
        out,
        "outbox of {} (epoch {}): {} message(s) shown",
        page.client_id,
        page.epoch,
        page.messages.len()
    )?;
    if !page.messages.is_empty() {
        let rows: Vec<Vec<String>> = page
            .messages
            .iter()
            .map(|m| {
                let preview = match (&m.payload, &m.payload_b64, &m.payload_text) {
                    (Some(p), _, _) => p.as_str().to_string(),
                    (None, Some(b), _) => format!("base64:{b}"),
                    (None, None, Some(t)) => format!("text:{}", t.replace(['\n', '\r', '\t'], " ")),
                    (None, None, None) => String::new(),
                };
                vec![
                    m.seq.to_string(),
                    m.id.clone(),
                    age(now, m.ts),
                    m.from.clone().unwrap_or_else(|| "-".into()),
                    m.topic.clone().unwrap_or_else(|| "-".into()),
                    m.size.to_string(),
                    m.deliveries.map_or("-".into(), |d| d.to_string()),
                    preview,
                ]
            })
            .collect();
        table(
            out,
            &[
                "SEQ", "ID", "AGE", "FROM", "TOPIC", "SIZE", "SENT", "PAYLOAD",
            ],
            &rows,
            width,
        )?;
    }
    if let Some(next) = page.next_from {
        writeln!(
            out,
            "more from seq {next} (use --from {next}, or --limit 0 for all)"
        )?;
    }
    Ok(())
}

pub(super) fn print_topics(out: &mut impl Write, topics: &[TopicView]) -> std::io::Result<()> {
    if topics.is_empty() {
        return writeln!(out, "no topics with subscribers");
    }
    let rows: Vec<Vec<String>> = topics
        .iter()
        .map(|t| {
            vec![
                t.topic.clone(),
                t.subscribers.len().to_string(),
                t.subscribers.join(","),
            ]
        })
        .collect();
    table(out, &["TOPIC", "COUNT", "SUBSCRIBERS"], &rows, width())
}

pub(super) fn print_stats(out: &mut impl Write, s: &StatsView, now: u64) -> std::io::Result<()> {
    let lines = [
        ("data dir", s.data_dir.clone()),
        ("format version", s.format_version.to_string()),
        ("clients", s.clients.to_string()),
        ("topics", s.topics.to_string()),
        ("subscriptions", s.subscriptions.to_string()),
        ("pending messages", s.pending_messages.to_string()),
        ("pending bytes", human_bytes(s.pending_bytes)),
        (
            "max pending (one client)",
            format!(
                "{} messages, {}",
                s.max_pending_messages,
                human_bytes(s.max_pending_bytes)
            ),
        ),
        (
            "oldest message",
            s.oldest_message_ts
                .map_or("-".into(), |t| format!("{} ago", age(now, t))),
        ),
        ("live data", human_bytes(s.live_bytes)),
        ("on disk", human_bytes(s.disk_bytes)),
    ];
    for (k, v) in lines {
        writeln!(out, "{:<26}{v}", format!("{k}:"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_cuts_only_the_last_column_to_the_width() {
        let mut out = Vec::new();
        let rows = vec![vec!["1".to_string(), "x".repeat(100)]];
        table(&mut out, &["SEQ", "PAYLOAD"], &rows, Some(20)).unwrap();
        let text = String::from_utf8(out).unwrap();
        for line in text.lines() {
            assert!(line.chars().count() <= 20, "{line:?}");
        }
        assert!(text.contains('…'));
    }

    #[test]
    fn ages_and_sizes_read_like_a_human_wrote_them() {
        assert_eq!(age(10_000, 9_500), "500ms");
        assert_eq!(age(200_000, 0), "3m20s");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
