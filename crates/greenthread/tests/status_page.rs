//! The status page in a real browser: headless Chromium (Debian's package) driven over
//! the DevTools protocol by `scripts/ui_check.py` against `greenthread local` on its
//! embedded default. The page loads with no console error, lists the four models asleep,
//! shows a model serving within two seconds of a chat's answer, logs its preemption by
//! the model that shares its GPU (naming the preemptor), and a Sleep button (pressed from
//! the keyboard) puts that one back to sleep; with an admin token it asks for the token
//! first. The screenshots are kept under `target/test-artifacts/`.

use std::path::{Path, PathBuf};

use greenthread_test_support::{LocalProc, chart::repo_root, python_script};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

/// Runs the browser script; returns what it saw.
async fn drive(url: &str, shot: &Path, token: Option<&str>) -> serde_json::Value {
    let shot = shot.display().to_string();
    let mut args = vec![url, shot.as_str()];
    args.extend(token);
    python_script(
        "ui_check.py",
        &args,
        "Debian's chromium and PyPI's websocket-client; scripts/test installs both",
    )
    .await
}

fn artifact(name: &str) -> PathBuf {
    let dir = repo_root().join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        bytes.len() > 10_000,
        "a blank screenshot ({} bytes)",
        bytes.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_models_live_and_sleeps_one_in_a_real_browser() {
    let local = LocalProc::start_default(BIN).await;
    // The page and its files, with the headers that keep it to itself.
    let r = local
        .client
        .get(format!("{}/", local.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("<title>GreenThread</title>")
    );
    let shot = artifact("status-page.png");
    let seen = drive(&local.url, &shot, None).await;
    println!("status page: {seen}");
    assert_eq!(seen["after_sleep"], "sleeping");
    assert!(
        seen["serving_after_seconds"].as_f64().unwrap() <= 2.0,
        "{seen}"
    );
    assert_eq!(seen["console_errors"], serde_json::json!([]));
    assert_png(&shot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_admin_token_the_page_asks_for_it_and_then_works() {
    let default =
        std::fs::read_to_string(repo_root().join("crates/greenthread/src/local/default.yaml"))
            .unwrap();
    let token = "ui-admin-7f3a9c";
    let local = LocalProc::start(BIN, &format!("{default}\nadminToken: {token}\n")).await;
    // The page's files are open (they hold no data); what it reads is not.
    let page = local
        .client
        .get(format!("{}/ui/", local.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let api = local
        .client
        .get(format!("{}/api/v1/models", local.url))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 401);
    let shot = artifact("status-page-token.png");
    let seen = drive(&local.url, &shot, Some(token)).await;
    assert_eq!(seen["asked_for_token"], true, "{seen}");
    assert_eq!(seen["after_sleep"], "sleeping");
    assert_png(&shot);
}
