//! The API server's router in process, with no socket: how a `model` routes, what each
//! refusal says, and which credential opens which path. Tables, one request per row.

mod common;

use axum::{Router, body::Body};
use greenthread_apiserver::{Auth, AuthSources};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower_service::Service;

const SOURCES: AuthSources = AuthSources {
    keys: "keys",
    admin: "admin",
    admin_open: "admin open",
};

use common::app;

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().call(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn chat(model: &str) -> Request<Body> {
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(format!(
            r#"{{"model":{model:?},"messages":[{{"role":"user","content":"hi"}}]}}"#
        )))
        .unwrap()
}

#[tokio::test]
async fn a_model_routes_by_name_engine_id_or_namespace_and_every_refusal_says_why() {
    let app = app(Auth::open());
    // (model, status, error type, a piece of the message)
    let table = [
        (
            "alpha",
            503,
            "service_unavailable",
            "no replica of model \"alpha\"",
        ),
        (
            "org/alpha",
            503,
            "service_unavailable",
            // The engine id routes to the Model it belongs to.
            "no replica of model \"alpha\"",
        ),
        ("team-a/alpha", 503, "service_unavailable", "no replica"),
        ("team-b/beta", 503, "service_unavailable", "no replica"),
        ("beta", 409, "model_ambiguous", "team-a/beta"),
        ("nope", 404, "model_not_found", "Known models:"),
        ("team-c/alpha", 404, "model_not_found", "does not exist"),
    ];
    for (model, status, kind, piece) in table {
        let (got, body) = send(&app, chat(model)).await;
        assert_eq!(got.as_u16(), status, "{model}: {body}");
        let e = &body["error"];
        assert_eq!(e["type"], kind, "{model}: {body}");
        assert!(
            e["message"].as_str().unwrap().contains(piece),
            "{model}: {body}"
        );
    }
}

#[tokio::test]
async fn malformed_requests_are_refused_naming_the_problem() {
    let app = app(Auth::open());
    let post = |body: &'static str| {
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    // (body, status, a piece of the message)
    let table = [
        ("not json", 400, "JSON"),
        (r#"{"messages": []}"#, 400, "model"),
        (r#"{"model": 7}"#, 400, "model"),
        (r#"{"model": "alpha", "model": "beta"}"#, 400, "model"),
    ];
    for (body, status, piece) in table {
        let (got, v) = send(&app, post(body)).await;
        assert_eq!(got.as_u16(), status, "{body}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(piece), "{body}: {v}");
    }
    let (got, _) = send(&app, Request::get("/v1/nope").body(Body::empty()).unwrap()).await;
    assert!(got.is_client_error(), "{got}");
}

#[tokio::test]
async fn each_credential_opens_what_it_is_for() {
    let auth = Auth::new(
        vec![greenthread_api::keys::ApiKey::plain("key-1", "k1")],
        Some("root".into()),
        Some("scrape".into()),
        false,
        SOURCES,
    )
    .unwrap();
    let app = app(auth);
    let get = |path: &str, token: Option<&str>| {
        let mut r = Request::get(path);
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        r.body(Body::empty()).unwrap()
    };
    // (what, request, status)
    let table = [
        ("models, no key", get("/v1/models", None), 401),
        ("models, wrong key", get("/v1/models", Some("k2")), 401),
        ("models, key", get("/v1/models", Some("k1")), 200),
        // The admin token opens the API too: an operator may try what users see.
        ("models, admin token", get("/v1/models", Some("root")), 200),
        ("admin, API key", get("/api/v1/gpus", Some("k1")), 401),
        ("admin, admin token", get("/api/v1/gpus", Some("root")), 200),
        ("metrics, nothing", get("/metrics", None), 401),
        ("metrics, API key", get("/metrics", Some("k1")), 401),
        ("metrics, its token", get("/metrics", Some("scrape")), 200),
        // The status page's files hold no data (the page reads the admin API with the
        // token the user enters): open, like /health.
        ("status page, nothing", get("/", None), 200),
        ("status page /ui/, nothing", get("/ui/", None), 200),
        ("status page script, nothing", get("/ui/app.js", None), 200),
        ("status page style, nothing", get("/ui/app.css", None), 200),
        ("events, nothing", get("/api/v1/events", None), 401),
    ];
    for (what, req, status) in table {
        let resp = app.clone().call(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{what}");
    }
    // A refusal is an OpenAI-style error, and no credential is echoed.
    let (status, v) = send(&app, get("/v1/models", Some("k2"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["type"], "invalid_api_key");
    assert!(!v.to_string().contains("k2"), "{v}");
    // Without keys, the API lists every model with its state, waking nothing.
    let (status, v) = send(&app, get("/v1/models", Some("k1"))).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["alpha", "team-a/beta", "team-b/beta"]);
}

#[tokio::test]
async fn the_status_page_is_served_from_the_binary_with_a_strict_policy() {
    let app = app(Auth::open());
    // (path, content type)
    let table = [
        ("/", "text/html; charset=utf-8"),
        ("/ui", "text/html; charset=utf-8"),
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
        ("/favicon.ico", "image/svg+xml"),
    ];
    for (path, kind) in table {
        let resp = app
            .clone()
            .call(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let h = resp.headers();
        assert_eq!(h["content-type"], kind, "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        let csp = h["content-security-policy"].to_str().unwrap();
        // No inline script, nothing from other origins, no framing.
        for part in [
            "default-src 'none'",
            "script-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(part), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
    }
    // The page loads only its own files, and its script sets names as text, never HTML.
    let body = |path: &'static str| {
        let app = app.clone();
        async move {
            let resp = app
                .clone()
                .call(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            String::from_utf8(
                resp.into_body()
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes()
                    .to_vec(),
            )
            .unwrap()
        }
    };
    let html = body("/").await;
    assert!(
        html.contains(r#"src="/ui/app.js""#) && !html.contains("http"),
        "{html}"
    );
    let js = body("/ui/app.js").await;
    assert!(
        !js.contains("innerHTML") && !js.contains("eval("),
        "the script builds the DOM from text"
    );
}

fn upload(key: &str, purpose: &str, content: &str) -> Request<Body> {
    let b = "gt-test-boundary";
    Request::post("/v1/files")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", format!("multipart/form-data; boundary={b}"))
        .body(Body::from(format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
             --{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\r\n{content}\r\n--{b}--\r\n"
        )))
        .unwrap()
}

fn as_key(key: &str, method: &str, path: &str, body: Option<Value>) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(body.map_or(Body::empty(), |b| Body::from(b.to_string())))
        .unwrap()
}

/// The Batch API's refusals, and its tenancy: a file or batch is its key's alone.
#[tokio::test]
async fn batches_are_each_keys_own_and_bad_requests_name_the_field() {
    let auth = Auth::new(
        vec![
            greenthread_api::keys::ApiKey::plain("team-1", "k1"),
            greenthread_api::keys::ApiKey::plain("team-2", "k2"),
        ],
        Some("root".into()),
        None,
        false,
        SOURCES,
    )
    .unwrap();
    let server = common::server(auth);
    // Off until the server has a store.
    let app = greenthread_apiserver::router(server.clone());
    let (got, v) = send(&app, as_key("k1", "GET", "/v1/batches", None)).await;
    assert_eq!(got, 404, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Batch API is off")
    );
    let dir = tempfile::tempdir().unwrap();
    let batches =
        greenthread_apiserver::batch::Batches::start(dir.path(), &server, 2, Default::default())
            .unwrap();
    let _ = server.batches.set(batches);

    let line = r#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "alpha", "messages": []}}"#;
    let (got, file) = send(&app, upload("k1", "batch", line)).await;
    assert_eq!(got, 200, "{file}");
    assert_eq!(
        (file["object"].as_str(), file["filename"].as_str()),
        (Some("file"), Some("in.jsonl"))
    );
    let id = file["id"].as_str().unwrap();
    // (request, status, a piece of the message)
    let table = [
        (upload("k1", "fine-tune", line), 400, "purpose"),
        (
            as_key(
                "k1",
                "POST",
                "/v1/batches",
                Some(serde_json::json!({"endpoint": "/v1/chat/completions"})),
            ),
            400,
            "input_file_id: is required",
        ),
        (
            as_key(
                "k1",
                "POST",
                "/v1/batches",
                Some(serde_json::json!({"input_file_id": id, "endpoint": "/v1/images"})),
            ),
            400,
            "endpoint:",
        ),
        (
            as_key(
                "k1",
                "POST",
                "/v1/batches",
                Some(
                    serde_json::json!({"input_file_id": id, "endpoint": "/v1/chat/completions", "completion_window": "1s"}),
                ),
            ),
            400,
            "completion_window",
        ),
        // Another key's file is no file of yours.
        (
            as_key(
                "k2",
                "POST",
                "/v1/batches",
                Some(serde_json::json!({"input_file_id": id, "endpoint": "/v1/chat/completions"})),
            ),
            400,
            "no such file",
        ),
        (
            as_key("k2", "GET", &format!("/v1/files/{id}"), None),
            404,
            "No such file",
        ),
        (
            as_key("k2", "GET", &format!("/v1/files/{id}/content"), None),
            404,
            "No such file",
        ),
        (
            as_key("k2", "DELETE", &format!("/v1/files/{id}"), None),
            404,
            "No such file",
        ),
        (
            as_key("k1", "GET", "/v1/files/..%2Fkeys.json", None),
            404,
            "No such file",
        ),
        (
            as_key("k1", "GET", "/v1/batches/batch_nope", None),
            404,
            "No such batch",
        ),
    ];
    for (req, status, piece) in table {
        let what = format!("{} {}", req.method(), req.uri());
        let (got, v) = send(&app, req).await;
        assert_eq!(got.as_u16(), status, "{what}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(piece), "{what}: {v}");
    }
    // A batch for a model another namespace also has is kept, failed, saying why.
    let ambiguous = r#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "beta"}}"#;
    let (_, file) = send(&app, upload("k1", "batch", ambiguous)).await;
    let create =
        serde_json::json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions"});
    let (got, b) = send(&app, as_key("k1", "POST", "/v1/batches", Some(create))).await;
    assert_eq!(got, 200, "{b}");
    assert_eq!(b["status"], "failed");
    assert_eq!(b["errors"]["data"][0]["code"], "model_ambiguous", "{b}");
    // Each key lists its own.
    let (_, mine) = send(&app, as_key("k1", "GET", "/v1/batches", None)).await;
    assert_eq!(mine["data"].as_array().unwrap().len(), 1, "{mine}");
    let (_, theirs) = send(&app, as_key("k2", "GET", "/v1/batches", None)).await;
    assert_eq!(theirs["data"], serde_json::json!([]));
    let (_, files) = send(&app, as_key("k2", "GET", "/v1/files", None)).await;
    assert_eq!(files["data"], serde_json::json!([]));
}
