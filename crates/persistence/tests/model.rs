//! Property test: any sequence of appends (with failing batches, upserts, retries, grouped
//! commits, prunes and restarts) numbers events exactly like a naive in-memory model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use seqcast_persistence::{
    CommittedEvent, DbReader, DbWriter, EventFilter, EventReader, EventWriter, PruneReport,
    StoreConfig,
};

const KEYS: [&str; 3] = ["a:1", "a:2", "b:1"];

/// One event of a command: which key, which message id, and its data: `Fresh` (never seen),
/// `Small(n)` (one of a few values, so repeats are retries when the row holds the same) or
/// `Invalid` (not JSON).
type Spec = (usize, usize, Data);

#[derive(Debug, Clone, Copy)]
enum Data {
    Fresh,
    Small(u8),
    Invalid,
}

#[derive(Debug, Clone)]
enum Op {
    /// Commands queued one after another (taken in that order); `gated` holds the writer at
    /// BEGIN until all are queued, so they share a transaction.
    Commands {
        gated: bool,
        commands: Vec<Vec<Spec>>,
    },
    /// Close the writer and open the file again.
    Restart,
    /// `prune(head + 1 - keep, max_events)`.
    Prune { keep: u64, max_events: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let data = prop_oneof![
        5 => Just(Data::Fresh),
        4 => (0..2u8).prop_map(Data::Small),
        1 => Just(Data::Invalid),
    ];
    let spec = (0..KEYS.len(), 0..5usize, data);
    let command = prop::collection::vec(spec, 1..4);
    prop_oneof![
        8 => (any::<bool>(), prop::collection::vec(command, 1..6))
            .prop_map(|(gated, commands)| Op::Commands { gated, commands }),
        1 => Just(Op::Restart),
        1 => (0..12u64, 0..6usize).prop_map(|(keep, max_events)| Op::Prune { keep, max_events }),
    ]
}

/// What a row looks like: (stream_sequence, data, first event, last event).
type Row = (u64, String, u64, u64);

struct Model {
    head: u64,
    floor: u64,
    /// Events numbered up to this one are deleted (pruned).
    deleted_through: u64,
    rows: BTreeMap<(usize, usize), Row>,
    /// Per key, the highest position of a row pruning removed: positions never go back.
    pruned_position: BTreeMap<usize, u64>,
    log: Vec<(u64, u64, usize, usize, String, bool)>,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            head: 0,
            floor: 1,
            deleted_through: 0,
            rows: BTreeMap::new(),
            pruned_position: BTreeMap::new(),
            log: Vec::new(),
        }
    }
}

impl Model {
    /// Applies one all-or-nothing command; `None` when it must be rejected.
    fn apply(&mut self, command: &[(usize, usize, String)]) -> Option<Vec<(u64, u64, bool)>> {
        if command.iter().any(|(_, _, data)| data == "not json") {
            return None;
        }
        let mut out = Vec::new();
        for (k, m, data) in command {
            if let Some(row) = self.rows.get(&(*k, *m))
                && row.1 == *data
            {
                // A retry: the row's last event, nothing new.
                out.push((row.3, row.0, row.2 != row.3));
                continue;
            }
            self.head += 1;
            let seq = self.head;
            let next_position = self
                .rows
                .iter()
                .filter(|((key, _), _)| key == k)
                .map(|(_, row)| row.0)
                .max()
                .unwrap_or(0)
                .max(self.pruned_position.get(k).copied().unwrap_or(0))
                + 1;
            let row = self
                .rows
                .entry((*k, *m))
                .and_modify(|row| {
                    row.1 = data.clone();
                    row.3 = seq;
                })
                .or_insert((next_position, data.clone(), seq, seq));
            let replaced = row.2 != seq;
            out.push((seq, row.0, replaced));
            self.log.push((seq, row.0, *k, *m, data.clone(), replaced));
        }
        Some(out)
    }

    fn prune(&mut self, below: u64, max_events: usize) -> PruneReport {
        self.floor = self.floor.max(below.min(self.head + 1));
        let start = self.deleted_through;
        let end = (start + max_events as u64).min(self.floor - 1).max(start);
        self.deleted_through = end;
        for ((k, _), row) in &self.rows {
            if row.3 <= end {
                let top = self.pruned_position.entry(*k).or_insert(0);
                *top = (*top).max(row.0);
            }
        }
        self.rows.retain(|_, row| row.3 > end);
        PruneReport {
            floor: self.floor,
            deleted: end - start,
            done: end + 1 >= self.floor,
        }
    }
}

fn store_config(dir: &tempfile::TempDir) -> StoreConfig {
    StoreConfig {
        busy_timeout: Duration::from_secs(60),
        ..config(dir)
    }
}

async fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let (mut writer, _, mut hook_log) = open(store_config(&dir));
    let mut hooked: Vec<CommittedEvent> = Vec::new();
    let mut model = Model::default();
    let mut data_counter = 0;

    for op in ops {
        match op {
            Op::Restart => {
                writer.close().await;
                hooked.extend(hook_log.events());
                let (w, info, log) = open(store_config(&dir));
                assert_eq!(info.head, model.head);
                (writer, hook_log) = (w, log);
            }
            Op::Prune { keep, max_events } => {
                let below = (model.head + 1).saturating_sub(keep).max(1);
                let got = writer.prune(below, max_events).await.unwrap();
                assert_eq!(got, model.prune(below, max_events));
            }
            Op::Commands { gated, commands } => {
                let gate = gated.then(|| LockGate::hold(&db_path(&dir)));
                let base = writer.health().stats.commands_received
                    + writer.health().queued_commands.unwrap() as u64;
                let mut tasks = Vec::new();
                let mut inputs = Vec::new();
                for (i, specs) in commands.iter().enumerate() {
                    let input: Vec<(usize, usize, String)> = specs
                        .iter()
                        .map(|&(k, m, data)| {
                            data_counter += 1;
                            let data = match data {
                                Data::Fresh => format!("{{\"v\":{data_counter}}}"),
                                Data::Small(n) => format!("{{\"s\":{n}}}"),
                                Data::Invalid => "not json".to_owned(),
                            };
                            (k, m, data)
                        })
                        .collect();
                    let events = input
                        .iter()
                        .map(|(k, m, data)| event(KEYS[*k], &format!("m{m}"), data))
                        .collect();
                    inputs.push(input);
                    let w: DbWriter = writer.clone();
                    tasks.push(tokio::spawn(async move { w.append(events).await }));
                    // Queue order = command order, whatever the grouping.
                    until_commands_arrived(&writer, base + i as u64 + 1).await;
                }
                if let Some(gate) = gate {
                    gate.release();
                }
                for (task, input) in tasks.into_iter().zip(inputs) {
                    let got = task.await.unwrap();
                    match model.apply(&input) {
                        None => assert!(got.is_err(), "expected rejection, got {got:?}"),
                        Some(expected) => {
                            let got: Vec<(u64, u64, bool)> = got
                                .unwrap()
                                .iter()
                                .map(|e| (e.sequence_number, e.stream_sequence, e.replaced))
                                .collect();
                            assert_eq!(got, expected);
                        }
                    }
                }
            }
        }
    }
    writer.close().await;
    hooked.extend(hook_log.events());

    // The hook saw the model's log, in order; the database holds it.
    let reader = DbReader::open(&db_path(&dir)).unwrap();
    let stored = log_after(&reader, 0, usize::MAX, EventFilter::All, usize::MAX).unwrap();
    let as_tuples = |events: &[CommittedEvent]| -> Vec<(u64, String, String, bool)> {
        events
            .iter()
            .map(|e| {
                (
                    e.sequence_number,
                    e.key.to_string(),
                    e.message_id.to_string(),
                    e.replaced,
                )
            })
            .collect()
    };
    let expected: Vec<(u64, String, String, bool)> = model
        .log
        .iter()
        .map(|(seq, _, k, m, _, replaced)| (*seq, KEYS[*k].to_owned(), format!("m{m}"), *replaced))
        .collect();
    assert_eq!(as_tuples(&hooked), expected);
    // Readers see what is at or above the floor; the file holds what was not deleted yet.
    let visible: Vec<_> = expected
        .iter()
        .filter(|e| e.0 >= model.floor)
        .cloned()
        .collect();
    assert_eq!(as_tuples(&stored), visible);
    let kept: Vec<u64> = rusqlite::Connection::open(db_path(&dir))
        .unwrap()
        .prepare("SELECT sequence_number FROM events ORDER BY sequence_number")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let retained: Vec<u64> = expected
        .iter()
        .map(|e| e.0)
        .filter(|&seq| seq > model.deleted_through)
        .collect();
    assert_eq!(kept, retained);
    assert_eq!(reader.head().unwrap(), model.head);
    assert_eq!(reader.retention_floor().unwrap(), model.floor);
    for (k, name) in KEYS.iter().enumerate() {
        let rows = reader
            .stream_rows(&key(name), 0, usize::MAX, usize::MAX)
            .unwrap();
        let got: Vec<Row> = rows
            .iter()
            .map(|r| (r.stream_sequence, r.data.clone(), 0, r.sequence_number))
            .collect();
        let mut want: Vec<Row> = model
            .rows
            .iter()
            .filter(|((key, _), _)| *key == k)
            .map(|(_, (pos, data, _, last))| (*pos, data.clone(), 0, *last))
            .collect();
        want.sort();
        assert_eq!(got, want, "stream {name}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn the_store_numbers_like_the_model(ops in prop::collection::vec(op(), 1..8)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(ops));
    }
}
