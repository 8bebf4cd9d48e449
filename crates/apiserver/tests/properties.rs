//! Hostile input at the API server's router: thousands of generated request bodies and
//! paths. None may panic or be answered 5xx by our own code, and every refusal must be an
//! OpenAI-style error that says what was wrong.

mod common;

use axum::{Router, body::Body};
use greenthread_apiserver::Auth;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde_json::{Value, json};
use tower_service::Service;

fn app() -> Router {
    common::app(Auth::open())
}

fn call(rt: &tokio::runtime::Runtime, app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    rt.block_on(async {
        let resp = app.clone().call(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{status}: not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, v)
    })
}

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or_default()
}

/// Arbitrary JSON, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[derive(Debug, Clone)]
enum ModelField {
    Routed(&'static str),
    Ambiguous(&'static str),
    Unknown(String),
    NotAString(Value),
    Missing,
}

fn model_field() -> impl Strategy<Value = ModelField> {
    prop_oneof![
        prop_oneof![
            Just("alpha"),
            Just("org/alpha"),
            Just("team-a/beta"),
            Just("team-b/beta"),
            Just("team-a/alpha")
        ]
        .prop_map(ModelField::Routed),
        prop_oneof![Just("beta"), Just("org/beta")].prop_map(ModelField::Ambiguous),
        any::<String>()
            .prop_filter("not a known name", |s| ![
                "alpha",
                "org/alpha",
                "beta",
                "org/beta",
                "team-a/beta",
                "team-b/beta",
                "team-a/alpha"
            ]
            .contains(&s.as_str()))
            .prop_map(ModelField::Unknown),
        json_value()
            .prop_filter("not a string", |v| !v.is_string())
            .prop_map(ModelField::NotAString),
        Just(ModelField::Missing),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5_000))]

    /// Any JSON body, any `model`: routed (503, no replica runs), ambiguous (409), unknown
    /// (404, the name echoed at most 128 characters), or a 400 that says what is wrong.
    #[test]
    fn request_bodies_route_or_are_refused_clearly(
        fields in prop::collection::btree_map("[a-z_]{1,8}", json_value(), 0..6),
        model in model_field(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let app = app();
        let mut body: serde_json::Map<String, Value> = fields.into_iter().filter(|(k, _)| k != "model").collect();
        match &model {
            ModelField::Routed(m) | ModelField::Ambiguous(m) => { body.insert("model".into(), json!(m)); }
            ModelField::Unknown(m) => { body.insert("model".into(), json!(m)); }
            ModelField::NotAString(v) => { body.insert("model".into(), v.clone()); }
            ModelField::Missing => {}
        }
        let req = Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        let (status, v) = call(&rt, &app, req);
        prop_assert!(!message(&v).is_empty(), "{status}: {v}");
        match model {
            ModelField::Routed(_) => {
                prop_assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
                prop_assert!(message(&v).contains("no replica"));
            }
            ModelField::Ambiguous(_) => {
                prop_assert_eq!(status, StatusCode::CONFLICT);
                prop_assert!(message(&v).contains("team-a/beta, team-b/beta"));
            }
            ModelField::Unknown(m) => {
                prop_assert_eq!(status, StatusCode::NOT_FOUND);
                prop_assert!(message(&v).len() < 700 + m.len().min(600), "{}", message(&v));
            }
            ModelField::NotAString(_) => {
                prop_assert_eq!(status, StatusCode::BAD_REQUEST);
                prop_assert!(message(&v).contains("must be a string"));
            }
            ModelField::Missing => {
                prop_assert_eq!(status, StatusCode::BAD_REQUEST);
                prop_assert!(message(&v).contains("no `model` field"));
            }
        }
    }

    /// Arbitrary bytes as a body: a clear 400 unless they happen to be a routable request.
    #[test]
    fn arbitrary_bytes_are_refused_clearly(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let req = Request::post("/v1/completions").body(Body::from(bytes)).unwrap();
        let (status, v) = call(&rt, &app(), req);
        prop_assert!(
            [StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND, StatusCode::CONFLICT, StatusCode::SERVICE_UNAVAILABLE].contains(&status),
            "{status}: {v}"
        );
        if status == StatusCode::BAD_REQUEST {
            let m = message(&v);
            prop_assert!(m.contains("not valid JSON") || m.contains("no `model` field") || m.contains("must be a string"), "{m}");
        }
    }

    /// Arbitrary paths under `/{model}/v1/` and `/{namespace}/{model}/v1/`: never a panic,
    /// never a 5xx of our own but "no replica", and traversal is always refused.
    #[test]
    fn prefixed_paths_route_or_are_refused_clearly(
        model in prop_oneof![
            prop::sample::select(vec!["alpha", "team-b/beta", "beta"]).prop_map(String::from),
            "[a-z%.]{1,6}",
        ],
        rest in prop::collection::vec(prop_oneof![
            prop::sample::select(vec![
                "chat", "completions", "..", "%2e%2e", "%2F..%2F", "sleep", "models", ".", "x%5c",
            ]).prop_map(String::from),
            "[a-z0-9%._-]{0,6}",
        ], 1..5),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let path = format!("/{model}/v1/{}", rest.join("/"));
        let Ok(req) = Request::post(&path).body(Body::from("{}")) else {
            return Ok(()); // not a URI at all: hyper would refuse it before us
        };
        let (status, v) = call(&rt, &app(), req);
        prop_assert!(!message(&v).is_empty() || status == StatusCode::OK, "{status} {path}: {v}");
        prop_assert!(status != StatusCode::INTERNAL_SERVER_ERROR, "{path}");
        if status == StatusCode::SERVICE_UNAVAILABLE {
            prop_assert!(message(&v).contains("no replica"));
            let forwarded = path.splitn(if model.contains('/') { 4 } else { 3 }, '/').last().unwrap().to_ascii_lowercase();
            prop_assert!(!forwarded.split('/').any(|s| { let s = s.replace("%2e", "."); s == ".." || s == "." }), "{path}");
            prop_assert!(!forwarded.contains("%2f"), "{path}");
        }
    }
}
