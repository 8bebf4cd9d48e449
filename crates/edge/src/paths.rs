//! Which paths a public port forwards to an engine: inference only. An engine's control
//! API (vLLM's `/sleep`, `/wake_up`, `/collective_rpc`, `/v1/load_lora_adapter`, SGLang's
//! `/release_memory_occupation`, …) is reachable only by the sidecar itself.

use crate::ApiError;

/// OpenAI's inference paths, Anthropic's `/v1/messages`, and vLLM's serving extras. A
/// path is allowed when it is one of these or lies below one.
pub const INFERENCE_PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/audio",
    "/v1/images",
    "/v1/moderations",
    "/v1/models",
    "/v1/messages",
    "/v1/rerank",
    "/v1/score",
    "/v2/rerank",
    "/tokenize",
    "/detokenize",
    "/score",
    "/rerank",
    "/pooling",
    "/classify",
    "/invocations",
];

/// What a public port does with a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathCheck {
    /// Forward it.
    Inference,
    /// Not an inference path: 404, never forwarded.
    NotInference,
}

/// Rejects what could name another resource once an engine (or a router in front of it)
/// normalizes the path: `.` and `..` segments, encoded or not, encoded slashes and
/// backslashes, empty segments, control characters. Returns the path unchanged when clean.
pub fn clean_path(path: &str) -> Result<&str, ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("invalid request path: {why}"));
    if !path.starts_with('/') {
        return Err(bad("it must start with '/'"));
    }
    if path.bytes().any(|b| b.is_ascii_control() || b == b'\\') {
        return Err(bad("control characters and backslashes are not allowed"));
    }
    // Without allocating: this runs on every proxied request.
    let encoded = |code: &[u8]| {
        path.as_bytes()
            .windows(3)
            .any(|w| w[0] == b'%' && w[1..].eq_ignore_ascii_case(code))
    };
    if encoded(b"2f") || encoded(b"5c") || encoded(b"00") {
        return Err(bad("encoded slashes are not allowed"));
    }
    if path.contains("//") {
        return Err(bad("empty path segments are not allowed"));
    }
    let dot = |s: &[u8]| s == b"." || s.eq_ignore_ascii_case(b"%2e");
    for segment in path[1..].split('/').map(str::as_bytes) {
        let is_dots = match segment.len() {
            1 | 3 => dot(segment),
            2 | 4 | 6 => {
                // `..`, `.%2e`, `%2e.`, `%2e%2e`
                (1..segment.len()).any(|cut| dot(&segment[..cut]) && dot(&segment[cut..]))
            }
            _ => false,
        };
        if is_dots {
            return Err(bad("'.' and '..' segments are not allowed"));
        }
    }
    Ok(path)
}

/// Whether `path` (without its query) may be forwarded from a public port: a clean path
/// that is, or lies below, one of [`INFERENCE_PATHS`] or `extra`.
pub fn check_inference_path(path: &str, extra: &[String]) -> Result<PathCheck, ApiError> {
    let path = clean_path(path)?;
    let under = |p: &str| {
        let p = p.trim_end_matches('/');
        path == p || path.strip_prefix(p).is_some_and(|r| r.starts_with('/'))
    };
    if INFERENCE_PATHS.iter().copied().any(under) || extra.iter().map(String::as_str).any(under) {
        Ok(PathCheck::Inference)
    } else {
        Ok(PathCheck::NotInference)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_paths_pass_and_control_paths_do_not() {
        let ok = |p: &str| check_inference_path(p, &[]).unwrap() == PathCheck::Inference;
        for p in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/responses/resp_123",
            "/v1/audio/transcriptions",
            "/v1/messages",
            "/v1/messages/count_tokens",
            "/tokenize",
            "/detokenize",
            "/score",
            "/rerank",
            "/v2/rerank",
            "/pooling",
            "/classify",
            "/invocations",
        ] {
            assert!(ok(p), "{p} should pass");
        }
        for p in [
            "/sleep",
            "/wake_up",
            "/is_sleeping",
            "/collective_rpc",
            "/reset_prefix_cache",
            "/release_memory_occupation",
            "/resume_memory_occupation",
            "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter",
            "/metrics",
            "/health",
            "/",
            "/v1",
            "/v1/chat/completionsX",
            "/tokenizer",
            "/server_info",
            "/flush_cache",
            "/update_weights_from_disk",
        ] {
            assert!(!ok(p), "{p} should not pass");
        }
        let extra = vec!["/generate".to_string()];
        assert_eq!(
            check_inference_path("/generate", &extra).unwrap(),
            PathCheck::Inference
        );
    }

    #[test]
    fn traversal_and_encoded_separators_are_rejected() {
        for p in [
            "/v1/../sleep",
            "/v1/%2e%2e/sleep",
            "/v1/%2E./sleep",
            "/v1/chat%2F..%2F..%2Fsleep",
            "/v1/chat%2fcompletions",
            "/v1/chat/./completions",
            "/v1//chat/completions",
            "/v1\\..\\sleep",
            "/v1/chat/completions%00",
            "relative",
        ] {
            let e = check_inference_path(p, &[]).unwrap_err();
            assert_eq!(e.status, 400, "{p}");
            assert!(e.message.starts_with("invalid request path"), "{p}: {e}");
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Path-like strings: segments from a vocabulary that includes every trick (dots,
    /// encoded dots and slashes, backslashes, control characters, allowed prefixes).
    fn path() -> impl Strategy<Value = String> {
        let segment = prop_oneof![
            Just("v1".to_string()),
            Just("chat".to_string()),
            Just("completions".to_string()),
            Just("..".to_string()),
            Just(".".to_string()),
            Just("%2e%2e".to_string()),
            Just("%2E.".to_string()),
            Just("%2f".to_string()),
            Just("%2F..%2F".to_string()),
            Just("%5c".to_string()),
            Just("\\..".to_string()),
            Just("sleep".to_string()),
            Just("tokenize".to_string()),
            Just(String::new()),
            "[a-z0-9_%.-]{0,12}",
            any::<String>(),
        ];
        prop::collection::vec(segment, 0..8).prop_map(|s| format!("/{}", s.join("/")))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// Never panics; what passes as inference can name nothing but itself; every
        /// refusal says why.
        #[test]
        fn inference_paths_never_escape(p in path()) {
            match check_inference_path(&p, &[]) {
                Ok(PathCheck::Inference) => {
                    let lower = p.to_ascii_lowercase();
                    prop_assert!(!lower.contains("%2f") && !lower.contains("%5c") && !p.contains('\\'));
                    prop_assert!(!p.contains("//"));
                    for seg in lower.split('/') {
                        let seg = seg.replace("%2e", ".");
                        prop_assert!(seg != "." && seg != "..", "{}", p);
                    }
                    let allowed = INFERENCE_PATHS.iter().any(|a| p == *a || p.starts_with(&format!("{a}/")));
                    prop_assert!(allowed, "{}", p);
                }
                Ok(PathCheck::NotInference) => {}
                Err(e) => {
                    prop_assert_eq!(e.status, 400);
                    prop_assert!(e.message.starts_with("invalid request path: "));
                }
            }
        }
    }
}
