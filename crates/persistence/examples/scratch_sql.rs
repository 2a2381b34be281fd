#![allow(clippy::unwrap_used)]
use seqcast_persistence::{DbWriter, NewEvent, StoreConfig, Synchronous};
use seqcast_protocol::{MessageId, SubscriptionKey};
fn main() {
    let batches: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(10);
    let dir = tempfile::tempdir().unwrap();
    let (writer, _) = DbWriter::open(
        StoreConfig {
            synchronous: Synchronous::Normal,
            ..StoreConfig::new(dir.path().join("b.db"))
        },
        Box::new(|_| {}),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let keys: Vec<SubscriptionKey> = (0..16)
        .map(|i| SubscriptionKey::parse(&format!("bench:stream-{i}")).unwrap())
        .collect();
    let data = r#"{"type":"token","text":"The quick brown fox jumps over the lazy dog","index":12345,"done":false}"#;
    let mut n = 0;
    let t = std::time::Instant::now();
    if std::env::var("PUBS").is_ok() {
        let pubs: usize = std::env::var("PUBS").unwrap().parse().unwrap();
        let writer2 = writer.clone();
        rt.block_on(async move {
            let tasks: Vec<_> = (0..pubs)
                .map(|p| {
                    let w = writer2.clone();
                    let keys = keys.clone();
                    tokio::spawn(async move {
                        for i in 0..batches * 1000 / pubs {
                            w.append(vec![NewEvent {
                                key: keys[(p + i) % 16].clone(),
                                message_id: MessageId::new(format!("p{p}-{i}")).unwrap(),
                                data: data.to_owned(),
                            }])
                            .await
                            .unwrap();
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        println!(
            "{} events/s, stats {:?}",
            (batches * 1000) as f64 / t.elapsed().as_secs_f64(),
            writer.stats()
        );
        rt.block_on(writer.close());
        return;
    }
    for _ in 0..batches {
        let events = (0..1000)
            .map(|_| {
                n += 1;
                NewEvent {
                    key: keys[n % 16].clone(),
                    message_id: MessageId::new(format!("m{n}")).unwrap(),
                    data: data.to_owned(),
                }
            })
            .collect();
        rt.block_on(writer.append(events)).unwrap();
    }
    println!("{} events/s", n as f64 / t.elapsed().as_secs_f64());
    rt.block_on(writer.close());
}
