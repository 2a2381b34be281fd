//! The server started inside the test process: its HTTP service called directly where a socket
//! is not the point ([`seqcast_server::lifetime::open`] and [`seqcast_server::routes::service`]),
//! and [`seqcast_server::run`] on a listener the test bound where it is (a real WebSocket
//! client, a graceful shutdown).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use futures_util::{SinkExt as _, StreamExt as _};
use seqcast_server::config::{AuthMode, ServeArgs, Settings, StorageKind};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

const SECRET: &str = "in-process-test-secret-of-enough-length";
const API_KEY: &str = "in-process-test-api-key";
/// Long enough for a loaded 2-core machine, short enough that a hang fails the test.
const PROMPT: Duration = Duration::from_secs(20);

fn settings(data_dir: &std::path::Path, storage: StorageKind) -> Settings {
    Settings::resolve(&ServeArgs {
        listen: Some("127.0.0.1:0".into()),
        data_dir: Some(data_dir.to_owned()),
        storage: Some(storage),
        jwt_secret: Some(SECRET.into()),
        api_key: Some(vec![API_KEY.into()]),
        ..ServeArgs::default()
    })
    .unwrap()
}

async fn body_json(r: axum::response::Response) -> Value {
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

/// No socket: the HTTP service (routes and every layer) called with `oneshot`, on memory
/// storage. A publish is answered with its sequence number and is then read back over HTTP.
#[tokio::test]
async fn the_http_service_answers_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let (state, api_key) = seqcast_server::lifetime::open(
        settings(dir.path(), StorageKind::Memory),
        AuthMode::Configured,
        CancellationToken::new(),
    )
    .unwrap();
    assert_eq!(api_key, API_KEY);
    let service = seqcast_server::routes::service(Arc::clone(&state));

    let r = service
        .clone()
        .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers().contains_key("x-request-id"),
        "the request-id layer is in the stack"
    );

    let publish = Request::post("/api/publish")
        .header(header::AUTHORIZATION, format!("ApiKey {API_KEY}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"channel": "search", "request_id": "r1", "data": {"hello": "world"}})
                .to_string(),
        ))
        .unwrap();
    let r = service.clone().oneshot(publish).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let published = body_json(r).await;
    assert_eq!(published["sequence_number"], 1, "{published}");

    let reader = state.auth.mint("reader", None, 60, false).unwrap();
    let recover = Request::get("/websocket/messages?since=0")
        .header(header::AUTHORIZATION, format!("Bearer {reader}"))
        .body(Body::empty())
        .unwrap();
    let r = service.clone().oneshot(recover).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let page = body_json(r).await;
    let messages = page["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 1, "{page}");
    assert_eq!(messages[0]["sequence_number"], 1);
    assert_eq!(messages[0]["data"], json!({"hello": "world"}));
    assert_eq!(page["complete"], true, "{page}");

    let r = service
        .oneshot(Request::get("/no/such/path").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(body_json(r).await["error"]["code"], "not_found");
    state.store.close().await;
}

async fn next_frame(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Message {
    loop {
        let m = tokio::time::timeout(PROMPT, ws.next())
            .await
            .expect("no frame in time")
            .expect("the stream ended without a close frame")
            .expect("a WebSocket error");
        if !matches!(m, Message::Ping(_) | Message::Pong(_)) {
            return m;
        }
    }
}

fn frame_json(m: &Message) -> Value {
    match m {
        Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// The log lines of the whole process (the database writer logs from its own thread), from
/// here on. Each test is its own process under nextest; under `cargo test` only this one sets it.
fn capture_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    #[derive(Clone)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = Captured(Arc::default());
    let writer = logs.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    )
    .unwrap();
    logs.0
}

/// `run` on a listener the test bound, with SQLite: a real WebSocket client subscribes and
/// gets a message; completing the `shutdown` future closes its socket with 1001, makes `run`
/// return, refuses new connections, and closes the store before it stops (the data directory's
/// lock free, the message in the database).
#[tokio::test]
async fn run_serves_a_bound_listener_until_shutdown_completes() {
    let logs = capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path(), StorageKind::Sqlite);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(seqcast_server::run(
        listener,
        settings.clone(),
        async move {
            let _ = stopped.await;
        },
    ));

    let http = reqwest::Client::new();
    let r = http
        .post(format!("http://{addr}/api/publish"))
        .header("Authorization", format!("ApiKey {API_KEY}"))
        .json(&json!({"channel": "search", "request_id": "r1", "data": {"n": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    let token = seqcast_server::auth::Authority::new(SECRET, "")
        .mint("reader", None, 60, false)
        .unwrap();
    ws.send(Message::Text(
        json!({"type": "hello", "token": token}).to_string().into(),
    ))
    .await
    .unwrap();
    assert_eq!(frame_json(&next_frame(&mut ws).await)["type"], "connected");
    ws.send(Message::Text(
        json!({"type": "subscribe", "channel": "search", "request_id": "r1", "since": 0})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let mut got = None;
    while got.is_none() {
        let frame = frame_json(&next_frame(&mut ws).await);
        if frame["type"] == "message" {
            got = Some(frame);
        }
    }
    assert_eq!(got.unwrap()["data"], json!({"n": 1}));

    stop.send(()).unwrap();
    match next_frame(&mut ws).await {
        Message::Close(Some(close)) => assert_eq!(u16::from(close.code), 1001, "{close:?}"),
        other => panic!("expected a close frame with 1001, got {other:?}"),
    }
    tokio::time::timeout(PROMPT, server)
        .await
        .expect("run did not return after shutdown")
        .unwrap()
        .unwrap();

    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed once run returns"
    );
    // The store was closed before run returned: the writer said so before the server's last
    // word. The state is gone, and the lock on the data directory with it; the database holds
    // the message.
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let writer_stopped = logs.find("database writer stopped");
    let server_stopped = logs.find("server stopped");
    assert!(
        writer_stopped.is_some() && writer_stopped < server_stopped,
        "the store was not closed before the server stopped:\n{logs}"
    );
    drop(seqcast_server::lifetime::lock_data_dir(&settings).expect("the data directory is free"));
    let reader = seqcast_persistence::DbReader::open(&dir.path().join("seqcast.db")).unwrap();
    assert_eq!(seqcast_persistence::EventReader::head(&reader).unwrap(), 1);
}
