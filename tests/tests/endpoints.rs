//! HTTP endpoints, publish auth, the CLI and development mode against the real binary.
#![allow(clippy::unwrap_used)]

use seqcast_e2e::{API_KEY, Options, TestServer, server_binary, token, token_with};
use serde_json::{Value, json};

#[tokio::test]
async fn health_metrics_and_openapi() {
    let s = TestServer::start().await;
    assert_eq!(
        s.get("/healthz", None).await,
        (200, json!({"status": "ok"}))
    );
    let (status, ready) = s.get("/readyz", None).await;
    assert_eq!((status, &ready["status"]), (200, &json!("ready")));
    s.publish("c", "r", json!(1)).await;
    let metrics = s.metrics().await;
    assert!(metrics.contains("seqcast_published_total 1"), "{metrics}");
    assert!(metrics.contains("seqcast_head 1"), "{metrics}");
    let (status, api) = s.get("/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(api["paths"]["/api/publish"]["post"].is_object(), "{api}");
    let (status, body) = s.get("/nope", None).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    let page = s.http.get(s.url("/")).send().await.unwrap();
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let js = s
        .http
        .get(s.url("/client/seqcast.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("javascript")
    );
    // A browser asks for it on its own: not a 404 in every console.
    let icon = s.http.get(s.url("/favicon.ico")).send().await.unwrap();
    assert_eq!(icon.status(), 204);
}

/// Run the binary with `args`; (exit success, stdout, stderr).
fn seqcast(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(server_binary())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn cli_speaks_to_people() {
    // `token --help` lists what minting uses, not every server flag.
    let (ok, help, _) = seqcast(&["token", "--help"]);
    assert!(ok);
    for flag in [
        "--sub",
        "--channels",
        "--ttl-secs",
        "--publish",
        "--config",
        "--data-dir",
        "--jwt-secret",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    for flag in [
        "--listen",
        "--storage",
        "--cache-bytes",
        "--backlog-per-key",
    ] {
        assert!(!help.contains(flag), "{flag} in token --help:\n{help}");
    }

    // `db migrate` says what it did in words, once applied and once with nothing to do.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (ok, first, err) = seqcast(&["db", "migrate", "--data-dir", data]);
    assert!(ok, "{err}");
    assert!(
        first.contains("applied ") && first.contains("migration") && first.contains("schema "),
        "{first}"
    );
    assert!(!first.contains("MigrationReport"), "{first}");
    let (ok, again, _) = seqcast(&["db", "migrate", "--data-dir", data]);
    assert!(ok);
    assert!(again.trim_end().ends_with(", nothing to apply"), "{again}");
    let version = again
        .split("schema ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap();
    assert!(
        first.contains(&format!("schema {version}")),
        "{first} / {again}"
    );

    // A missing settings file is reported once, with its OS error once.
    let missing = dir.path().join("nope.toml");
    let (ok, _, err) = seqcast(&["serve", "--config", missing.to_str().unwrap()]);
    assert!(!ok);
    assert_eq!(err.matches("nope.toml").count(), 1, "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    assert_eq!(
        err.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "{err}"
    );
}

#[tokio::test]
async fn publish_auth_and_body_errors() {
    let s = TestServer::start_with(Options::args(&["--max-message-bytes", "2048"])).await;
    let body = json!({"channel": "c", "request_id": "r", "data": 1}).to_string();
    let post = |auth: Option<String>, body: String| {
        let mut req = s
            .http
            .post(s.url("/api/publish"))
            .header("Content-Type", "application/json")
            .body(body);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, missing) = post(None, body.clone()).await;
    assert_eq!(status, 401);
    // A publisher without the header is told the form it needs and where a development key is.
    let message = missing["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("ApiKey <key>") && message.contains("api-key"),
        "{missing}"
    );
    assert_eq!(post(Some("ApiKey wrong".into()), body.clone()).await.0, 401);
    assert_eq!(
        post(
            Some(format!("Bearer {}", token("reader", None))),
            body.clone()
        )
        .await
        .0,
        403
    );
    let publisher = token_with("svc", Some(&["c:*"]), 60, true);
    assert_eq!(
        post(Some(format!("Bearer {publisher}")), body.clone())
            .await
            .0,
        200
    );
    let outside = json!({"channel": "d", "request_id": "r", "data": 1}).to_string();
    assert_eq!(
        post(Some(format!("Bearer {publisher}")), outside).await.0,
        403
    );
    let (status, err) = post(
        Some(format!("ApiKey {API_KEY}")),
        format!(
            r#"{{"channel":"c","request_id":"r","data":"{}"}}"#,
            "x".repeat(4096)
        ),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["code"], "too_large");
    for bad in [
        "{",
        "[]",
        r#"{"channel":"c","request_id":"r"}"#,
        r#"{"channel":"c","request_id":"r","data":1,"message_id":"bad id"}"#,
    ] {
        let (status, err) = post(Some(format!("ApiKey {API_KEY}")), bad.to_owned()).await;
        assert_eq!(status, 400, "{bad}: {err}");
        assert_eq!(err["error"]["code"], "bad_request");
    }
    let (status, ok) = post(Some(format!("ApiKey {API_KEY}")), body).await;
    assert_eq!(status, 200);
    assert_eq!(
        ok["sequence_number"], 2,
        "refused publishes consumed no number"
    );
}

#[tokio::test]
async fn development_mode_prints_a_working_token_and_keeps_its_secret() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = Options::args(&["--storage", "memory"]);
    opts.dev_mode = true;
    opts.data_dir = Some(dir.path().to_path_buf());
    let mut s = TestServer::start_with(opts.clone()).await;
    s.wait_for_log(|v| v["event"] == "development_mode" && v["level"] == "WARN")
        .await;
    let printed = s.raw_logs().join("\n");
    let token_line = printed
        .lines()
        .skip_while(|l| !l.contains("dev token"))
        .nth(1)
        .unwrap()
        .trim_start_matches("stderr:")
        .trim()
        .to_owned();
    let key = std::fs::read_to_string(dir.path().join("api-key")).unwrap();
    assert!(printed.contains(key.trim()), "the API key is printed");
    let r = s
        .http
        .post(s.url("/api/publish"))
        .header("Authorization", format!("ApiKey {}", key.trim()))
        .json(&json!({"channel": "demo", "request_id": "r1", "data": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, body) = s
        .get("/websocket/messages?since=0", Some(&token_line))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"][0]["data"], "hi");
    let (status, dev) = s.get("/dev/token", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        s.get("/websocket/messages?since=0", dev["token"].as_str())
            .await
            .0,
        200
    );
    // The secret is kept: the printed token still works after a restart.
    assert!(s.terminate().await.success());
    let s = TestServer::start_with(opts).await;
    assert_eq!(
        s.get("/websocket/messages?since=0", Some(&token_line))
            .await
            .0,
        200
    );
    // With a configured secret there is no development token endpoint.
    let configured = TestServer::start().await;
    assert_eq!(configured.get("/dev/token", None).await.0, 404);
}

#[tokio::test]
async fn token_subcommand_mints_with_the_configured_secret() {
    let out = std::process::Command::new(server_binary())
        .args([
            "token",
            "--sub",
            "alice",
            "--channels",
            "search:*",
            "--ttl-secs",
            "60",
            "--jwt-secret",
            seqcast_e2e::JWT_SECRET,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let minted = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let s = TestServer::start().await;
    assert_eq!(
        s.get(
            "/websocket/messages?since=0&channel=search&request_id=r",
            Some(&minted)
        )
        .await
        .0,
        200
    );
    assert_eq!(
        s.get(
            "/websocket/messages?since=0&channel=other&request_id=r",
            Some(&minted)
        )
        .await
        .0,
        403
    );
    let bad = std::process::Command::new(server_binary())
        .args([
            "token",
            "--sub",
            "a",
            "--channels",
            "bad:pat:*:x y",
            "--jwt-secret",
            "s",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[tokio::test]
async fn settings_come_from_a_toml_file_under_env_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("seqcast.toml");
    std::fs::write(&cfg, "storage = \"memory\"\nrecovery_max_messages = 3\n").unwrap();
    let mut opts = Options::args(&["--config", cfg.to_str().unwrap()]);
    opts.env = vec![("SEQCAST_RECOVERY_MAX_MESSAGES".into(), "2".into())];
    let s = TestServer::start_with(opts).await;
    let opened = s.wait_for_log(|v| v["event"] == "store_opened").await;
    assert_eq!(opened["storage"], "memory", "from the file");
    for i in 0..4 {
        s.publish("c", "r", json!(i)).await;
    }
    let (_, body) = s
        .get("/websocket/messages?since=0", Some(&token("a", None)))
        .await;
    assert_eq!(
        body["messages"].as_array().unwrap().len(),
        2,
        "the environment wins over the file"
    );

    std::fs::write(&cfg, "recovery_max_mesages = 3\n").unwrap();
    let out = std::process::Command::new(server_binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("recovery_max_mesages"));
    let out = std::process::Command::new(server_binary())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--storage",
            "postgres",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("postgres"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
