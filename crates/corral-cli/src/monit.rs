//! `corral monit`: a live terminal view of one cluster, refreshed every
//! second: a row per worker with a req/s sparkline, and the log tail.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral::control::{Client, Request, Response};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Sparkline};
use ratatui::Frame;
use serde_json::Value;

use crate::failure::Failure;
use crate::format::{bytes, fixed, text, uptime};
use crate::status::{fetch, workers};
use crate::target::Target;

const REFRESH: Duration = Duration::from_secs(1);
/// Samples of req/s kept per slot (more than any terminal is wide).
const HISTORY: usize = 300;
const LOG_LINES: usize = 500;

pub(crate) fn monit(target: &Target) -> Result<(), Failure> {
    let path = target.resolve()?;
    // Fail before taking over the terminal when there is nothing to show.
    let first = fetch(target.connect()?)?;
    let logs = Arc::new(Mutex::new(VecDeque::new()));
    follow_logs(path.clone(), logs.clone());

    let mut terminal = ratatui::try_init()
        .map_err(|err| Failure::Failed(format!("cannot use this terminal: {err}")))?;
    let mut view = View {
        status: Ok(first),
        rates: BTreeMap::new(),
        logs,
    };
    view.sample();
    let outcome = (|| -> std::io::Result<()> {
        let mut next = Instant::now() + REFRESH;
        loop {
            terminal.draw(|frame| view.draw(frame))?;
            while let Some(wait) = next.checked_duration_since(Instant::now()) {
                if !event::poll(wait)? {
                    break;
                }
                if let Event::Key(key) = event::read()? {
                    let quit = key.kind == KeyEventKind::Press
                        && (matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
                            || (key.code == KeyCode::Char('c')
                                && key.modifiers.contains(KeyModifiers::CONTROL)));
                    if quit {
                        return Ok(());
                    }
                }
            }
            next = Instant::now() + REFRESH;
            view.status = refresh(&path);
            view.sample();
        }
    })();
    ratatui::restore();
    outcome.map_err(|err| Failure::Failed(format!("monit: {err}")))
}

fn refresh(path: &Path) -> Result<Value, String> {
    let client = Client::connect(path).map_err(|err| err.to_string())?;
    fetch(client).map_err(|failure| failure.to_string())
}

/// Keeps the newest log lines in `logs`, from a followed `logs` request.
fn follow_logs(path: PathBuf, logs: Arc<Mutex<VecDeque<String>>>) {
    let push = move |line: String| {
        let mut logs = logs.lock().unwrap_or_else(|e| e.into_inner());
        if logs.len() == LOG_LINES {
            logs.pop_front();
        }
        logs.push_back(line);
    };
    std::thread::spawn(move || {
        let request = Request::Logs {
            slot: None,
            lines: 100,
            follow: true,
        };
        let answers = Client::connect(&path).and_then(|client| client.request(&request));
        match answers {
            Ok(answers) => {
                for answer in answers {
                    match answer {
                        Ok(Response::Log(line)) => push(line.tagged()),
                        Ok(Response::Skipped { lines }) => {
                            push(format!("[corral] {lines} lines skipped"))
                        }
                        Ok(_) => {}
                        Err(err) => {
                            push(format!("[corral] log stream: {err}"));
                            return;
                        }
                    }
                }
                push("[corral] the log stream ended (the cluster stopped?)".into());
            }
            Err(err) => push(format!("[corral] no log stream: {err}")),
        }
    });
}

struct View {
    status: Result<Value, String>,
    /// req/s samples per slot, oldest first.
    rates: BTreeMap<u64, VecDeque<u64>>,
    logs: Arc<Mutex<VecDeque<String>>>,
}

impl View {
    fn sample(&mut self) {
        let Ok(status) = &self.status else { return };
        for worker in workers(status) {
            let Some(slot) = worker["slot"].as_u64() else {
                continue;
            };
            let rate = worker["requests_per_s"]
                .as_f64()
                .unwrap_or(0.0)
                .max(0.0)
                .round() as u64;
            let samples = self.rates.entry(slot).or_default();
            if samples.len() == HISTORY {
                samples.pop_front();
            }
            samples.push_back(rate);
        }
    }

    fn draw(&self, frame: &mut Frame) {
        let rows = match &self.status {
            Ok(status) => workers(status).len(),
            Err(_) => 0,
        };
        let [title, table, logs] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(rows as u16 + 3),
            Constraint::Min(3),
        ])
        .areas(frame.area());
        let heading = match &self.status {
            Ok(status) => format!(
                " corral monit · {} (pid {}) · {} workers · up {} · q quits",
                text(&status["name"]),
                text(&status["pid"]),
                rows,
                uptime(&status["uptime_s"]),
            ),
            Err(err) => format!(" corral monit · cluster not reachable: {err} · q quits"),
        };
        frame.render_widget(
            Paragraph::new(heading).style(Style::new().add_modifier(Modifier::REVERSED)),
            title,
        );
        self.draw_workers(frame, table);
        self.draw_logs(frame, logs);
    }

    fn draw_workers(&self, frame: &mut Frame, area: Rect) {
        let block = Block::bordered().title(" workers · req/s over time ");
        let inner = block.inner(area);
        frame.render_widget(block, area);
        let Ok(status) = &self.status else { return };
        const COLUMNS: usize = 72;
        let header = format!(
            "{:>4} {:>8} {:<9} {:>6} {:>10} {:>9} {:>9} {:>6}",
            "SLOT", "PID", "STATE", "CPU%", "RSS", "REQ/S", "LOOP P99", "POOL Q"
        );
        let mut lines = Vec::new();
        lines.push(Line::styled(
            header,
            Style::new().add_modifier(Modifier::BOLD),
        ));
        let all = workers(status);
        for worker in &all {
            lines.push(Line::raw(format!(
                "{:>4} {:>8} {:<9} {:>6} {:>10} {:>9} {:>9} {:>6}",
                text(&worker["slot"]),
                text(&worker["pid"]),
                text(&worker["state"]),
                fixed(&worker["cpu_percent"], 1),
                bytes(&worker["rss_bytes"]),
                fixed(&worker["requests_per_s"], 1),
                match fixed(&worker["loop_delay_p99_ms"], 1).as_str() {
                    "-" => "-".to_owned(),
                    ms => format!("{ms}ms"),
                },
                text(&worker["pool_queued"]),
            )));
        }
        let [left, right] =
            Layout::horizontal([Constraint::Length(COLUMNS as u16), Constraint::Min(0)])
                .areas(inner);
        frame.render_widget(Paragraph::new(lines), left);
        for (row, worker) in all.iter().enumerate() {
            let y = right.y + 1 + row as u16;
            if y >= right.bottom() || right.width < 2 {
                break;
            }
            let spark = Rect::new(right.x + 1, y, right.width - 1, 1);
            let samples = worker["slot"]
                .as_u64()
                .and_then(|slot| self.rates.get(&slot))
                .map(|samples| {
                    let skip = samples.len().saturating_sub(spark.width as usize);
                    samples.iter().skip(skip).copied().collect::<Vec<u64>>()
                })
                .unwrap_or_default();
            // One scale for every row, so the rows compare.
            let peak = self
                .rates
                .values()
                .flat_map(|samples| samples.iter().copied())
                .max()
                .unwrap_or(0)
                .max(1);
            frame.render_widget(
                Sparkline::default()
                    .data(&samples)
                    .max(peak)
                    .style(Style::new().fg(Color::Green)),
                spark,
            );
        }
    }

    fn draw_logs(&self, frame: &mut Frame, area: Rect) {
        let block = Block::bordered().title(" logs ");
        let inner = block.inner(area);
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        let skip = logs.len().saturating_sub(inner.height as usize);
        let lines: Vec<Line> = logs
            .iter()
            .skip(skip)
            .map(|l| Line::raw(l.clone()))
            .collect();
        frame.render_widget(Paragraph::new(lines).block(block), area);
    }
}
