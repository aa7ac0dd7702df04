//! The history of a chaos run, one JSON object a line in `<out>/history.jsonl`: a header (`kind: "run"`), every
//! client operation with its invoke and completion times and what came back, and every fault the harness
//! injected (`kind: "fault"`) with when it started and ended. Times are milliseconds since the run started, from
//! one monotonic clock, so "A completed before B was invoked" in the file is true of the real calls.
//!
//! The checker reads the file back (`parse`) rather than the harness's memory, so what it judges is exactly what
//! was written, and a history can be checked again, or planted by hand in a test.

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What a client operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// `POST /drops/{id}/reservations`.
    Reserve,
    /// `POST /reservations/{id}/payment`.
    Pay,
    /// `DELETE /reservations/{id}`.
    Cancel,
    /// `GET /reservations/{id}`.
    Read,
    /// `GET /drops/{id}`, after the run, on every instance.
    DropRead,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Reserve => "reserve",
            Self::Pay => "pay",
            Self::Cancel => "cancel",
            Self::Read => "read",
            Self::DropRead => "drop_read",
        }
    }
}

/// How an operation ended: an HTTP status, or `"error: ..."` when no answer came (connection refused or broken,
/// timeout). An error is indeterminate: the request may or may not have taken effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Outcome {
    Status(u16),
    Error(String),
}

/// One client operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// Unique within the run, in invocation order.
    pub op: u64,
    pub kind: OpKind,
    /// The buyer task that made it (`None` for the harness's own reads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buyer: Option<u32>,
    /// The member it was made as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// The instance it was sent to.
    pub instance: usize,
    /// The reservation it is about: from the path (pay, cancel, read) or the answer (a granted reserve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<String>,
    pub method: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub invoke_ms: u64,
    pub complete_ms: u64,
    pub status: Outcome,
    /// The answer's JSON body (`null` when none, or not JSON).
    #[serde(default)]
    pub response: Value,
}

impl Op {
    /// The HTTP status, if an answer came.
    pub fn http_status(&self) -> Option<u16> {
        match self.status {
            Outcome::Status(status) => Some(status),
            Outcome::Error(_) => None,
        }
    }

    /// `error.code` of an error body.
    pub fn code(&self) -> Option<&str> {
        self.response.get("error")?.get("code")?.as_str()
    }

    /// A string field of the answer.
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.response.get(key)?.as_str()
    }

    /// What to call the answer in tallies: `201`, `409 sold_out`, `error: timeout`.
    pub fn label(&self) -> String {
        match &self.status {
            Outcome::Status(status) => match self.code() {
                Some(code) => format!("{status} {code}"),
                None => status.to_string(),
            },
            Outcome::Error(text) => {
                // "error: connect: Connection refused (os error 111)" -> "error: connect".
                let mut words = text.splitn(3, ':');
                let head = words.next().unwrap_or_default();
                match words.next() {
                    Some(what) => format!("{head}:{what}"),
                    None => head.to_owned(),
                }
            }
        }
    }
}

/// The marker of a fault line (`"kind": "fault"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultTag {
    #[default]
    Fault,
}

/// The marker of the header line (`"kind": "run"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunTag {
    #[default]
    Run,
}

/// One step of a fault, as the harness carried it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultWhat {
    /// SIGKILL of an instance (ends once the process is gone).
    KillInstance,
    /// An instance started again (ends once it listens).
    RestartInstance,
    /// SIGSTOP of an instance.
    StopInstance,
    /// SIGCONT of a stopped instance.
    ContInstance,
    /// SIGKILL of Redis (ends once the process is gone).
    KillRedis,
    /// Redis started again on its port and folder (ends once it answers PING).
    RestartRedis,
    /// Every proxied Postgres connection closed, new ones refused.
    CutPostgres,
    /// The proxy accepts again.
    RestorePostgres,
    /// An instance restarted with a payment latency past the lease (ends once it listens).
    SlowGatewayOn,
    /// The same instance restarted with no payment latency.
    SlowGatewayOff,
}

impl FaultWhat {
    pub fn name(self) -> &'static str {
        match self {
            Self::KillInstance => "kill_instance",
            Self::RestartInstance => "restart_instance",
            Self::StopInstance => "stop_instance",
            Self::ContInstance => "cont_instance",
            Self::KillRedis => "kill_redis",
            Self::RestartRedis => "restart_redis",
            Self::CutPostgres => "cut_postgres",
            Self::RestorePostgres => "restore_postgres",
            Self::SlowGatewayOn => "slow_gateway_on",
            Self::SlowGatewayOff => "slow_gateway_off",
        }
    }
}

/// A fault step in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultEvent {
    pub kind: FaultTag,
    pub what: FaultWhat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<usize>,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Whether the step did what it says (a restart that never came up is `false`).
    pub ok: bool,
    /// The port an instance came up on, the latency it runs with, why a step failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// The header: what was run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    pub kind: RunTag,
    pub seed: u64,
    /// Wall-clock time of `0 ms` (RFC 3339), to place the server's `expires_at` on the history's clock.
    pub started_at: String,
    pub drop_id: String,
    pub stock: i64,
    pub per_member_limit: i64,
    pub hold_seconds: u64,
    pub pay_lease_seconds: u64,
    pub instances: usize,
    pub seconds: u64,
}

/// One line of the history. The fault and header lines are told apart by their `kind` marker; anything else is
/// an operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Entry {
    Fault(FaultEvent),
    Run(RunInfo),
    Op(Op),
}

/// A parsed history, split by kind, in file order.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub run: Option<RunInfo>,
    pub ops: Vec<Op>,
    pub faults: Vec<FaultEvent>,
}

impl History {
    pub fn from_entries(entries: impl IntoIterator<Item = Entry>) -> Self {
        let mut history = Self::default();
        for entry in entries {
            match entry {
                Entry::Run(run) => history.run = Some(run),
                Entry::Op(op) => history.ops.push(op),
                Entry::Fault(fault) => history.faults.push(fault),
            }
        }
        history
    }
}

/// Parses a history file's text, one entry a line (blank lines skipped).
pub fn parse(text: &str) -> anyhow::Result<History> {
    let entries = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str::<Entry>(line)
                .with_context(|| format!("history line {}: not an entry", n + 1))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(History::from_entries(entries))
}

/// Lines waiting for the writer thread, at most; a full queue makes buyers wait (they are the only producers that
/// could outrun a disk).
const QUEUE_MAX: usize = 4096;

/// Where everything that happens is recorded: the run's clock, op ids, and a bounded queue to a thread that
/// appends JSON lines to the history file.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    next_op: AtomicU64,
    tx: mpsc::Sender<Line>,
}

/// What goes to the writer thread.
#[derive(Debug)]
enum Line {
    Entry(Box<Entry>),
    /// The last line: the writer flushes and ends, whoever still holds the recorder.
    Close,
}

/// The writer thread; `finish` waits for it to write the last line.
#[derive(Debug)]
pub struct WriterHandle {
    thread: std::thread::JoinHandle<std::io::Result<u64>>,
}

impl Recorder {
    /// Creates the history file and starts its writer thread; the run's clock starts now.
    pub fn create(path: &Path) -> anyhow::Result<(Self, WriterHandle)> {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let (tx, mut rx) = mpsc::channel::<Line>(QUEUE_MAX);
        let thread = std::thread::Builder::new()
            .name("chaos-history".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(file);
                let mut lines = 0u64;
                while let Some(Line::Entry(entry)) = rx.blocking_recv() {
                    serde_json::to_writer(&mut out, &entry)?;
                    out.write_all(b"\n")?;
                    lines += 1;
                }
                out.flush()?;
                Ok(lines)
            })
            .context("starting the history writer")?;
        let recorder = Self {
            start: Instant::now(),
            next_op: AtomicU64::new(1),
            tx,
        };
        Ok((recorder, WriterHandle { thread }))
    }

    /// Milliseconds since the run started.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The instant `ms` after the start.
    pub fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    pub fn next_op_id(&self) -> u64 {
        self.next_op.fetch_add(1, Ordering::Relaxed)
    }

    /// Appends an entry. After `close` the entry is dropped.
    pub async fn record(&self, entry: Entry) {
        let _ = self.tx.send(Line::Entry(Box::new(entry))).await;
    }

    /// Ends the history: what was recorded before is written, anything recorded after is dropped.
    pub async fn close(&self) {
        let _ = self.tx.send(Line::Close).await;
    }
}

impl WriterHandle {
    /// Waits for the writer to write everything up to `Recorder::close`; the number of lines written.
    pub async fn finish(self) -> anyhow::Result<u64> {
        tokio::task::spawn_blocking(move || self.thread.join())
            .await
            .context("waiting for the history writer")?
            .map_err(|_| anyhow::anyhow!("the history writer panicked"))?
            .context("writing the history")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entries_round_trip_and_are_told_apart_by_kind() {
        let op = Op {
            op: 7,
            kind: OpKind::Pay,
            buyer: Some(1),
            member: Some("m".into()),
            instance: 2,
            reservation: Some("r".into()),
            method: "POST".into(),
            path: "/api/v1/reservations/r/payment".into(),
            body: Some(json!({"payment_token": "tok_ok"})),
            idempotency_key: Some("k".into()),
            invoke_ms: 10,
            complete_ms: 12,
            status: Outcome::Error("error: timeout: no answer within 10000 ms".into()),
            response: Value::Null,
        };
        let fault = FaultEvent {
            kind: FaultTag::Fault,
            what: FaultWhat::KillRedis,
            instance: None,
            start_ms: 1,
            end_ms: 2,
            ok: true,
            detail: String::new(),
        };
        let lines = [Entry::Op(op.clone()), Entry::Fault(fault.clone())]
            .iter()
            .map(|e| serde_json::to_string(e).unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(lines.contains(r#""status":"error: timeout: no answer within 10000 ms""#));
        assert!(lines.contains(r#""kind":"fault","what":"kill_redis""#));
        let history = parse(&lines).unwrap();
        assert_eq!(history.ops, std::slice::from_ref(&op));
        assert_eq!(history.faults, [fault]);
        assert_eq!(op.label(), "error: timeout");
        let answered = Op {
            status: Outcome::Status(409),
            response: json!({"error": {"code": "sold_out", "message": "x"}}),
            ..op
        };
        assert_eq!(answered.label(), "409 sold_out");
        assert!(parse(r#"{"kind":"nonsense"}"#).is_err());
    }
}
