//! Resuming many keys: K keys miss M messages between them (batch publish, round-robin over
//! the keys); then one connection resumes all K keys in one `resume` frame, and another sends K
//! `subscribe` frames with the same `since` (each way twice, taking turns; the faster run of
//! each is reported). Each is timed from sending to the last missed message of every key, with
//! the server's CPU seconds over that interval. Every message is
//! checked: each key's numbers strictly increasing, exactly its missed ones; the `resume` also
//! in global order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::{head, run_id};
use crate::Target;
use crate::http::HttpConn;
use crate::stats::{CpuMeter, server_cpu_seconds, thread_cpu_seconds};
use crate::ws;

/// Resume parameters.
#[derive(Debug, Clone)]
pub struct ResumeArgs {
    /// Keys resumed.
    pub keys: usize,
    /// Messages published (over all keys) while nobody follows them.
    pub messages: usize,
    /// Pause between publishing and resuming (the WAL checkpoint of the burst is not counted).
    pub settle: Duration,
    /// Longest each way of resuming may take.
    pub deadline: Duration,
}

/// Publish `n` messages round-robin over `bench:{prefix}-{i}` (i < keys), 1,000 per batch.
async fn publish_round_robin(
    http: &mut HttpConn,
    auth: &str,
    prefix: &str,
    keys: usize,
    n: usize,
) -> anyhow::Result<()> {
    let mut i = 0;
    while i < n {
        let b = (n - i).min(1000);
        let messages: Vec<Value> = (i..i + b)
            .map(|j| json!({"channel": "bench", "request_id": format!("{prefix}-{}", j % keys), "data": {"n": j}}))
            .collect();
        let body = json!({ "messages": messages }).to_string();
        let r = http
            .post_json("/api/publish/batch", auth, body.as_bytes())
            .await?;
        anyhow::ensure!(
            r.status == 200,
            "batch publish answered {}: {}",
            r.status,
            r.text()
        );
        i += b;
    }
    Ok(())
}

/// One way of resuming, measured.
struct Measured {
    seconds: f64,
    server_cpu_s: Option<f64>,
    received: usize,
    problems: Vec<String>,
}

/// Send `frames` (one write), then read until every key has `per_key[key]` messages.
async fn measure(
    target: &Target,
    frames: Vec<String>,
    per_key: &HashMap<String, usize>,
    global_order: bool,
    deadline: Duration,
) -> anyhow::Result<Measured> {
    let (mut c, _) = ws::open_with(target, 0, 1 << 20, None).await?;
    let total: usize = per_key.values().sum();
    let mut got: HashMap<String, (usize, u64)> = HashMap::new();
    let mut problems = Vec::new();
    let mut last_seq = 0u64;
    let mut received = 0usize;
    let threads_before = target.server_pid.and_then(thread_cpu_seconds);
    let cpu = CpuMeter::start(target.server_pid);
    let started = Instant::now();
    let until = tokio::time::Instant::from(started + deadline);
    for f in frames {
        c.feed(Message::text(f)).await?;
    }
    c.flush().await?;
    while received < total {
        let msg = match tokio::time::timeout_at(until, c.next()).await {
            Err(_) => {
                problems.push(format!(
                    "{received} of {total} messages within {deadline:?}"
                ));
                break;
            }
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(Message::Close(f)))) => {
                problems.push(format!("closed after {received} of {total}: {f:?}"));
                break;
            }
            Ok(Some(Ok(_))) => continue,
            Ok(other) => {
                problems.push(format!(
                    "connection ended after {received} of {total}: {other:?}"
                ));
                break;
            }
        };
        let Ok(seqcast_protocol::ServerFrame::Message(m)) =
            seqcast_protocol::decode_server_frame(msg.as_str())
        else {
            if msg.as_str().contains(r#""type":"error""#) {
                problems.push(format!("error frame: {}", msg.as_str()));
            }
            continue;
        };
        received += 1;
        if global_order && m.sequence_number <= last_seq {
            problems.push(format!(
                "{} after {last_seq}: not in global order",
                m.sequence_number
            ));
        }
        last_seq = last_seq.max(m.sequence_number);
        let entry = got.entry(m.request_id.as_str().to_owned()).or_default();
        if m.sequence_number <= entry.1 {
            problems.push(format!(
                "{}: {} after {}",
                m.request_id.as_str(),
                m.sequence_number,
                entry.1
            ));
        }
        *entry = (entry.0 + 1, m.sequence_number);
    }
    let seconds = started.elapsed().as_secs_f64();
    let threads_after = target.server_pid.and_then(thread_cpu_seconds);
    let cpu_use = cpu.stop();
    for (k, want) in per_key {
        let have = got.get(k).map_or(0, |e| e.0);
        if have != *want {
            problems.push(format!("{k}: {have} messages, expected {want}"));
        }
    }
    problems.truncate(20);
    let (server_cpu_s, _) = server_cpu_seconds(threads_before, threads_after, &cpu_use);
    let _ = c.close(None).await;
    Ok(Measured {
        seconds,
        server_cpu_s,
        received,
        problems,
    })
}

/// Run the scenario.
pub async fn run(target: &Target, args: &ResumeArgs) -> anyhow::Result<Value> {
    let prefix = format!("resume-{}", run_id());
    let mut http = HttpConn::connect(target.addr).await?;
    let auth = format!("ApiKey {}", target.api_key);
    let since = head(&mut http).await?;
    let published_at = Instant::now();
    publish_round_robin(&mut http, &auth, &prefix, args.keys, args.messages).await?;
    let publish_s = published_at.elapsed().as_secs_f64();
    tokio::time::sleep(args.settle).await;
    let (_, hello) = ws::open_with(target, 0, 4096, None).await?;

    let per_key: HashMap<String, usize> = (0..args.keys)
        .map(|k| {
            let n = (args.messages + args.keys - 1 - k) / args.keys;
            (format!("{prefix}-{k}"), n)
        })
        .collect();
    let entries: Vec<Value> = (0..args.keys)
        .map(|k| json!({"channel": "bench", "request_id": format!("{prefix}-{k}"), "since": since}))
        .collect();
    let resume_frame = json!({"type": "resume", "epoch": hello.epoch, "subscriptions": entries});
    let subscribes: Vec<String> = (0..args.keys)
        .map(|k| {
            ws::subscribe_frame(
                "bench",
                &format!("{prefix}-{k}"),
                Some(since),
                Some(&hello.epoch),
            )
        })
        .collect();
    // Each way twice, taking turns (the first read of the burst pays for a cold page cache);
    // the faster of each is reported.
    let mut resumes = Vec::new();
    let mut separates = Vec::new();
    for _ in 0..2 {
        let frames = vec![resume_frame.to_string()];
        resumes.push(measure(target, frames, &per_key, true, args.deadline).await?);
        let frames = subscribes.clone();
        separates.push(measure(target, frames, &per_key, false, args.deadline).await?);
    }
    let fastest = |runs: Vec<Measured>| {
        runs.into_iter()
            .min_by(|a, b| a.seconds.total_cmp(&b.seconds))
            .expect("two runs")
    };
    let problems_of = |runs: &[Measured], name: &str| -> Vec<String> {
        runs.iter()
            .flat_map(|r| r.problems.iter().map(move |p| format!("{name}: {p}")))
            .collect()
    };
    let mut problems = problems_of(&resumes, "resume");
    problems.extend(problems_of(&separates, "subscribes"));
    let (resume, separate) = (fastest(resumes), fastest(separates));
    let mut problems: Vec<String> = resume
        .problems
        .iter()
        .map(|p| format!("resume: {p}"))
        .collect();
    problems.extend(separate.problems.iter().map(|p| format!("subscribes: {p}")));
    Ok(json!({
        "scenario": "resume",
        "keys": args.keys,
        "messages": args.messages,
        "publish_s": publish_s,
        "resume_s": resume.seconds,
        "resume_server_cpu_s": resume.server_cpu_s,
        "resume_received": resume.received,
        "subscribes_s": separate.seconds,
        "subscribes_server_cpu_s": separate.server_cpu_s,
        "subscribes_received": separate.received,
        "speedup": separate.seconds / resume.seconds.max(1e-9),
        "cpu_ratio": match (resume.server_cpu_s, separate.server_cpu_s) {
            (Some(r), Some(s)) if r > 0.0 => Some(s / r),
            _ => None,
        },
        "problems": problems,
    }))
}
